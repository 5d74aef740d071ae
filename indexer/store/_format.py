"""Store format version 1: file names and the typed, validated manifest.

``manifest.json`` is the commit point of a store. This module is the only code that knows its
keys: :meth:`Manifest.from_dict` turns the JSON into frozen dataclasses and rejects anything of
the wrong type or shape with one :class:`StoreFormatError` line; :meth:`Manifest.to_dict`
writes the same JSON back. Names of files inside the store that the manifest carries (Parquet
parts, FAISS files, the sketch group, the model file) are checked to be plain names, so no
manifest can point a reader or a writer outside the store.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from dermris.models.errors import ConfigError, StoreFormatError
from dermris.models.gram import StyleLayout
from dermris.models.presets import ModelConfig

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_FILE",
    "LOCK_NAME",
    "ARRAYS_DIR",
    "METADATA_DIR",
    "FAISS_DIR",
    "FAISS_FILES",
    "ModelRecord",
    "ArraySpec",
    "StyleInfo",
    "MetadataPart",
    "DeletedImage",
    "PurgedImage",
    "RejectedFile",
    "FaissFile",
    "SketchInfo",
    "Manifest",
    "now",
]

FORMAT_NAME = "dermris-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.safetensors"
LOCK_NAME = ".writer.lock"
ARRAYS_DIR = "arrays.zarr"
METADATA_DIR = "metadata"
FAISS_DIR = "faiss"
FAISS_FILES: Mapping[str, str] = {
    "features_l2": "faiss/features_l2.index",
    "features_ip": "faiss/features_ip.index",
}
STYLE_DTYPES = ("float16", "float32")

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")
_SKETCH_GROUP = re.compile(r"^sketch_[0-9]{1,9}$")


def now() -> str:
    """The current UTC time as an ISO 8601 string (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _Fields:
    """Typed access to one JSON object of the manifest; every failure is one line."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        self.where = where
        self.source = source
        if not isinstance(data, dict):
            self.fail(where, "a JSON object", data)
        self.data = data

    def fail(self, key: str, expected: str, value: Any) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise StoreFormatError(f"{self.source}: manifest field {key!r} must be {expected}, not {shown}")

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is not ...:
                return default
            raise StoreFormatError(f"{self.source}: manifest lacks the field {self._key(key)!r}")
        return self.data[key]

    def int(self, key: str, *, minimum: int = 0, default: Any = ...) -> int:
        value = self.get(key, default)
        if type(value) is not int or value < minimum:
            self.fail(self._key(key), f"an integer >= {minimum}", value)
        return value

    def float(self, key: str, *, default: Any = ...) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            self.fail(self._key(key), "a finite number", value)
        return float(value)

    def str(self, key: str, *, default: Any = ..., optional: bool = False) -> str | None:
        value = self.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(self._key(key), "a string", value)
        return value

    def choice(self, key: str, options: tuple[str, ...], *, default: Any = ...) -> str:
        value = self.get(key, default)
        if value not in options:
            self.fail(self._key(key), f"one of {', '.join(options)}", value)
        return value

    def obj(self, key: str, *, default: Any = ...) -> "_Fields":
        return _Fields(self.get(key, default), self._key(key), self.source)

    def list(self, key: str, *, default: Any = ...) -> list[Any]:
        value = self.get(key, default)
        if not isinstance(value, list):
            self.fail(self._key(key), "a JSON list", value)
        return value

    def items(self, key: str, *, default: Any = ...) -> list["_Fields"]:
        return [_Fields(v, f"{self._key(key)}[{i}]", self.source) for i, v in enumerate(self.list(key, default=default))]

    def name(self, key: str, pattern: re.Pattern = _PLAIN_NAME, *, optional: bool = False) -> str | None:
        value = self.str(key, optional=optional)
        if value is not None and (not pattern.match(value) or value in (".", "..")):
            self.fail(self._key(key), "a plain file name inside the store", value)
        return value


class _Record:
    """A manifest entry whose JSON form is its fields."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ModelRecord:
    """The model that made the store."""

    config: ModelConfig
    weights_file: str | None
    weights_sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "weights_file": self.weights_file,
                "weights_sha256": self.weights_sha256}


@dataclass(frozen=True)
class ArraySpec:
    """Shapes and layouts of the arrays in ``arrays.zarr``."""

    feature_dim: int
    style_dim: int
    style_dtype: str
    style_shard_rows: int
    mask_size: int
    mask_bytes: int
    mask_grid: int | None = None  # None: the store predates the mask_blocks array

    @property
    def style_row_bytes(self) -> int:
        """Bytes of one stored style row."""
        return self.style_dim * np.dtype(self.style_dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        out = {
            "features": {"dim": self.feature_dim, "dtype": "float32"},
            "style": {"dim": self.style_dim, "dtype": self.style_dtype, "shard_rows": self.style_shard_rows},
            "mask": {"size": self.mask_size, "bytes": self.mask_bytes, "packing": "numpy.packbits row-major"},
            "mask_area": {"dtype": "int32"},
        }
        if self.mask_grid is not None:
            out["mask_blocks"] = {"dtype": "int32", "grid": self.mask_grid}
        return out


@dataclass(frozen=True)
class StyleInfo:
    """Stage layout of the style vectors and their float16 scales (None before the first rows)."""

    layout: StyleLayout
    scales: tuple[float, ...] | None
    dtype: str
    clipped_values: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.layout.to_dict(), "scales": None if self.scales is None else list(self.scales),
                "dtype": self.dtype, "clipped_values": self.clipped_values}


@dataclass(frozen=True)
class MetadataPart(_Record):
    """One Parquet file of ``metadata/``, holding rows ``[start, stop)``."""

    file: str
    start: int
    stop: int
    sha256: str | None = None



@dataclass(frozen=True)
class DeletedImage(_Record):
    """An image marked deleted (still in the arrays until compaction)."""

    row: int
    image_id: str
    sha256: str
    deleted: str



@dataclass(frozen=True)
class PurgedImage(_Record):
    """An image removed by compaction (remembered so that re-indexing does not add it back)."""

    image_id: str
    sha256: str
    deleted: str



@dataclass(frozen=True)
class RejectedFile(_Record):
    """A file an indexing run could not index, and why."""

    path: str
    reason: str



@dataclass(frozen=True)
class FaissFile:
    """A derived FAISS index file and the number of vectors it held when written."""

    name: str
    file: str
    ntotal: int


@dataclass(frozen=True)
class SketchInfo(_Record):
    """The derived style sketch: its zarr group and what it covers."""

    group: str
    serial: int
    dim: int
    dim_requested: int
    fitted_rows: int
    orthonormality_error: float
    rows: int



@dataclass(frozen=True)
class Manifest:
    """A store's manifest (format version 1), typed and validated.

    Build one with :meth:`from_dict` / :meth:`from_json`; change it with :meth:`replace`
    (it is frozen). Unknown top-level keys written by other tools are kept in ``extra``.
    ``generation`` identifies the arrays this manifest describes: ``arrays.zarr`` carries the
    same value in its attributes, and compaction (which renumbers rows) starts a new one.
    """

    rows: int
    model: ModelRecord
    arrays: ArraySpec
    style: StyleInfo
    metadata_parts: tuple[MetadataPart, ...] = ()
    faiss: tuple[FaissFile, ...] = ()
    rejected: tuple[RejectedFile, ...] = ()
    deleted: tuple[DeletedImage, ...] = ()
    purged: tuple[PurgedImage, ...] = ()
    sketch: SketchInfo | None = None
    created: str | None = None
    updated: str | None = None
    generation: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "Manifest":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # -- derived views ---------------------------------------------------------------------
    @property
    def deleted_rows(self) -> np.ndarray:
        """Sorted rows marked deleted, int64."""
        return np.array(sorted({d.row for d in self.deleted if d.row < self.rows}), dtype=np.int64)

    @property
    def removed_sha256(self) -> frozenset[str]:
        """sha256 of every image deleted or purged (re-indexing does not add them back)."""
        return frozenset(d.sha256 for d in self.deleted) | frozenset(p.sha256 for p in self.purged)

    def faiss_file(self, name: str) -> FaissFile | None:
        """The recorded FAISS file ``name``, if any."""
        return next((f for f in self.faiss if f.name == name), None)

    # -- JSON ------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "manifest.json") -> "Manifest":
        """Parse and validate manifest JSON; raises :class:`StoreFormatError` (one line)."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreFormatError(f"{source} is damaged or half-written: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest.json") -> "Manifest":
        """Validate a decoded manifest; raises :class:`StoreFormatError` (one line)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{source} is not a dermris store manifest")
        version = data.get("format_version")
        if version != FORMAT_VERSION or type(version) is not int:
            raise StoreFormatError(
                f"{source} has store format version {version!r}; this dermris reads version {FORMAT_VERSION} only"
            )
        top = _Fields(data, "", source)
        rows = top.int("rows")

        model_f = top.obj("model")
        try:
            config = ModelConfig.from_dict(model_f.get("config"))
        except (ConfigError, TypeError, ValueError) as exc:
            raise StoreFormatError(f"{source}: invalid model config: {exc}") from None
        weights_file = model_f.str("weights_file", default=None, optional=True)
        if weights_file not in (None, MODEL_FILE):
            model_f.fail("model.weights_file", f"null or {MODEL_FILE!r}", weights_file)
        sha = model_f.str("weights_sha256", default=None, optional=True)
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            model_f.fail("model.weights_sha256", "a hex sha256", sha)
        model = ModelRecord(config, weights_file, sha)

        arrays_f = top.obj("arrays")
        feat_f, style_f, mask_f = arrays_f.obj("features"), arrays_f.obj("style"), arrays_f.obj("mask")
        blocks = arrays_f.get("mask_blocks", None)
        mask_size = mask_f.int("size", minimum=1)
        arrays = ArraySpec(
            feature_dim=feat_f.int("dim", minimum=1),
            style_dim=style_f.int("dim", minimum=1),
            style_dtype=style_f.choice("dtype", STYLE_DTYPES),
            style_shard_rows=style_f.int("shard_rows", minimum=1, default=1),
            mask_size=mask_size,
            mask_bytes=mask_f.int("bytes", minimum=1),
            mask_grid=None if blocks is None else arrays_f.obj("mask_blocks").int("grid", minimum=1),
        )
        if arrays.mask_bytes != (mask_size * mask_size + 7) // 8:
            mask_f.fail("arrays.mask.bytes", f"{(mask_size * mask_size + 7) // 8} for size {mask_size}",
                        arrays.mask_bytes)
        if arrays.mask_grid is not None and mask_size % arrays.mask_grid:
            arrays_f.fail("arrays.mask_blocks.grid", f"a divisor of the mask size {mask_size}", arrays.mask_grid)

        st = top.obj("style")
        try:
            channels = [int(c) for c in st.list("channels") if type(c) is int]
            weights = [float(w) for w in st.list("weights") if isinstance(w, (int, float)) and not isinstance(w, bool)]
            if len(channels) != len(st.list("channels")) or len(weights) != len(st.list("weights")):
                raise ConfigError("channels must be integers and weights numbers")
            layout = StyleLayout.from_channels(channels, weights)
        except ConfigError as exc:
            raise StoreFormatError(f"{source}: invalid style layout: {exc}") from None
        if layout.dim != arrays.style_dim:
            raise StoreFormatError(f"{source}: style layout has {layout.dim} values, the style array {arrays.style_dim}")
        scales_raw = st.get("scales", None)
        scales = None
        if scales_raw is not None:
            if (not isinstance(scales_raw, list) or len(scales_raw) != len(channels)
                    or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales_raw)):
                st.fail("style.scales", f"null or a list of {len(channels)} positive numbers", scales_raw)
            scales = tuple(float(s) for s in scales_raw)
        style = StyleInfo(layout=layout, scales=scales, dtype=st.choice("dtype", STYLE_DTYPES, default="float16"),
                          clipped_values=st.int("clipped_values", default=0))
        if style.dtype != arrays.style_dtype:
            raise StoreFormatError(f"{source}: style dtype {style.dtype} differs from the style array's")

        parts = []
        expected_start = 0
        for p in top.items("metadata_parts"):
            part = MetadataPart(p.name("file"), p.int("start"), p.int("stop", minimum=1),
                                p.str("sha256", default=None, optional=True))
            if not part.file.endswith(".parquet"):
                p.fail(f"{p.where}.file", "a .parquet file name", part.file)
            if part.start != expected_start or part.stop <= part.start:
                raise StoreFormatError(f"{source}: metadata part {part.file} covers rows {part.start}..{part.stop}, "
                                       f"expected to start at {expected_start}")
            expected_start = part.stop
            parts.append(part)
        if expected_start < rows:
            raise StoreFormatError(f"{source}: metadata parts cover {expected_start} rows, the manifest commits {rows}")

        faiss_raw = top.get("faiss", {})
        faiss_f = _Fields(faiss_raw if faiss_raw is not None else {}, "faiss", source)
        faiss = []
        for name in faiss_f.data:
            if name not in FAISS_FILES:
                faiss_f.fail("faiss", f"keyed by {', '.join(FAISS_FILES)}", name)
            entry = faiss_f.obj(name)
            file = entry.str("file", default=FAISS_FILES[name])
            if file != FAISS_FILES[name]:
                entry.fail(f"faiss.{name}.file", repr(FAISS_FILES[name]), file)
            faiss.append(FaissFile(name, file, entry.int("ntotal")))

        rejected = tuple(RejectedFile(r.str("path"), r.str("reason")) for r in top.items("rejected", default=[]))
        deleted = tuple(DeletedImage(d.int("row"), d.str("image_id"), d.str("sha256"), d.str("deleted", default=""))
                        for d in top.items("deleted", default=[]))
        if any(d.row >= rows for d in deleted):
            raise StoreFormatError(f"{source}: deleted rows lie outside the {rows} committed rows")
        purged = tuple(PurgedImage(p.str("image_id"), p.str("sha256"), p.str("deleted", default=""))
                       for p in top.items("purged", default=[]))

        sketch = None
        if top.get("sketch", None) is not None:
            s = top.obj("sketch")
            sketch = SketchInfo(
                group=s.name("group", _SKETCH_GROUP), serial=s.int("serial"), dim=s.int("dim"),
                dim_requested=s.int("dim_requested"), fitted_rows=s.int("fitted_rows"),
                orthonormality_error=s.float("orthonormality_error"), rows=s.int("rows"),
            )
        generation = top.str("generation", default=None, optional=True)
        if generation is not None and not re.fullmatch(r"[0-9a-f]{8,64}", generation):
            top.fail("generation", "a hex string", generation)
        known = {"format", "format_version", "rows", "model", "arrays", "style", "metadata_parts", "faiss",
                 "rejected", "deleted", "purged", "sketch", "created", "updated", "generation"}
        return cls(
            rows=rows, model=model, arrays=arrays, style=style, metadata_parts=tuple(parts), faiss=tuple(faiss),
            rejected=rejected, deleted=deleted, purged=purged, sketch=sketch,
            created=top.str("created", default=None, optional=True),
            updated=top.str("updated", default=None, optional=True),
            generation=generation,
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the same keys every dermris version 1 store has)."""
        out = dict(self.extra)
        out.update({
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "updated": self.updated,
            "rows": self.rows,
            "model": self.model.to_dict(),
            "arrays": self.arrays.to_dict(),
            "style": self.style.to_dict(),
            "metadata_parts": [p.to_dict() for p in self.metadata_parts],
            "faiss": {f.name: {"file": f.file, "ntotal": f.ntotal} for f in self.faiss},
            "rejected": [r.to_dict() for r in self.rejected],
        })
        if self.deleted:
            out["deleted"] = [d.to_dict() for d in self.deleted]
        if self.purged:
            out["purged"] = [p.to_dict() for p in self.purged]
        if self.sketch is not None:
            out["sketch"] = self.sketch.to_dict()
        if self.generation is not None:
            out["generation"] = self.generation
        return out

    def to_json(self) -> bytes:
        """Canonical JSON bytes (sorted keys)."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()
