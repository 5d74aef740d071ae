"""The read side of a store: a snapshot of its committed rows.

Opening a store for reading never writes, deletes or moves anything. Every file it reads is
named by the validated manifest and resolved inside the store.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from numpy.typing import DTypeLike

from dermris.core.errors import ModelUnavailableError, StoreChangedError, StoreFormatError
from dermris.core.style_layout import StyleLayout
from dermris.models.presets import ModelConfig

from . import _zarr
from ._files import inside, manifest_stamp, read_manifest
from ._format import ARRAYS_DIR, METADATA_DIR, Manifest, RejectedFile, SketchInfo
from ._zstd import zarr_chunks_problem
from .codec import StyleCodec
from .mapped import MappedRows
from .rows import ShardedRows
from .sketch import MASK_GRID, StyleSketch, mask_block_counts

if TYPE_CHECKING:
    from dermris.models import DermrisModel

__all__ = ["Store", "store_exists", "unpack_masks"]

_CORE_ARRAYS = ("features", "style", "mask", "mask_area")

# Row numbers: a sequence of ints or an integer array.
Rows: TypeAlias = Sequence[int] | np.ndarray
_SWITCH_WAIT_SECONDS = 5.0


class _GenerationMismatch(Exception):
    """The arrays on disk belong to another manifest (a compaction is switching them)."""


def store_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a store manifest (it may still be damaged)."""
    return (Path(path) / "manifest.json").is_file()


def unpack_masks(packed: np.ndarray, size: int) -> np.ndarray:
    """Bit-packed rows ``(B, ceil(S*S/8))`` -> boolean masks ``(B, S, S)``."""
    return (
        np.unpackbits(packed, axis=1, count=size * size)
        .astype(bool)
        .reshape(len(packed), size, size)
    )


class Store:
    """Read-only view of a store's committed rows (a snapshot taken at :meth:`open`).

    Use :meth:`open`. Rows at or past :attr:`rows` (written by a run that has not committed
    yet) are invisible.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.rows: int = manifest.rows
        self._stamp = manifest_stamp(root)
        self._deleted = manifest.deleted_rows
        self.codec = StyleCodec(
            manifest.style.layout,
            manifest.style.scales or (1.0,) * len(manifest.style.layout.channels),
            manifest.style.dtype,
        )
        try:
            self._group = zarr.open_group(str(inside(root, ARRAYS_DIR, must_exist=True)), mode="r")
            found = {name: self._group[name] for name in _CORE_ARRAYS}
        except (KeyError, FileNotFoundError, ValueError, TypeError, OSError) as exc:
            raise StoreFormatError(f"{root}: arrays.zarr is missing or damaged ({exc})") from None
        if self._group.attrs.get("dermris_generation") != manifest.generation:
            raise _GenerationMismatch()
        # Stores written since every chunk is written (even all-zero ones) treat a missing chunk
        # as damage everywhere; older ones only where zeros are impossible (features, style).
        self.all_chunks_written = bool(self._group.attrs.get("dermris_all_chunks_written", False))
        spec = manifest.arrays
        expected: dict[str, tuple[tuple[int, ...], DTypeLike]] = {
            "features": ((spec.feature_dim,), np.float32),
            "style": ((spec.style_dim,), np.dtype(spec.style_dtype)),
            "mask": ((spec.mask_bytes,), np.uint8),
            "mask_area": ((), np.int32),
        }
        self._arrays: dict[str, zarr.Array[Any]] = {}
        for name, (tail, dtype) in expected.items():  # the keys of _CORE_ARRAYS
            arr = found[name]
            if (
                not isinstance(arr, zarr.Array)
                or arr.shape[0] < self.rows
                or tuple(arr.shape[1:]) != tail
                or arr.dtype != dtype
            ):
                shape = getattr(arr, "shape", "?")
                raise StoreFormatError(
                    f"{root}: array {name} has shape {shape} {getattr(arr, 'dtype', '')}, expected "
                    f"({self.rows}+, {', '.join(map(str, tail))}) {np.dtype(dtype)}"
                )
            self._arrays[name] = arr
            if name in ("features", "style") or self.all_chunks_written:
                self._check_chunk_files(name, arr, self.rows)
        arrays_dir = root / ARRAYS_DIR
        self._style_reader = ShardedRows.for_array(arrays_dir / "style", "style")
        self._mask_reader = ShardedRows.for_array(
            arrays_dir / "mask", "mask", missing_ok=not self.all_chunks_written
        )
        self._mask_chunks: dict[int, np.ndarray] = {}
        self._mapped: MappedRows | None = None
        self._areas: np.ndarray | None = None

    def _check_chunk_files(
        self, name: str, arr: zarr.Array, rows: int, *, path: str | None = None
    ) -> None:
        """Every chunk (or shard) file that holds committed rows must exist: zarr would read a
        missing one as its fill value, silently."""
        if rows == 0 or 0 in arr.shape:  # an empty array has no chunks
            return
        outer = arr.shards or arr.chunks
        array_dir = self.root / ARRAYS_DIR / (path or arr.path)
        for i in range((rows - 1) // outer[0] + 1):
            key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
            if not (array_dir / key).is_file():
                raise StoreFormatError(
                    f"{self.root}: array {name} is missing its chunk file {key} "
                    f"(rows {i * outer[0]} to {min(rows, (i + 1) * outer[0]) - 1})"
                )

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Store":
        """Open a store; raises :class:`StoreNotFoundError` or :class:`StoreFormatError`.

        A store in the middle of a compaction switch (another process renaming directories) is
        waited for a few seconds; a switch left unfinished by a crash is reported (the next
        writer command finishes it): reading never moves or deletes anything.
        """
        root = Path(root)
        deadline = time.monotonic() + _SWITCH_WAIT_SECONDS
        while True:
            try:
                return cls(root, read_manifest(root))
            except _GenerationMismatch:
                if time.monotonic() > deadline:
                    raise StoreFormatError(
                        f"{root} is in the middle of a compaction "
                        "(its manifest and arrays differ); "
                        f"run `dermris compact {root}` with write access to finish it"
                    ) from None
                time.sleep(0.05)

    # -- what the store is ---------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        """The config of the model that made the store."""
        return self.manifest.model.config

    @property
    def layout(self) -> StyleLayout:
        """Stage layout of the style vectors."""
        return self.manifest.style.layout

    @property
    def feature_dim(self) -> int:
        """Length of the feature vectors."""
        return self.manifest.arrays.feature_dim

    @property
    def style_dim(self) -> int:
        """Length ``D`` of the style vectors."""
        return self.manifest.arrays.style_dim

    @property
    def style_row_bytes(self) -> int:
        """Bytes of one stored style row."""
        return self.manifest.arrays.style_row_bytes

    @property
    def mask_size(self) -> int:
        """Side ``S`` of the stored masks."""
        return self.manifest.arrays.mask_size

    @property
    def mask_row_bytes(self) -> int:
        """Bytes of one bit-packed mask row."""
        return self.manifest.arrays.mask_bytes

    @property
    def rejected(self) -> tuple[RejectedFile, ...]:
        """Files indexing runs could not index."""
        return self.manifest.rejected

    @property
    def sketch_info(self) -> SketchInfo | None:
        """The derived style sketch's description, if built."""
        return self.manifest.sketch

    # -- deletions -------------------------------------------------------------------------
    @property
    def deleted_rows(self) -> np.ndarray:
        """Rows deleted as of the last :meth:`poll_deletions` (or :meth:`open`), sorted."""
        return self._deleted

    @property
    def live(self) -> np.ndarray:
        """Boolean ``(N,)``: rows not deleted."""
        live = np.ones(self.rows, bool)
        live[self._deleted] = False
        return live

    def poll_deletions(self) -> np.ndarray | None:
        """Pick up deletions committed since the last call (rows themselves stay a snapshot).

        Returns
        -------
        np.ndarray or None
            The rows deleted now, when the manifest on disk changed; None when it did not.

        Raises
        ------
        StoreChangedError
            The store was compacted since it was opened: its rows were renumbered, so this
            snapshot can no longer read them (reopen the store).
        """
        stamp = manifest_stamp(self.root)
        if stamp == self._stamp:
            return None
        if stamp is None:
            raise StoreChangedError(f"{self.root} is gone or being compacted; reopen it")
        try:
            manifest = read_manifest(self.root)
        except StoreFormatError:
            return None  # a damaged manifest keeps the snapshot's deletions
        if manifest.generation != self.manifest.generation:
            raise StoreChangedError(
                f"{self.root} was compacted since it was opened (rows were renumbered); reopen it"
            )
        self._stamp = stamp
        deleted = np.array(
            sorted({d.row for d in manifest.deleted if d.row < self.rows}), dtype=np.int64
        )
        self._deleted = np.union1d(self._deleted, deleted).astype(np.int64)
        return self._deleted

    # -- the model -----------------------------------------------------------------------
    @property
    def segmenter_trained(self) -> bool:
        """Whether the masks come from a trained segmenter.

        False for an untrained one (every preset's, until ``dermris train segmenter``): its
        masks are noise and so is the Dice part of the ``i1_*`` measures that use it. Stores
        made before the manifest recorded it read as untrained.
        """
        return bool(self.manifest.model.segmenter_trained)

    @property
    def has_model(self) -> bool:
        """Whether the store carries the model that made it (needed for image queries)."""
        return self.manifest.model.weights_file is not None

    def load_model(self, *, progress=None) -> "DermrisModel":
        """Load the stored model after checking its sha256 against the manifest.

        ``progress`` is told of every step (:data:`dermris.models.weights.Progress`).

        Raises
        ------
        ModelUnavailableError
            The store carries no model.
        StoreFormatError
            The model file is missing or does not match its checksum.
        """
        from dermris.core.hashing import file_sha256
        from dermris.models.weights import load_model

        path, sha256 = self.model_file()
        if sha256 and file_sha256(path) != sha256:
            raise StoreFormatError(f"{path} does not match the sha256 in the manifest")
        return load_model(path, progress=progress)

    def model_file(self) -> tuple[Path, str | None]:
        """The stored model's file (an absolute path inside the store) and its sha256 from the
        manifest, for processes that load the model themselves (cluster workers).

        Raises
        ------
        ModelUnavailableError
            The store carries no model.
        StoreFormatError
            The model file is missing.
        """
        record = self.manifest.model
        if record.weights_file is None:
            raise ModelUnavailableError(
                f"{self.root} holds no model file, so image queries cannot be embedded; "
                "query stored rows instead"
            )
        path = inside(self.root, record.weights_file)
        if not path.is_file():
            raise StoreFormatError(f"{self.root}: {record.weights_file} is missing")
        return Path(os.path.abspath(path)), record.weights_sha256

    # -- arrays --------------------------------------------------------------------------
    def _bounded(self, name: str, arr: zarr.Array, start: int, stop: int) -> None:
        """Refuse to let zarr decompress a chunk whose zstd frame states another size than the
        chunk has (zarr would allocate whatever the frame says before checking)."""
        problem = zarr_chunks_problem(self.root / ARRAYS_DIR / arr.path, arr, start, stop)
        if problem is not None:
            raise StoreFormatError(f"{self.root}: array {name} is damaged: {problem}")

    def _read(self, name: str, selection):
        """Read from an array, turning damaged chunks into :class:`StoreFormatError`."""
        if isinstance(selection, slice):
            self._bounded(name, self._arrays[name], selection.start or 0, selection.stop)
        else:
            self._bounded(name, self._arrays[name], int(selection), int(selection) + 1)
        try:
            return self._arrays[name][selection]
        except (ValueError, OSError, RuntimeError, KeyError) as exc:
            raise StoreFormatError(
                f"{self.root}: array {name} is damaged at {selection!r}: {exc}"
            ) from None

    def _check_rows(self, rows: Rows) -> None:
        for row in rows:
            if not 0 <= row < self.rows:
                raise IndexError(f"row {row} is not committed (store has {self.rows} rows)")

    def features(self) -> np.ndarray:
        """All committed features, ``(N, F)`` float32."""
        return np.asarray(self._read("features", slice(0, self.rows)), np.float32)

    def masks(self) -> np.ndarray:
        """All committed bit-packed masks, ``(N, ceil(S*S/8))`` uint8 (checked against
        ``mask_area``)."""
        if self._mask_reader is not None:
            masks = self._mask_reader.read_range(0, self.rows)
        else:
            masks = np.asarray(self._read("mask", slice(0, self.rows)), np.uint8)
        return self._verified_masks(np.arange(self.rows), masks)

    def mask_areas(self) -> np.ndarray:
        """Lesion pixel count of every committed mask, ``(N,)`` int64."""
        return np.asarray(self._read("mask_area", slice(0, self.rows)), np.int64)

    def style_block(self, start: int, stop: int) -> np.ndarray:
        """Decoded style vectors of rows ``[start, stop)``, float32."""
        stop = min(stop, self.rows)
        return self.codec.decode(self._read("style", slice(start, stop)))

    def mapped_style(self) -> MappedRows | None:
        """The style rows as memory-mapped shard views (shared by every process through the
        page cache), or None when the array's layout cannot be mapped (then read rows by
        bytes)."""
        if self._style_reader is None or self._style_reader.zstd:
            return None
        if self._mapped is None:
            self._mapped = MappedRows(self._style_reader, self.rows)
        return self._mapped

    def stored_style_rows(self, rows: Rows) -> np.ndarray:
        """Style rows as stored (float16 by default, undecoded), read by bytes: one request per
        run of adjacent rows of a shard, every checksum verified."""
        self._check_rows(rows)
        if self._style_reader is not None:
            return self._style_reader.read(rows)
        out = np.empty((len(rows), self.style_dim), self.manifest.arrays.style_dtype)
        for i, row in enumerate(rows):
            out[i] = self._read("style", int(row))
        return out

    def style_rows(self, rows: Rows) -> np.ndarray:
        """Decoded style vectors of the given rows, float32."""
        return self.codec.decode(self.stored_style_rows(rows))

    def iter_style_blocks(
        self, *, start: int = 0, max_bytes: int = 64 << 20, stored: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` over committed rows from ``start``, shard-aligned blocks of
        about ``max_bytes`` (decoded float32, or as stored with ``stored=True``)."""
        shard = self.manifest.arrays.style_shard_rows
        per_row = self.style_dim * 4
        block = max(shard, (max_bytes // per_row) // shard * shard)
        first = start
        while first < self.rows:
            stop = min(self.rows, (first // block + 1) * block)
            if self._style_reader is not None:
                raw = self._style_reader.read_range(first, stop)
            else:
                raw = self._read("style", slice(first, stop))
            yield first, (raw if stored else self.codec.decode(raw))
            first = stop

    def mask_rows(self, rows: Rows) -> np.ndarray:
        """Bit-packed masks of the given rows, ``(len(rows), ceil(S*S/8))`` uint8.

        Stores whose masks are chunked one row per chunk are read by bytes; older stores (256
        rows per compressed chunk) decompress each chunk once and keep the last few.
        """
        self._check_rows(rows)
        if self._mask_reader is not None:
            return self._verified_masks(rows, self._mask_reader.read(rows))
        arr = self._arrays["mask"]
        chunk = arr.chunks[0]
        out = np.empty((len(rows), self.mask_row_bytes), np.uint8)
        for i, row in enumerate(rows):
            c = int(row) // chunk
            block = self._mask_chunks.get(c)
            if block is None:
                block = np.asarray(
                    self._read("mask", slice(c * chunk, min(self.rows, (c + 1) * chunk))), np.uint8
                )
                if len(self._mask_chunks) >= 64:
                    self._mask_chunks.pop(next(iter(self._mask_chunks)))
                self._mask_chunks[c] = block
            out[i] = block[int(row) - c * chunk]
        return self._verified_masks(rows, out)

    def _verified_masks(self, rows, masks: np.ndarray) -> np.ndarray:
        """Masks whose lesion pixel count disagrees with ``mask_area`` are damaged (a missing
        chunk, read as zeros, is the usual cause)."""
        areas = self._mask_areas()[np.asarray(rows, np.int64)]
        counts = np.bitwise_count(masks).sum(axis=1, dtype=np.int64)
        bad = np.flatnonzero(counts != areas)
        if len(bad):
            row = int(np.asarray(rows)[bad[0]])
            raise StoreFormatError(
                f"{self.root}: array mask is damaged at row {row} "
                f"({counts[bad[0]]} lesion pixels, mask_area says {areas[bad[0]]})"
            )
        return masks

    def _mask_areas(self) -> np.ndarray:
        if self._areas is None:
            self._areas = self.mask_areas()
        return self._areas

    def mask_blocks(self) -> tuple[np.ndarray, int]:
        """Per-row lesion pixel counts on the block grid, and the grid size.

        Computed from the masks when the store predates the ``mask_blocks`` array.
        """
        grid = self.manifest.arrays.mask_grid
        if grid is not None and "mask_blocks" in self._group:
            arr = self._group["mask_blocks"]
            if (
                isinstance(arr, zarr.Array)
                and arr.shape[0] >= self.rows
                and arr.shape[1:] == (grid * grid,)
            ):
                if self.all_chunks_written:
                    self._check_chunk_files("mask_blocks", arr, self.rows)
                self._bounded("mask_blocks", arr, 0, self.rows)
                try:
                    return np.asarray(arr[: self.rows], np.int32), grid
                except (ValueError, OSError, RuntimeError) as exc:
                    raise StoreFormatError(
                        f"{self.root}: array mask_blocks is damaged: {exc}"
                    ) from None
        grid = MASK_GRID if self.mask_size % MASK_GRID == 0 else 1
        out = np.zeros((self.rows, grid * grid), np.int32)
        for a in range(0, self.rows, 4096):
            b = min(self.rows, a + 4096)
            packed = (
                self._mask_reader.read_range(a, b)
                if self._mask_reader is not None
                else np.asarray(self._read("mask", slice(a, b)))
            )
            out[a:b] = mask_block_counts(unpack_masks(packed, self.mask_size), grid)
        return out, grid

    def sketch(self) -> StyleSketch | None:
        """The stored style sketch (possibly covering fewer rows than committed), or None."""
        info = self.manifest.sketch
        if info is None or info.group not in self._group:
            return None
        group = _zarr.group(self._group, info.group)
        rows = min(info.rows, self.rows)
        try:
            if group.attrs.get("dermris_all_chunks_written", False):
                for key, n in (
                    ("components", info.dim),
                    ("mean", 1),
                    ("projections", rows),
                    ("residuals", rows),
                    ("sq_norms", rows),
                ):
                    self._check_chunk_files(
                        f"{info.group}/{key}",
                        _zarr.array(group, key),
                        n,
                        path=f"{info.group}/{key}",
                    )
            sketch = StyleSketch(
                components=np.asarray(_zarr.array(group, "components")[:], np.float32),
                mean=np.asarray(_zarr.array(group, "mean")[:], np.float64),
                projections=np.asarray(_zarr.array(group, "projections")[:rows], np.float64),
                residuals=np.asarray(_zarr.array(group, "residuals")[:rows], np.float64),
                sq_norms=np.asarray(_zarr.array(group, "sq_norms")[:rows], np.float64),
                orthonormality_error=info.orthonormality_error,
            )
        except (KeyError, ValueError, OSError, RuntimeError, TypeError) as exc:
            raise StoreFormatError(f"{self.root}: style sketch is damaged ({exc})") from None
        if (
            sketch.components.shape != (info.dim, self.style_dim)
            or sketch.mean.shape != (self.style_dim,)
            or sketch.projections.shape != (rows, info.dim)
            or sketch.residuals.shape != (rows,)
        ):
            raise StoreFormatError(f"{self.root}: style sketch arrays do not match the manifest")
        return sketch

    # -- metadata ------------------------------------------------------------------------
    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The committed rows' metadata as one pyarrow Table, in row order."""
        tables = []
        for part in self.manifest.metadata_parts:
            if part.start >= self.rows:
                break
            path = inside(self.root, f"{METADATA_DIR}/{part.file}")
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StoreFormatError(
                    f"{self.root}: metadata part {part.file} unreadable: {exc.strerror or exc}"
                ) from None
            if part.sha256 and hashlib.sha256(data).hexdigest() != part.sha256:
                raise StoreFormatError(
                    f"{self.root}: metadata part {part.file} does not match its sha256"
                )
            try:
                table = pq.read_table(
                    pa.BufferReader(data), columns=list(columns) if columns is not None else None
                )
            except (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
                raise StoreFormatError(
                    f"{self.root}: metadata part {part.file} unreadable: {exc}"
                ) from None
            tables.append(table.slice(0, min(part.stop, self.rows) - part.start))
        if not tables:
            names = list(columns) if columns is not None else ["row", "image_id", "path", "sha256"]
            return pa.table(
                {c: pa.array([], pa.int64() if c == "row" else pa.string()) for c in names}
            )
        try:  # parts written before a column was added read it as null
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise StoreFormatError(
                f"{self.root}: metadata parts disagree on their columns: {exc}"
            ) from None
        if table.num_rows != self.rows:
            raise StoreFormatError(
                f"{self.root}: metadata has {table.num_rows} rows, manifest {self.rows}"
            )
        return table

    def metadata_schema(self) -> pa.Schema:
        """Columns and types of the metadata, unified over all parts (reads no rows)."""
        if not self.manifest.metadata_parts:
            return self.metadata().schema
        schemas = []
        for part in self.manifest.metadata_parts:
            try:
                schemas.append(pq.read_schema(inside(self.root, f"{METADATA_DIR}/{part.file}")))
            except (OSError, pa.ArrowInvalid) as exc:
                raise StoreFormatError(
                    f"{self.root}: metadata part {part.file} unreadable: {exc}"
                ) from None
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise StoreFormatError(
                f"{self.root}: metadata parts disagree on their columns: {exc}"
            ) from None

    # -- summary -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary of what the store holds (``dermris info``)."""
        m = self.manifest
        cfg = m.model.config
        return {
            "store": str(self.root),
            "format_version": 1,
            "rows": self.rows,
            "deleted": int(len(self.deleted_rows)),
            "preset": cfg.name,
            "backbone": cfg.backbone,
            "members": cfg.members,
            "backbone_source": cfg.backbone_source,
            "image_size": cfg.image_size,
            "segmenter": cfg.segmenter.arch,
            "segmenter_trained": self.segmenter_trained,
            "feature_dim": self.feature_dim,
            "style_dim": self.style_dim,
            "style_dtype": m.style.dtype,
            "style_stage_channels": list(self.layout.channels),
            "style_clipped_values": m.style.clipped_values,
            "mask_size": self.mask_size,
            "weights_sha256": m.model.weights_sha256,
            "metadata_columns": self.metadata_schema().names,
            "faiss_files": (
                {p.name: p.stop for p in m.faiss_parts} | {f.name: f.ntotal for f in m.faiss}
            )
            if (m.faiss_files or m.faiss)
            else None,
            "sketch_dim": m.sketch.dim if m.sketch else None,
            "rejected": len(m.rejected),
            "created": m.created,
            "updated": m.updated,
        }
