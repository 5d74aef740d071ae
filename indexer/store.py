"""The store format (version 1): the writer the indexer uses and the reader the retriever uses.

::

    STORE/manifest.json        written atomically (tmp + fsync + rename), always LAST
    STORE/model.safetensors    the model that made the store (weights + config)
    STORE/metadata/*.parquet   one row per image, in row order; parts listed in the manifest
    STORE/arrays.zarr          zarr v3: features, style, mask, mask_area
    STORE/faiss/*.index        derived: IDMap2(Flat L2) and IDMap2(Flat IP on unit features)

The manifest's ``rows`` is the commit point: rows at or past it, and Parquet parts it does not
list, are invisible to readers, so a crash at any moment leaves a store that opens and serves
the last committed rows.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from models import ModelConfig, StyleLayout, file_sha256
from models.errors import ConfigError

from .sketch import MASK_GRID, StyleSketch, fit_style_basis, mask_block_counts, orthonormality_error, project_style
from .errors import (
    DermrisError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
)

if TYPE_CHECKING:
    from models import DermrisModel

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "StyleCodec",
    "StoreWriter",
    "Store",
    "build_faiss_indexes",
]

FORMAT_NAME = "dermris-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.safetensors"
LOCK_NAME = ".writer.lock"
ARRAYS_DIR = "arrays.zarr"
METADATA_DIR = "metadata"
FAISS_DIR = "faiss"
FAISS_FILES = {"features_l2": "faiss/features_l2.index", "features_ip": "faiss/features_ip.index"}

_FLOAT16_TARGET = 64.0  # a stage's largest |value| is scaled to about this: 1024x headroom
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_STYLE_SHARD_BYTES = 32 << 20


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


COMPACT_DIR = ".compact"
COMPACT_OLD = ".compact-old"
COMPACT_READY = "READY"
_SWITCHED = (ARRAYS_DIR, METADATA_DIR, FAISS_DIR)


def _finish_compaction(root: Path) -> None:
    """Move a complete compacted store (``.compact/``, marked READY) into place; idempotent.

    Each directory is switched by renames, then the new manifest replaces the old one; a crash
    at any step is finished by the next call (every reader and writer calls it first).
    """
    staging, old = root / COMPACT_DIR, root / COMPACT_OLD
    if not (staging / COMPACT_READY).exists():
        return
    old.mkdir(exist_ok=True)
    for name in _SWITCHED:
        if (staging / name).exists():
            if (root / name).exists():
                shutil.rmtree(old / name, ignore_errors=True)
                os.replace(root / name, old / name)
            os.replace(staging / name, root / name)
    _fsync_dir(root)
    if (staging / MANIFEST_NAME).exists():
        os.replace(staging / MANIFEST_NAME, root / MANIFEST_NAME)
        _fsync_dir(root)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _recover_compaction(root: Path, *, wait_seconds: float = 60.0) -> None:
    """Finish an interrupted compaction under the writer lock (waiting for a running one)."""
    import time as _time

    deadline = _time.monotonic() + wait_seconds
    while (root / COMPACT_DIR / COMPACT_READY).exists():
        with open(root / LOCK_NAME, "a+") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if _time.monotonic() > deadline:
                    raise StoreLockedError(f"{root} is being compacted; try again later") from None
                _time.sleep(0.2)
                continue
            try:
                _finish_compaction(root)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _deleted_rows(manifest: dict[str, Any], rows: int) -> np.ndarray:
    """Sorted rows below ``rows`` that the manifest marks as deleted."""
    return np.array(sorted(d["row"] for d in manifest.get("deleted", []) if d["row"] < rows), dtype=np.int64)


def _checksummed(zstd: bool = False) -> list:
    """Chunk codecs: optional zstd, then a crc32c checksum so damaged chunks are detected."""
    codecs = [zarr.codecs.ZstdCodec(level=3)] if zstd else []
    return codecs + [zarr.codecs.Crc32cCodec()]


def _unpack_masks(packed: np.ndarray, size: int) -> np.ndarray:
    return np.unpackbits(packed, axis=1, count=size * size).astype(bool).reshape(len(packed), size, size)


@dataclass(frozen=True)
class StyleCodec:
    """Float16 storage of style vectors with per-stage power-of-two scale factors.

    Style values span many orders of magnitude across stages, and a plain float16 cast would
    push small ones into the subnormal range or flush them to zero. Each stage is multiplied
    by ``2**k`` (exact in binary) so its largest value sits near 64 before the cast, and
    divided again when read. Arithmetic on decoded values is float32.

    Parameters
    ----------
    layout : StyleLayout
        Stage boundaries.
    stage_scales : tuple of float
        The scale factor of every stage (powers of two).
    dtype : str
        ``"float16"`` (default) or ``"float32"``.
    """

    layout: StyleLayout
    stage_scales: tuple[float, ...]
    dtype: str = "float16"

    @classmethod
    def fit(cls, style: np.ndarray, layout: StyleLayout, dtype: str = "float16") -> "StyleCodec":
        """Choose the stage scales from a first batch of style vectors."""
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"style dtype must be float16 or float32, not {dtype!r}")
        scales = []
        for s in range(len(layout.channels)):
            block = np.abs(style[:, layout.offsets[s]:layout.offsets[s + 1]])
            peak = float(block.max()) if block.size else 0.0
            if dtype == "float32" or not peak > 0 or not math.isfinite(peak):
                scales.append(1.0)
            else:
                scales.append(float(2.0 ** math.floor(math.log2(_FLOAT16_TARGET / peak))))
        return cls(layout, tuple(scales), dtype)

    @property
    def column_scales(self) -> np.ndarray:
        """Scale of every column, float32 ``(D,)``."""
        return np.repeat(np.asarray(self.stage_scales, np.float32), self.layout.lengths)

    def encode(self, style: np.ndarray) -> tuple[np.ndarray, int]:
        """Return the stored representation and the number of values clipped to float16's range."""
        scaled = np.asarray(style, np.float32) * self.column_scales
        if self.dtype == "float32":
            return scaled, 0
        clipped = int(np.count_nonzero(np.abs(scaled) > _FLOAT16_MAX))
        return np.clip(scaled, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16), clipped

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> float32 style vectors."""
        return np.asarray(stored, np.float32) / self.column_scales

    def round_trip(self, style: np.ndarray) -> np.ndarray:
        """What a style vector becomes once stored: queries are compared in this form."""
        return self.decode(self.encode(style)[0])


class _ManifestIO:
    """Reading and validating ``manifest.json``."""

    REQUIRED = ("format", "format_version", "rows", "model", "arrays", "style", "metadata_parts")

    @staticmethod
    def read(root: Path) -> dict[str, Any]:
        path = root / MANIFEST_NAME
        if not root.exists():
            raise StoreNotFoundError(f"no store at {root}")
        if (root / COMPACT_DIR / COMPACT_READY).exists():
            _recover_compaction(root)
        if not path.is_file():
            raise StoreNotFoundError(f"{root} is not a dermris store (no {MANIFEST_NAME})")
        try:
            manifest = json.loads(path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreFormatError(f"{path} is damaged or half-written: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{path} is not a dermris store manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{root} has store format version {version!r}; this dermris reads version "
                f"{FORMAT_VERSION} only"
            )
        missing = [k for k in _ManifestIO.REQUIRED if k not in manifest]
        if missing:
            raise StoreFormatError(f"{path} lacks {', '.join(missing)}")
        if not isinstance(manifest["rows"], int) or manifest["rows"] < 0:
            raise StoreFormatError(f"{path}: invalid row count {manifest['rows']!r}")
        return manifest

    @staticmethod
    def write(root: Path, manifest: dict[str, Any]) -> None:
        manifest["updated"] = _now()
        _atomic_write_bytes(root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())


def _style_codec_from_manifest(manifest: dict[str, Any]) -> StyleCodec | None:
    style = manifest["style"]
    layout = StyleLayout.from_dict(style)
    if style.get("scales") is None:
        return None
    return StyleCodec(layout, tuple(float(s) for s in style["scales"]), style.get("dtype", "float16"))


class StoreWriter:
    """Appends committed batches of rows to a store (one writer at a time).

    Use :meth:`create` for a new store and :meth:`open` to append to an existing one.
    Every :meth:`append` writes the arrays, then a Parquet part, then the manifest: the
    manifest rename is the commit.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self._lock = open(root / LOCK_NAME, "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StoreLockedError(f"another process is writing to {root}") from None
        self.manifest = manifest
        self._remove_uncommitted_files()
        self._load(manifest)

    def _load(self, manifest: dict[str, Any]) -> None:
        """Set what the writer derives from a manifest (on open, and after compaction)."""
        self.manifest = manifest
        self._group = zarr.open_group(str(self.root / ARRAYS_DIR), mode="r+")
        self.layout = StyleLayout.from_dict(manifest["style"])
        self.codec = _style_codec_from_manifest(manifest)
        parts = manifest["metadata_parts"]
        self._schema: pa.Schema | None = (
            pq.read_schema(self.root / METADATA_DIR / parts[0]["file"]) if parts else None
        )

    @property
    def rows(self) -> int:
        """Committed row count."""
        return self.manifest["rows"]

    def _remove_uncommitted_files(self) -> None:
        """Delete what an interrupted writer left: unlisted Parquet parts and temporary files.

        Independent readers list ``metadata/`` themselves, so a part written for rows that were
        never committed must not stay there.
        """
        listed = {p["file"] for p in self.manifest["metadata_parts"]}
        for path in (self.root / METADATA_DIR).iterdir():
            if path.name not in listed:
                path.unlink()
        for pattern in ("*.partial", ".*.tmp"):
            for path in self.root.rglob(pattern):
                if path.is_file():
                    path.unlink()

    def close(self) -> None:
        """Release the writer lock (also released when the process ends)."""
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model_config(self) -> ModelConfig:
        """The config of the model that made the store."""
        return ModelConfig.from_dict(self.manifest["model"]["config"])

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        *,
        model_config: ModelConfig,
        style_layout: StyleLayout,
        model: "DermrisModel | None" = None,
        style_dtype: str = "float16",
    ) -> "StoreWriter":
        """Create an empty store, with ``model`` saved as ``STORE/model.safetensors``.

        Everything is written into ``STORE/.create`` first and moved into place with the
        manifest last, so an interrupted creation leaves no half store (it is cleared on the
        next try).

        Parameters
        ----------
        root : path-like
            The store directory: absent, empty, or holding only an interrupted creation.
        model_config : ModelConfig
            Recorded in the manifest.
        style_layout : StyleLayout
            Stage channels and weights of the style vectors.
        model : DermrisModel, optional
            Saved into the store; without it the store answers only stored-row queries.
        style_dtype : str
            ``"float16"`` (default) or ``"float32"``.

        Raises
        ------
        StoreExistsError
            If ``root`` holds anything else.
        """
        root = Path(root)
        if style_dtype not in ("float16", "float32"):
            raise ConfigError(f"style dtype must be float16 or float32, not {style_dtype!r}")
        staging = root / ".create"
        if root.exists():
            others = [p.name for p in root.iterdir() if p.name != staging.name]
            if others:
                raise StoreExistsError(
                    f"{root} exists and is not empty" + (" (it is a store)" if MANIFEST_NAME in others else "")
                )
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        weights_sha256 = None
        if model is not None:
            from models import save_model

            weights_sha256 = save_model(model, staging / MODEL_FILE)
        manifest = cls._initialise(staging, model_config, style_layout, weights_sha256, style_dtype)
        for child in sorted(staging.iterdir()):
            if child.name != MANIFEST_NAME:
                os.replace(child, root / child.name)
        _fsync_dir(root)
        os.replace(staging / MANIFEST_NAME, root / MANIFEST_NAME)
        staging.rmdir()
        _fsync_dir(root)
        return cls(root, manifest)

    @staticmethod
    def _initialise(
        root: Path, model_config: ModelConfig, style_layout: StyleLayout,
        weights_sha256: str | None, style_dtype: str,
    ) -> dict[str, Any]:
        (root / METADATA_DIR).mkdir()
        (root / FAISS_DIR).mkdir()
        feature_dim = model_config.feature_dim
        size = model_config.mask_size
        mask_bytes = (size * size + 7) // 8
        dim = style_layout.dim
        shard_rows = max(1, min(1024, _STYLE_SHARD_BYTES // (dim * np.dtype(style_dtype).itemsize)))
        group = zarr.open_group(str(root / ARRAYS_DIR), mode="w")
        group.create_array(
            "features", shape=(0, feature_dim), dtype="float32",
            chunks=(max(1, (4 << 20) // (4 * feature_dim)), feature_dim), compressors=_checksummed(), fill_value=0,
        )
        group.create_array(
            "style", shape=(0, dim), dtype=style_dtype, chunks=(1, dim), shards=(shard_rows, dim),
            compressors=_checksummed(), fill_value=0,
        )
        group.create_array(
            "mask", shape=(0, mask_bytes), dtype="uint8", chunks=(256, mask_bytes),
            compressors=_checksummed(zstd=True), fill_value=0,
        )
        group.create_array(
            "mask_area", shape=(0,), dtype="int32", chunks=(1 << 16,),
            compressors=_checksummed(zstd=True), fill_value=0,
        )
        grid = MASK_GRID if size % MASK_GRID == 0 else 1
        group.create_array(
            "mask_blocks", shape=(0, grid * grid), dtype="int32", chunks=(1 << 12, grid * grid),
            compressors=_checksummed(zstd=True), fill_value=0,
        )
        group.attrs["dermris_format_version"] = FORMAT_VERSION
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": _now(),
            "rows": 0,
            "model": {
                "config": model_config.to_dict(),
                "weights_file": MODEL_FILE if weights_sha256 else None,
                "weights_sha256": weights_sha256,
            },
            "arrays": {
                "features": {"dim": feature_dim, "dtype": "float32"},
                "style": {"dim": dim, "dtype": style_dtype, "shard_rows": shard_rows},
                "mask": {"size": size, "bytes": mask_bytes, "packing": "numpy.packbits row-major"},
                "mask_area": {"dtype": "int32"},
                "mask_blocks": {"dtype": "int32", "grid": grid},
            },
            "style": {**style_layout.to_dict(), "scales": None, "dtype": style_dtype, "clipped_values": 0},
            "metadata_parts": [],
            "faiss": {},
            "rejected": [],
        }
        _ManifestIO.write(root, manifest)
        return manifest

    @classmethod
    def open(cls, root: str | os.PathLike) -> "StoreWriter":
        """Open an existing store for appending; rows past the commit point are overwritten."""
        root = Path(root)
        return cls(root, _ManifestIO.read(root))

    def check_model(self, config: ModelConfig, weights_sha256: str | None) -> None:
        """Raise :class:`StoreMismatchError` unless the store was made by this model."""
        stored = self.manifest["model"]
        if stored["config"] != config.to_dict():
            raise StoreMismatchError(
                f"{self.root} was built with model config {stored['config'].get('name')!r} "
                f"({stored['config'].get('backbone')}), not {config.name!r} ({config.backbone}); "
                "use another store path"
            )
        if weights_sha256 is not None and stored["weights_sha256"] != weights_sha256:
            raise StoreMismatchError(f"{self.root} was built with other model weights")

    def append(
        self,
        *,
        features: np.ndarray,
        style: np.ndarray,
        masks: np.ndarray,
        records: pa.Table,
    ) -> range:
        """Write and commit a batch of rows.

        Parameters
        ----------
        features : np.ndarray
            ``(B, F)`` float.
        style : np.ndarray
            ``(B, D)`` float32 style vectors (encoded here).
        masks : np.ndarray
            ``(B, S, S)`` bool masks, or ``(B, ceil(S*S/8))`` uint8 already bit-packed.
        records : pyarrow.Table
            ``B`` rows with ``image_id``, ``path``, ``sha256``, ``width``, ``height`` and user
            metadata columns; the ``row`` column is added here.

        Returns
        -------
        range
            The committed row numbers.
        """
        b = len(features)
        spec = self.manifest["arrays"]
        if not (len(style) == len(masks) == records.num_rows == b):
            raise ValueError("features, style, masks and records must have the same length")
        if b == 0:
            return range(self.rows, self.rows)
        features = np.asarray(features, np.float32)
        if features.shape[1:] != (spec["features"]["dim"],) or style.shape[1:] != (spec["style"]["dim"],):
            raise ValueError("feature or style width does not fit the store")
        size = spec["mask"]["size"]
        if masks.dtype == bool:
            if masks.shape[1:] != (size, size):
                raise ValueError(f"masks must be {size}x{size}")
            packed = np.packbits(masks.reshape(b, -1), axis=1)
        else:
            packed = np.asarray(masks, np.uint8)
            if packed.shape[1:] != (spec["mask"]["bytes"],):
                raise ValueError("packed masks do not fit the store")
            masks = _unpack_masks(packed, size)
        areas = masks.reshape(b, -1).sum(axis=1).astype(np.int32)
        blocks = mask_block_counts(masks, spec["mask_blocks"]["grid"]) if "mask_blocks" in spec else None
        if self.codec is None:
            self.codec = StyleCodec.fit(style, self.layout, spec["style"]["dtype"])
            self.manifest["style"]["scales"] = list(self.codec.stage_scales)
        encoded, clipped = self.codec.encode(style)

        n0, n1 = self.rows, self.rows + b
        g = self._group
        columns = [("features", features), ("style", encoded), ("mask", packed), ("mask_area", areas)]
        if blocks is not None:
            columns.append(("mask_blocks", blocks))
        for name, data in columns:
            arr = g[name]
            arr.resize((n1, *arr.shape[1:]))
            arr[n0:n1] = data

        table = self._with_row_column(records, n0)
        part = f"rows-{n0:012d}-{n1:012d}.parquet"
        tmp = self.root / METADATA_DIR / f".{part}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / METADATA_DIR / part)
        _fsync_dir(self.root / METADATA_DIR)

        os.sync()  # chunk files reach the disk before the manifest that commits them
        m = self.manifest
        m["metadata_parts"].append({"file": part, "start": n0, "stop": n1,
                                    "sha256": file_sha256(self.root / METADATA_DIR / part)})
        m["style"]["clipped_values"] += clipped
        m["rows"] = n1
        m["faiss"] = {}  # derived indexes are stale until rebuilt
        _ManifestIO.write(self.root, m)
        return range(n0, n1)

    def _with_row_column(self, records: pa.Table, start: int) -> pa.Table:
        rows = pa.array(np.arange(start, start + records.num_rows, dtype=np.int64))
        table = records.add_column(0, "row", rows) if "row" not in records.column_names else records
        if self._schema is None:
            self._schema = table.schema
            return table
        try:
            return table.select(self._schema.names).cast(self._schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise StoreMismatchError(
                f"metadata columns do not match the store's ({exc}); index into a new store"
            ) from None

    def record_rejected(self, rejected: Sequence[tuple[str, str]]) -> None:
        """Record files that were not indexed (path, reason) and rewrite the manifest."""
        if not rejected:
            return
        known = {r["path"] for r in self.manifest["rejected"]}
        for path, reason in rejected:
            if path not in known:
                self.manifest["rejected"].append({"path": path, "reason": reason})
                known.add(path)
        _ManifestIO.write(self.root, self.manifest)

    def delete(self, image_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """Mark images as deleted: from this commit on no search returns them and they no longer
        count in any normaliser. :meth:`compact` removes them physically.

        Parameters
        ----------
        image_ids : sequence of str
            Image ids to delete.

        Returns
        -------
        (list of int, list of str)
            The rows deleted now, and the ids that are not (or no longer) in the store.
        """
        meta = Store.open(self.root).metadata(columns=["row", "image_id", "sha256"])
        by_id = {i: (r, sha) for r, i, sha in zip(meta.column("row").to_pylist(), meta.column("image_id").to_pylist(),
                                                  meta.column("sha256").to_pylist())}
        already = {d["row"] for d in self.manifest.get("deleted", [])}
        rows, unknown = [], []
        for image_id in dict.fromkeys(image_ids):
            hit = by_id.get(image_id)
            if hit is None or hit[0] in already:
                unknown.append(image_id)
                continue
            rows.append(hit[0])
            already.add(hit[0])
            self.manifest.setdefault("deleted", []).append(
                {"row": hit[0], "image_id": image_id, "sha256": hit[1], "deleted": _now()})
        if rows:
            _ManifestIO.write(self.root, self.manifest)
        return rows, unknown

    def compact(self, *, chunk_rows: int = 256) -> int:
        """Physically remove deleted rows from every array, the metadata and the indexes.

        The compacted store is built in ``STORE/.compact`` and switched in only once complete
        (see :func:`_finish_compaction`); a crash before that leaves the store as it was.
        Row numbers of the remaining images are renumbered ``0..N'-1`` in order.

        Returns
        -------
        int
            The number of rows removed.
        """
        store = Store.open(self.root)
        deleted = store.deleted_rows
        if len(deleted) == 0:
            return 0
        staging = self.root / COMPACT_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        m = self.manifest
        manifest = self._initialise(staging, self.model_config, self.layout, m["model"]["weights_sha256"],
                                    m["style"]["dtype"])
        manifest["style"]["scales"] = m["style"]["scales"]  # identical float16 bits
        manifest["rejected"] = m["rejected"]
        manifest["purged"] = m.get("purged", []) + [
            {"image_id": d["image_id"], "sha256": d["sha256"], "deleted": d["deleted"]} for d in m.get("deleted", [])
        ]
        manifest["created"] = m["created"]
        manifest["model"] = m["model"]
        _ManifestIO.write(staging, manifest)
        new = StoreWriter(staging, manifest)
        try:
            live = np.flatnonzero(store.live)
            meta = store.metadata().drop_columns(["row"])
            features = store.features()
            for a in range(0, len(live), chunk_rows):
                rows = live[a:a + chunk_rows]
                new.append(
                    features=features[rows],
                    style=store.style_rows(rows.tolist()),
                    masks=store.mask_rows(rows.tolist()),
                    records=meta.take(pa.array(rows)),
                )
            sketch = m.get("sketch") or {}
            new.build_derived(sketch_dim=sketch.get("dim_requested", 256))
        finally:
            new.close()
        (staging / LOCK_NAME).unlink(missing_ok=True)
        _atomic_write_bytes(staging / COMPACT_READY, b"ready\n")
        _finish_compaction(self.root)
        self._load(_ManifestIO.read(self.root))
        return len(deleted)

    def committed_metadata(self, columns: Sequence[str]) -> pa.Table:
        """Some metadata columns of the committed rows (to skip images already indexed)."""
        return Store.open(self.root).metadata(columns=columns)

    def build_faiss(self) -> None:
        """Rebuild the derived FAISS indexes from the committed features and record them."""
        store = Store.open(self.root)
        info = build_faiss_indexes(store.features(), self.root)
        self.manifest["faiss"] = info
        _ManifestIO.write(self.root, self.manifest)

    def update_sketch(self, *, dim: int = 256, fit_rows: int = 1024, refit_growth: int = 4) -> None:
        """Bring the style sketch up to the committed rows (derived data, crash-safe).

        New rows are projected onto the current basis. The basis is (re)fitted, into a new
        zarr group that the manifest then switches to, when there is none, when ``dim``
        changes, or when it was fitted on fewer than ``fit_rows`` rows and the store has
        grown ``refit_growth`` times since.

        Parameters
        ----------
        dim : int
            Sketch dimension ``d`` (at most the rank of the fitting sample).
        fit_rows : int
            Rows sampled (evenly spaced) to fit the basis.
        refit_growth : int
            Growth factor that triggers a refit of a basis fitted on a small sample.
        """
        if dim < 0 or fit_rows < 1:
            raise ValueError("sketch dim must be >= 0 and fit_rows >= 1")
        store = Store.open(self.root)
        n = store.rows
        info = self.manifest.get("sketch")
        if info and info["rows"] == n and info["dim_requested"] == dim:
            return
        refit = (
            info is None
            or info["dim_requested"] != dim
            or (info["fitted_rows"] < fit_rows and n >= refit_growth * max(1, info["fitted_rows"]))
        )
        arrays = self._group
        if refit:
            sample_rows = np.unique(np.linspace(0, n - 1, num=min(n, fit_rows)).round().astype(int)) if n else []
            components, mean = fit_style_basis(store.style_rows(sample_rows), dim) if n else (
                np.zeros((0, store.style_dim), np.float32), np.zeros(store.style_dim))
            serial = (info or {}).get("serial", 0) + 1
            name = f"sketch_{serial}"
            if name in arrays:
                del arrays[name]
            group = arrays.create_group(name)
            d, big_d = components.shape
            group.create_array("components", data=components, chunks=(1, big_d), compressors=None)
            group.create_array("mean", data=mean, chunks=(big_d,), compressors=None)
            group.create_array("projections", shape=(0, d), dtype="float64", chunks=(1 << 14, max(d, 1)),
                               compressors=None, fill_value=0)
            group.create_array("residuals", shape=(0,), dtype="float64", chunks=(1 << 16,), compressors=None, fill_value=0)
            group.create_array("sq_norms", shape=(0,), dtype="float64", chunks=(1 << 16,), compressors=None, fill_value=0)
            start = 0
            new_info = {"group": name, "serial": serial, "dim": d, "dim_requested": dim,
                        "fitted_rows": len(sample_rows), "orthonormality_error": orthonormality_error(components)}
        else:
            group = arrays[info["group"]]
            components = np.asarray(group["components"][:])
            mean = np.asarray(group["mean"][:])
            start = info["rows"]
            new_info = dict(info)
        for block_start, block in store.iter_style_blocks(start=start):
            y, r, sq = project_style(block, components, mean)
            stop = block_start + len(block)
            for key, data in (("projections", y), ("residuals", r), ("sq_norms", sq)):
                arr = group[key]
                arr.resize((stop, *arr.shape[1:]))
                arr[block_start:stop] = data
        new_info["rows"] = n
        self.manifest["sketch"] = new_info
        _ManifestIO.write(self.root, self.manifest)
        if refit and info is not None:
            # keep the previous basis for readers that opened before this switch
            stale = f"sketch_{info['serial'] - 1}"
            if stale in arrays:
                del arrays[stale]

    def build_derived(self, *, sketch_dim: int = 256, sketch_fit_rows: int = 1024) -> None:
        """Rebuild or extend everything derived from the arrays (FAISS indexes, style sketch)."""
        self.build_faiss()
        self.update_sketch(dim=sketch_dim, fit_rows=sketch_fit_rows)


def _faiss_indexes_for(features: np.ndarray) -> dict[str, faiss.Index]:
    n, dim = features.shape
    ids = np.arange(n, dtype=np.int64)
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
    l2.add_with_ids(np.ascontiguousarray(features, np.float32), ids)
    unit = np.array(features, np.float32, copy=True)
    faiss.normalize_L2(unit)
    ip = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    ip.add_with_ids(unit, ids)
    return {"features_l2": l2, "features_ip": ip}


def build_faiss_indexes(features: np.ndarray, root: Path) -> dict[str, Any]:
    """Write ``faiss/features_l2.index`` and ``faiss/features_ip.index`` atomically."""
    info = {}
    for name, index in _faiss_indexes_for(features).items():
        target = root / FAISS_FILES[name]
        tmp = target.with_name(f".{target.name}.tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        info[name] = {"file": FAISS_FILES[name], "ntotal": int(index.ntotal)}
    _fsync_dir(root / FAISS_DIR)
    return info


class Store:
    """Read-only view of a store's committed rows (a snapshot taken at :meth:`open`).

    Parameters
    ----------
    root : path-like
        The store directory.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.rows: int = manifest["rows"]
        self.deleted_rows = _deleted_rows(manifest, self.rows)
        try:
            self.model_config = ModelConfig.from_dict(manifest["model"]["config"])
            self.layout = StyleLayout.from_dict(manifest["style"])
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise StoreFormatError(f"{root}: invalid model or style description: {exc}") from None
        self.codec = _style_codec_from_manifest(manifest) or StyleCodec(
            self.layout, (1.0,) * len(self.layout.channels), manifest["style"].get("dtype", "float16")
        )
        try:
            self._group = zarr.open_group(str(root / ARRAYS_DIR), mode="r")
            self._arrays = {name: self._group[name] for name in ("features", "style", "mask", "mask_area")}
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise StoreFormatError(f"{root}: arrays.zarr is missing or damaged ({exc})") from None
        spec = manifest["arrays"]
        expected = {
            "features": ((spec["features"]["dim"],), np.float32),
            "style": ((spec["style"]["dim"],), np.dtype(spec["style"]["dtype"])),
            "mask": ((spec["mask"]["bytes"],), np.uint8),
            "mask_area": ((), np.int32),
        }
        for name, (tail, dtype) in expected.items():
            arr = self._arrays[name]
            if arr.shape[0] < self.rows or tuple(arr.shape[1:]) != tail or arr.dtype != dtype:
                raise StoreFormatError(
                    f"{root}: array {name} has shape {arr.shape} {arr.dtype}, expected "
                    f"({self.rows}+, {', '.join(map(str, tail))}) {np.dtype(dtype)}"
                )
        if self.layout.dim != spec["style"]["dim"]:
            raise StoreFormatError(f"{root}: style layout does not match the style array")

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Store":
        """Open a store; raises :class:`StoreNotFoundError` or :class:`StoreFormatError`."""
        root = Path(root)
        return cls(root, _ManifestIO.read(root))

    @property
    def live(self) -> np.ndarray:
        """Boolean ``(N,)``: rows not deleted."""
        live = np.ones(self.rows, bool)
        live[self.deleted_rows] = False
        return live

    def deleted_since(self) -> np.ndarray:
        """Rows deleted in the manifest on disk now (which may be newer than this snapshot)."""
        try:
            manifest = _ManifestIO.read(self.root)
        except DermrisError:
            return self.deleted_rows
        return _deleted_rows(manifest, self.rows)

    # -- sizes -------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        """Length of the feature vectors."""
        return self.manifest["arrays"]["features"]["dim"]

    @property
    def style_dim(self) -> int:
        """Length ``D`` of the style vectors."""
        return self.layout.dim

    @property
    def mask_size(self) -> int:
        """Side ``S`` of the stored masks."""
        return self.manifest["arrays"]["mask"]["size"]

    @property
    def model_file(self) -> Path | None:
        """Path of the stored model weights, if the store has them."""
        name = self.manifest["model"].get("weights_file")
        return self.root / name if name else None

    # -- arrays ------------------------------------------------------------------------
    def _read(self, name: str, selection):
        """Read from an array, turning damaged chunks into :class:`StoreFormatError`."""
        try:
            return self._arrays[name][selection]
        except (ValueError, OSError, RuntimeError) as exc:
            raise StoreFormatError(f"{self.root}: array {name} is damaged at {selection!r}: {exc}") from None

    def features(self) -> np.ndarray:
        """All committed features, ``(N, F)`` float32."""
        return np.asarray(self._read("features", slice(0, self.rows)), np.float32)

    def masks(self) -> np.ndarray:
        """All committed bit-packed masks, ``(N, ceil(S*S/8))`` uint8."""
        return np.asarray(self._read("mask", slice(0, self.rows)), np.uint8)

    def mask_areas(self) -> np.ndarray:
        """Lesion pixel count of every committed mask, ``(N,)`` int64."""
        return np.asarray(self._read("mask_area", slice(0, self.rows)), np.int64)

    def style_block(self, start: int, stop: int) -> np.ndarray:
        """Decoded style vectors of rows ``[start, stop)``, float32."""
        stop = min(stop, self.rows)
        return self.codec.decode(self._read("style", slice(start, stop)))

    def style_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Decoded style vectors of the given rows (read one by one: fast for wide rows)."""
        out = np.empty((len(rows), self.style_dim), np.float32)
        for i, row in enumerate(rows):
            if not 0 <= row < self.rows:
                raise IndexError(f"row {row} is not committed (store has {self.rows} rows)")
            out[i] = self.codec.decode(self._read("style", int(row)))
        return out

    def iter_style_blocks(self, *, start: int = 0, max_bytes: int = 64 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, decoded_block)`` over committed rows from ``start``, shard-aligned."""
        shard = self.manifest["arrays"]["style"].get("shard_rows", 1)
        per_row = self.style_dim * 4
        block = max(shard, (max_bytes // per_row) // shard * shard)
        first = start
        while first < self.rows:
            stop = min(self.rows, (first // block + 1) * block)
            yield first, self.style_block(first, stop)
            first = stop

    def mask_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Bit-packed masks of the given rows, ``(len(rows), ceil(S*S/8))`` uint8."""
        out = np.empty((len(rows), self._arrays["mask"].shape[1]), np.uint8)
        for i, row in enumerate(rows):
            if not 0 <= row < self.rows:
                raise IndexError(f"row {row} is not committed (store has {self.rows} rows)")
            out[i] = self._read("mask", int(row))
        return out

    def mask_blocks(self) -> tuple[np.ndarray, int]:
        """Per-row lesion pixel counts on the block grid and the grid size.

        Computed from the masks when the store predates the ``mask_blocks`` array.
        """
        spec = self.manifest["arrays"].get("mask_blocks")
        if spec is not None and "mask_blocks" in self._group:
            arr = self._group["mask_blocks"]
            if arr.shape[0] >= self.rows:
                return np.asarray(arr[: self.rows], np.int32), spec["grid"]
        grid = MASK_GRID if self.mask_size % MASK_GRID == 0 else 1
        out = np.zeros((self.rows, grid * grid), np.int32)
        for a in range(0, self.rows, 4096):
            b = min(self.rows, a + 4096)
            out[a:b] = mask_block_counts(_unpack_masks(np.asarray(self._read("mask", slice(a, b))), self.mask_size), grid)
        return out, grid

    def sketch(self) -> StyleSketch | None:
        """The stored style sketch (possibly covering fewer rows than committed), or None."""
        info = self.manifest.get("sketch")
        if not info or info["group"] not in self._group:
            return None
        group = self._group[info["group"]]
        rows = min(info["rows"], self.rows)
        try:
            return StyleSketch(
                components=np.asarray(group["components"][:], np.float32),
                mean=np.asarray(group["mean"][:], np.float64),
                projections=np.asarray(group["projections"][:rows], np.float64),
                residuals=np.asarray(group["residuals"][:rows], np.float64),
                sq_norms=np.asarray(group["sq_norms"][:rows], np.float64),
                orthonormality_error=float(info["orthonormality_error"]),
            )
        except (KeyError, ValueError) as exc:
            raise StoreFormatError(f"{self.root}: style sketch is damaged ({exc})") from None

    # -- metadata ------------------------------------------------------------------------
    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The committed rows' metadata as one pyarrow Table, in row order."""
        tables = []
        for part in self.manifest["metadata_parts"]:
            if part["start"] >= self.rows:
                break
            try:
                table = pq.read_table(self.root / METADATA_DIR / part["file"], columns=columns)
            except (OSError, pa.ArrowInvalid) as exc:
                raise StoreFormatError(f"{self.root}: metadata part {part['file']} unreadable: {exc}") from None
            tables.append(table.slice(0, min(part["stop"], self.rows) - part["start"]))
        if not tables:
            names = list(columns) if columns is not None else ["row", "image_id", "path", "sha256"]
            return pa.table({c: pa.array([], pa.int64() if c == "row" else pa.string()) for c in names})
        table = pa.concat_tables(tables)
        if table.num_rows != self.rows:
            raise StoreFormatError(f"{self.root}: metadata has {table.num_rows} rows, manifest {self.rows}")
        return table

    # -- derived -----------------------------------------------------------------------
    def faiss_indexes(self) -> dict[str, faiss.Index]:
        """The FAISS indexes, read from disk when current, else rebuilt in memory from features."""
        recorded = self.manifest.get("faiss") or {}
        out = {}
        for name in FAISS_FILES:
            info = recorded.get(name)
            path = self.root / FAISS_FILES[name]
            if info and info.get("ntotal") == self.rows and path.is_file():
                try:
                    index = faiss.read_index(str(path))
                    if index.ntotal == self.rows:
                        out[name] = index
                        continue
                except RuntimeError:
                    pass
            out = {}
            break
        return out or _faiss_indexes_for(self.features())
