"""The write side of a store: creation, appending committed rows, deletion marks, derived data.

One writer at a time (:class:`~._files.WriterLock`). Every :meth:`StoreWriter.append` writes
the arrays, then a Parquet part, fsyncs exactly the files it wrote, and then commits by
renaming a new manifest into place.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.codecs

from dermris.core.atomic import atomic_path, fsync_dir, fsync_file
from dermris.core.errors import ConfigError, StoreExistsError, StoreFormatError, StoreMismatchError
from dermris.core.hashing import file_sha256
from dermris.core.style_layout import StyleLayout
from dermris.models.presets import ModelConfig

from . import _zarr
from ._files import WriterLock, inside, read_manifest, write_manifest
from ._format import (
    ARRAYS_DIR,
    FAISS_DIR,
    MANIFEST_NAME,
    METADATA_DIR,
    MODEL_FILE,
    STYLE_DTYPES,
    ArraySpec,
    DeletedImage,
    Manifest,
    MetadataPart,
    ModelRecord,
    RejectedFile,
    StyleInfo,
    now,
)
from ._zstd import zarr_chunks_problem
from .codec import StyleCodec
from .derived import update_sketch, write_faiss_parts
from .reader import Store, unpack_masks
from .recovery import finish_compaction, remove_uncommitted_files
from .schema import CORE_COLUMNS, CORE_SCHEMA
from .sketch import MASK_GRID, mask_block_counts

if TYPE_CHECKING:
    from dermris.models import DermrisModel

__all__ = ["StoreWriter"]

_STYLE_SHARD_BYTES = 32 << 20
_CREATE_DIR = ".create"


def _checksummed(zstd: bool = False) -> list:
    """Chunk codecs: optional zstd, then a crc32c checksum so damaged chunks are detected."""
    codecs = [zarr.codecs.ZstdCodec(level=3)] if zstd else []
    return codecs + [zarr.codecs.Crc32cCodec()]


def _fsync_rows(array_dir: Path, arr: zarr.Array, start: int, stop: int) -> None:
    """fsync the chunk (or shard) files holding rows ``[start, stop)`` and the array's metadata."""
    outer = arr.shards or arr.chunks
    for i in range(start // outer[0], (stop - 1) // outer[0] + 1):
        key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        path = array_dir / key
        if path.is_file():
            fsync_file(path)
            fsync_dir(path.parent)
    fsync_file(array_dir / "zarr.json")


def _initialise_arrays(
    root: Path, model_config: ModelConfig, layout: StyleLayout, style_dtype: str, generation: str
) -> ArraySpec:
    feature_dim = model_config.feature_dim
    size = model_config.mask_size
    mask_bytes = (size * size + 7) // 8
    dim = layout.dim
    shard_rows = max(1, min(1024, _STYLE_SHARD_BYTES // (dim * np.dtype(style_dtype).itemsize)))
    grid = MASK_GRID if size % MASK_GRID == 0 else 1
    group = zarr.open_group(str(root / ARRAYS_DIR), mode="w")
    # Every chunk is written, even one equal to the fill value, so that a missing chunk file is
    # always damage (zarr would read it as zeros).
    every: dict[str, Any] = {"config": {"write_empty_chunks": True}, "fill_value": 0}
    group.create_array(
        "features",
        shape=(0, feature_dim),
        dtype="float32",
        chunks=(max(1, (4 << 20) // (4 * feature_dim)), feature_dim),
        compressors=_checksummed(),
        **every,
    )
    group.create_array(
        "style",
        shape=(0, dim),
        dtype=style_dtype,
        chunks=(1, dim),
        shards=(shard_rows, dim),
        compressors=_checksummed(),
        **every,
    )
    # one mask per chunk (so reading a row never decompresses others), 1,024 per shard file
    group.create_array(
        "mask",
        shape=(0, mask_bytes),
        dtype="uint8",
        chunks=(1, mask_bytes),
        shards=(1024, mask_bytes),
        compressors=_checksummed(zstd=True),
        **every,
    )
    group.create_array(
        "mask_area",
        shape=(0,),
        dtype="int32",
        chunks=(1 << 16,),
        compressors=_checksummed(zstd=True),
        **every,
    )
    group.create_array(
        "mask_blocks",
        shape=(0, grid * grid),
        dtype="int32",
        chunks=(1 << 12, grid * grid),
        compressors=_checksummed(zstd=True),
        **every,
    )
    group.attrs["dermris_format_version"] = 1
    group.attrs["dermris_generation"] = generation
    group.attrs["dermris_all_chunks_written"] = True
    return ArraySpec(
        feature_dim=feature_dim,
        style_dim=dim,
        style_dtype=style_dtype,
        style_shard_rows=shard_rows,
        mask_size=size,
        mask_bytes=mask_bytes,
        mask_grid=grid,
    )


def initialise_store(
    root: Path,
    model_config: ModelConfig,
    layout: StyleLayout,
    *,
    style_dtype: str,
    model_record: ModelRecord,
    created: str | None = None,
) -> Manifest:
    """Create the empty arrays and directories of a store in ``root`` and write its manifest."""
    (root / METADATA_DIR).mkdir()
    (root / FAISS_DIR).mkdir()
    generation = uuid.uuid4().hex
    arrays = _initialise_arrays(root, model_config, layout, style_dtype, generation)
    manifest = Manifest(
        rows=0,
        model=model_record,
        arrays=arrays,
        style=StyleInfo(layout=layout, scales=None, dtype=style_dtype),
        created=created or now(),
        generation=generation,
    )
    return write_manifest(root, manifest)


class StoreWriter:
    """Appends committed batches of rows to a store (one writer at a time).

    Use :meth:`create` for a new store and :meth:`open` to append to an existing one.
    Every :meth:`append` writes the arrays, then a Parquet part, then the manifest: the
    manifest rename is the commit.
    """

    def __init__(self, root: Path, *, lock: WriterLock | None = None) -> None:
        self.root = root
        self._lock = lock or WriterLock(root)
        try:
            finish_compaction(
                root
            )  # an interrupted compaction is finished (or cleared) under the lock
            self.manifest = read_manifest(root)
            remove_uncommitted_files(root, self.manifest)
            self._load()
        except BaseException:
            self._lock.release()
            raise

    def reload(self) -> None:
        """Re-read the manifest and what the writer derives from it (after a compaction)."""
        self.manifest = read_manifest(self.root)
        self._load()

    def _load(self) -> None:
        """Set what the writer derives from the manifest (on open, and after compaction)."""
        m = self.manifest
        try:
            self._group = zarr.open_group(
                str(inside(self.root, ARRAYS_DIR, must_exist=True)), mode="r+"
            )
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise StoreFormatError(
                f"{self.root}: arrays.zarr is missing or damaged ({exc})"
            ) from None
        self.codec = (
            StyleCodec(m.style.layout, m.style.scales, m.style.dtype) if m.style.scales else None
        )
        self._schema: pa.Schema | None = (
            Store(self.root, m).metadata_schema() if m.metadata_parts else None
        )

    @property
    def rows(self) -> int:
        """Committed row count."""
        return self.manifest.rows

    @property
    def layout(self) -> StyleLayout:
        """Stage layout of the style vectors."""
        return self.manifest.style.layout

    @property
    def model_config(self) -> ModelConfig:
        """The config of the model that made the store."""
        return self.manifest.model.config

    @property
    def keeps_faiss_files(self) -> bool:
        """Whether the store keeps FAISS files of its features (asked for once, or an older
        store that has whole-store files)."""
        return self.manifest.faiss_files or bool(self.manifest.faiss)

    @property
    def removed_sha256(self) -> frozenset[str]:
        """sha256 of images deleted from the store (re-indexing does not add them back)."""
        return self.manifest.removed_sha256

    def reader(self) -> Store:
        """A read-only snapshot of the committed rows."""
        return Store(self.root, self.manifest)

    def _commit(self, manifest: Manifest) -> None:
        self.manifest = write_manifest(self.root, manifest)

    def close(self) -> None:
        """Release the writer lock (also released when the process ends)."""
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        *,
        model_config: ModelConfig,
        style_layout: StyleLayout,
        model: "DermrisModel | None" = None,
        style_dtype: str = "float16",
        segmenter_trained: bool | None = None,
    ) -> "StoreWriter":
        """Create an empty store, with ``model`` saved as ``STORE/model.safetensors``.

        Everything is written into a private staging folder first and moved into place with
        the manifest last, so an interrupted creation leaves no half store.

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
        segmenter_trained : bool, optional
            Whether the masks come from a trained segmenter (recorded in the manifest's model
            record); default: ``model.segmenter_trained``, or not recorded without a model.

        Raises
        ------
        StoreExistsError
            If ``root`` holds anything else.
        """
        root = Path(root)
        if style_dtype not in STYLE_DTYPES:
            raise ConfigError(f"style dtype must be float16 or float32, not {style_dtype!r}")
        root.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(root)
        try:
            others = [p.name for p in root.iterdir() if p.name not in (_CREATE_DIR, ".writer.lock")]
            if others:
                raise StoreExistsError(
                    f"{root} exists and is not empty"
                    + (" (it is a store)" if MANIFEST_NAME in others else "")
                )
            staging = root / _CREATE_DIR
            if staging.is_symlink():
                staging.unlink()
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            weights_sha256 = None
            if model is not None:
                from dermris.models.weights import save_model

                weights_sha256 = save_model(model, staging / MODEL_FILE)
            if segmenter_trained is None and model is not None:
                segmenter_trained = bool(model.segmenter_trained)
            record = ModelRecord(
                model_config,
                MODEL_FILE if weights_sha256 else None,
                weights_sha256,
                segmenter_trained,
            )
            initialise_store(
                staging, model_config, style_layout, style_dtype=style_dtype, model_record=record
            )
            for child in sorted(staging.iterdir()):
                if child.name != MANIFEST_NAME:
                    os.replace(child, root / child.name)
            fsync_dir(root)
            os.replace(staging / MANIFEST_NAME, root / MANIFEST_NAME)
            staging.rmdir()
            fsync_dir(root)
            return cls(root, lock=lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, root: str | os.PathLike) -> "StoreWriter":
        """Open an existing store for appending; rows past the commit point are overwritten."""
        return cls(Path(root))

    # -- the model -----------------------------------------------------------------------
    def check_model(self, model: "DermrisModel") -> None:
        """Raise :class:`StoreMismatchError` unless ``model`` computes what the store's model does.

        Models are compared by what they compute (config and every tensor), not by the bytes
        of their files.
        """
        from dermris.models.weights import models_compute_alike

        stored = self.manifest.model.config
        if stored.to_dict() != model.config.to_dict():
            raise StoreMismatchError(
                f"{self.root} was built with model config {stored.name!r} ({stored.backbone}), not "
                f"{model.config.name!r} ({model.config.backbone}); use another store path"
            )
        if not models_compute_alike(self.load_model(), model):
            raise StoreMismatchError(
                f"{self.root} was built with other model weights; use another store path"
            )

    def load_model(self, *, progress=None) -> "DermrisModel":
        """The model stored with the store (checksum verified; ``progress`` as
        :meth:`Store.load_model`)."""
        return self.reader().load_model(progress=progress)

    # -- rows ----------------------------------------------------------------------------
    def committed_metadata(self, columns: Sequence[str]) -> pa.Table:
        """Some metadata columns of the committed rows (to skip images already indexed)."""
        return self.reader().metadata(columns=columns)

    def fit_codec(self, style: np.ndarray) -> StyleCodec:
        """The store's float16 codec, fitted on ``style`` (a first batch) if it has none yet.

        The scales are committed with the first rows.
        """
        if self.codec is None:
            self.codec = StyleCodec.fit(
                style, self.manifest.style.layout, self.manifest.style.dtype
            )
        return self.codec

    def append(
        self,
        *,
        features: np.ndarray,
        masks: np.ndarray,
        records: pa.Table,
        style: np.ndarray | None = None,
        encoded_style: np.ndarray | None = None,
        clipped: int = 0,
    ) -> range:
        """Write and commit a batch of rows.

        Parameters
        ----------
        features : np.ndarray
            ``(B, F)`` float.
        style : np.ndarray
            ``(B, D)`` float32 style vectors (encoded here), or
        encoded_style : np.ndarray
            the same already encoded with this store's codec (:meth:`fit_codec`), with
        clipped : int
            the number of values its encoding clipped.
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
        spec = self.manifest.arrays
        if (style is None) == (encoded_style is None):
            raise ValueError("give either style or encoded_style")
        given = style if style is not None else encoded_style
        assert given is not None  # exactly one of the two is given
        if not (len(given) == len(masks) == records.num_rows == b):
            raise ValueError("features, style, masks and records must have the same length")
        if b == 0:
            return range(self.rows, self.rows)
        features = np.asarray(features, np.float32)
        if features.shape[1:] != (spec.feature_dim,) or given.shape[1:] != (spec.style_dim,):
            raise ValueError("feature or style width does not fit the store")
        size = spec.mask_size
        if masks.dtype == bool:
            if masks.shape[1:] != (size, size):
                raise ValueError(f"masks must be {size}x{size}")
            packed = np.packbits(masks.reshape(b, -1), axis=1)
        else:
            packed = np.asarray(masks, np.uint8)
            if packed.shape[1:] != (spec.mask_bytes,):
                raise ValueError("packed masks do not fit the store")
            masks = unpack_masks(packed, size)
        areas = masks.reshape(b, -1).sum(axis=1).astype(np.int32)
        blocks = mask_block_counts(masks, spec.mask_grid) if spec.mask_grid is not None else None
        m = self.manifest
        if style is not None:
            encoded, clipped = self.fit_codec(style).encode(style)
        elif self.codec is None:
            raise ValueError("encoded_style needs the store's codec: call fit_codec first")
        else:
            encoded = np.asarray(encoded_style, dtype=spec.style_dtype)
        if m.style.scales is None:
            assert self.codec is not None  # fit_codec set it
            m = m.replace(style=dataclasses.replace(m.style, scales=self.codec.stage_scales))
        table = self._with_row_column(records, self.rows)

        n0, n1 = self.rows, self.rows + b
        arrays_dir = self.root / ARRAYS_DIR
        columns = [
            ("features", features),
            ("style", encoded),
            ("mask", packed),
            ("mask_area", areas),
        ]
        if blocks is not None:
            columns.append(("mask_blocks", blocks))
        with zarr.config.set(
            {"array.write_empty_chunks": True}
        ):  # a missing chunk is always damage
            for name, data in columns:
                arr = _zarr.array(self._group, name)
                # zarr decompresses the chunk the new rows share with older ones: bounded first
                # (a shard's one-row chunks are replaced whole, never decompressed)
                problem = (
                    zarr_chunks_problem(arrays_dir / name, arr, n0, n1)
                    if arr.shards is None
                    else None
                )
                if problem is not None:
                    raise StoreFormatError(f"{self.root}: array {name} is damaged: {problem}")
                arr.resize((n1, *arr.shape[1:]))
                arr[n0:n1] = data
        for name, _ in columns:  # the chunks reach the disk before the manifest that commits them
            _fsync_rows(arrays_dir / name, _zarr.array(self._group, name), n0, n1)

        part = f"rows-{n0:012d}-{n1:012d}.parquet"
        target = inside(self.root, f"{METADATA_DIR}/{part}")
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp)
        parts = m.metadata_parts + (MetadataPart(part, n0, n1, file_sha256(target)),)
        style_info = dataclasses.replace(m.style, clipped_values=m.style.clipped_values + clipped)
        # an older store's whole-store FAISS files no longer cover the rows: replaced by parts later
        self._commit(
            m.replace(
                rows=n1,
                metadata_parts=parts,
                style=style_info,
                faiss=(),
                faiss_files=m.faiss_files or bool(m.faiss),
            )
        )
        return range(n0, n1)

    def prepare_metadata(self, user_schema: pa.Schema | None) -> tuple[pa.Schema, list[str]]:
        """Agree, before any image is embedded, on the columns new rows will be written with.

        Columns the store has and the new rows lack are filled with nulls; columns the new rows
        bring are added (older rows read them as null); a column whose types cannot be unified
        (text in the store, numbers in the CSV is fine; numbers in the store, text in the CSV is
        not) is refused.

        Parameters
        ----------
        user_schema : pyarrow.Schema or None
            The metadata CSV's columns (None: no CSV).

        Returns
        -------
        (pyarrow.Schema, list of str)
            The schema of new parts, and the store's user columns the new rows will leave null.

        Raises
        ------
        StoreMismatchError
            A column's type cannot be reconciled.
        """
        new = pa.schema(
            list(CORE_SCHEMA) + [f for f in (user_schema or []) if f.name not in CORE_COLUMNS]
        )
        stored = self._schema
        if stored is None:
            self._schema = new
            return new, []
        fields = {f.name: f for f in stored}
        for field in new:
            old = fields.get(field.name)
            if old is None or old.type == field.type:
                fields.setdefault(field.name, field)
                continue
            if pa.types.is_string(old.type) or pa.types.is_large_string(old.type):
                continue  # anything can be written as text
            try:
                unified = pa.unify_schemas(
                    [pa.schema([old]), pa.schema([field])], promote_options="permissive"
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                unified = None
            if unified is None or (
                pa.types.is_string(field.type) and not pa.types.is_string(old.type)
            ):
                raise StoreMismatchError(
                    f"metadata column {field.name!r} holds {old.type} in the store "
                    f"but {field.type} in the CSV; "
                    "fix the CSV or index into a new store"
                )
            fields[field.name] = unified.field(0)
        missing = [n for n in stored.names if n not in new.names]
        self._schema = pa.schema(list(fields.values()))
        return self._schema, missing

    def _with_row_column(self, records: pa.Table, start: int) -> pa.Table:
        rows = pa.array(np.arange(start, start + records.num_rows, dtype=np.int64))
        table = records.add_column(0, "row", rows) if "row" not in records.column_names else records
        if self._schema is None:
            self.prepare_metadata(
                pa.schema([f for f in table.schema if f.name not in CORE_COLUMNS])
            )
        assert self._schema is not None  # prepare_metadata set it
        columns = []
        try:
            for field in self._schema:
                if field.name in table.column_names:
                    columns.append(table.column(field.name).cast(field.type))
                else:
                    columns.append(pa.nulls(table.num_rows, field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise StoreMismatchError(
                f"metadata columns do not fit the store's ({exc}); index into a new store"
            ) from None
        return pa.Table.from_arrays(columns, schema=self._schema)

    def record_rejected(self, rejected: Sequence[tuple[str, str]]) -> None:
        """Record files that were not indexed (path, reason) and rewrite the manifest."""
        if not rejected:
            return
        known = {r.path for r in self.manifest.rejected}
        added = []
        for path, reason in rejected:
            if path not in known:
                added.append(RejectedFile(path, reason))
                known.add(path)
        if added:
            self._commit(self.manifest.replace(rejected=self.manifest.rejected + tuple(added)))

    def delete(
        self, image_ids: Sequence[str], *, missing_ok: bool = True
    ) -> tuple[list[int], list[str]]:
        """Mark images as deleted: from this commit on no search returns them and they no longer
        count in any normaliser. :meth:`compact` removes them physically.

        Parameters
        ----------
        image_ids : sequence of str
            Image ids to delete.
        missing_ok : bool
            Skip ids that are not (or no longer) in the store; when False such an id refuses
            the whole deletion (:class:`StoreMismatchError`, nothing deleted).

        Returns
        -------
        (list of int, list of str)
            The rows deleted now, and the ids that are not (or no longer) in the store.
        """
        meta = self.reader().metadata(columns=["row", "image_id", "sha256"])
        by_id = {
            i: (r, sha)
            for r, i, sha in zip(
                meta.column("row").to_pylist(),
                meta.column("image_id").to_pylist(),
                meta.column("sha256").to_pylist(),
            )
        }
        already = {d.row for d in self.manifest.deleted}
        rows, unknown, marks = [], [], []
        for image_id in dict.fromkeys(image_ids):
            hit = by_id.get(image_id)
            if hit is None or hit[0] in already:
                unknown.append(image_id)
                continue
            rows.append(hit[0])
            already.add(hit[0])
            marks.append(DeletedImage(hit[0], image_id, hit[1], now()))
        if unknown and not missing_ok:
            shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
            raise StoreMismatchError(
                f"{len(unknown)} ids are not in {self.root} (or already deleted): {shown}; "
                "nothing was deleted (--missing-ok skips them)"
            )
        if marks:
            self._commit(self.manifest.replace(deleted=self.manifest.deleted + tuple(marks)))
        return rows, unknown

    # -- derived data --------------------------------------------------------------------
    def update_faiss_files(self, *, enable: bool = False, rewrite: bool = False) -> None:
        """Bring the store's FAISS files up to the committed rows, if it keeps them.

        Only the rows no part covers yet are written, as one new part per index (plain FAISS
        files, ids = rows); nothing already written is rewritten unless ``rewrite``. An older
        store's whole-store files are replaced by parts once.

        Parameters
        ----------
        enable : bool
            Start keeping FAISS files (recorded in the manifest; later runs keep them current).
        rewrite : bool
            Write every index anew, as one part (``dermris rebuild``).
        """
        m = self.manifest
        if not (enable or self.keeps_faiss_files):
            return
        start_over = rewrite or bool(m.faiss)
        parts = () if start_over else tuple(p for p in m.faiss_parts if p.stop <= m.faiss_rows)
        covered = 0 if start_over else m.faiss_rows
        if m.faiss_files and not start_over and covered == m.rows:
            return  # current
        if covered < m.rows:
            parts = parts + write_faiss_parts(self.reader(), self.root, covered, m.rows)
        self._commit(m.replace(faiss_files=True, faiss_parts=parts, faiss=()))
        stale = ({os.path.basename(f.file) for f in m.faiss} | {p.file for p in m.faiss_parts}) - {
            p.file for p in parts
        }
        for name in stale:  # no reader uses them once the manifest no longer lists them
            path = inside(self.root, f"{FAISS_DIR}/{name}")
            if path.is_file() and not path.is_symlink():
                path.unlink()

    def update_sketch(
        self, *, dim: int = 256, fit_rows: int = 1024, refit_growth: int = 4, device=None
    ) -> None:
        """Bring the style sketch up to the committed rows (derived data, crash-safe).

        New rows are projected onto the current basis; the basis is refitted into a new zarr
        group (which the manifest then switches to) when there is none, when ``dim`` changes,
        or when it was fitted on fewer than ``fit_rows`` rows and the store has grown
        ``refit_growth`` times since. A CUDA ``device`` does the float64 arithmetic there.
        """
        if dim < 0 or fit_rows < 1:
            raise ValueError("sketch dim must be >= 0 and fit_rows >= 1")
        info, stale = update_sketch(
            self.reader(),
            self._group,
            self.manifest.sketch,
            dim=dim,
            fit_rows=fit_rows,
            refit_growth=refit_growth,
            device=device,
        )
        if info is None:
            return
        self._commit(self.manifest.replace(sketch=info))
        if stale and stale in self._group:  # the basis before the previous one: no reader uses it
            del self._group[stale]

    def build_derived(
        self,
        *,
        sketch_dim: int = 256,
        sketch_fit_rows: int = 1024,
        faiss_files: bool = False,
        rewrite: bool = False,
    ) -> None:
        """Extend (or with ``rewrite``, rebuild) everything derived from the arrays: the style
        sketch, and the FAISS files when the store keeps them (``faiss_files`` starts that)."""
        self.update_faiss_files(enable=faiss_files, rewrite=rewrite)
        self.update_sketch(dim=sketch_dim, fit_rows=sketch_fit_rows)
