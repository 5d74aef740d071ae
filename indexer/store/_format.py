"""Store format version 1: file names and the typed, validated manifest.

``manifest.json`` is the commit point of a store. This module is the only code that knows its
keys: :meth:`Manifest.from_dict` turns the JSON into frozen dataclasses and rejects anything of
the wrong type or shape with one :class:`StoreFormatError` line; :meth:`Manifest.to_dict`
writes the same JSON back. Names of files inside the store that the manifest carries (Parquet
parts, FAISS files, the sketch group, the model file) are checked to be plain names, so no
manifest can point a reader or a writer outside the store.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as _dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, overload

import numpy as np

from dermris.core.errors import ConfigError, StoreFormatError
from dermris.core.style_layout import StyleLayout
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
    "FAISS_NAMES",
    "faiss_part_file",
    "ModelRecord",
    "ArraySpec",
    "StyleInfo",
    "MetadataPart",
    "DeletedImage",
    "PurgedImage",
    "RejectedFile",
    "FaissFile",
    "FaissPart",
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
FAISS_NAMES = tuple(FAISS_FILES)
"""The derived FAISS indexes: IDMap2(Flat L2) on the features, IDMap2(Flat IP) on unit features."""
STYLE_DTYPES = ("float16", "float32")

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")
_SKETCH_GROUP = re.compile(r"^sketch_[0-9]{1,9}$")
_FAISS_PART = re.compile(r"^(features_l2|features_ip)-([0-9]{12})-([0-9]{12})\.index$")


def faiss_part_file(name: str, start: int, stop: int) -> str:
    """The file name (inside ``faiss/``) of the FAISS index ``name``.

    The index holds rows ``[start, stop)``.
    """
    return f"{name}-{start:012d}-{stop:012d}.index"


def now() -> str:
    """The current UTC time as an ISO 8601 string (seconds)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class _Fields:
    """Typed access to one JSON object of the manifest; every failure is one line.

    (Its methods ``int``, ``float``, ``str`` and ``list`` shadow the builtins inside the class
    body, so the annotations here name ``builtins``.)
    """

    def __init__(self, data: Any, where: builtins.str, source: builtins.str) -> None:
        self.where = where
        self.source = source
        if not isinstance(data, dict):
            self.fail(where, "a JSON object", data)
        self.data = data

    def fail(self, key: builtins.str, expected: builtins.str, value: Any) -> NoReturn:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise StoreFormatError(
            f"{self.source}: manifest field {key!r} must be {expected}, not {shown}"
        )

    def _key(self, key: builtins.str) -> builtins.str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: builtins.str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is not ...:
                return default
            raise StoreFormatError(f"{self.source}: manifest lacks the field {self._key(key)!r}")
        return self.data[key]

    def int(
        self, key: builtins.str, *, minimum: builtins.int = 0, default: Any = ...
    ) -> builtins.int:
        value = self.get(key, default)
        if type(value) is not int or value < minimum:
            self.fail(self._key(key), f"an integer >= {minimum}", value)
        return value

    def float(self, key: builtins.str, *, default: Any = ...) -> builtins.float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            self.fail(self._key(key), "a finite number", value)
        return float(value)

    @overload
    def str(
        self, key: builtins.str, *, default: Any = ..., optional: Literal[False] = False
    ) -> builtins.str: ...

    @overload
    def str(
        self, key: builtins.str, *, default: Any = ..., optional: bool
    ) -> builtins.str | None: ...

    def str(
        self, key: builtins.str, *, default: Any = ..., optional: bool = False
    ) -> builtins.str | None:
        value = self.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(self._key(key), "a string", value)
        return value

    def choice(
        self, key: builtins.str, options: tuple[builtins.str, ...], *, default: Any = ...
    ) -> builtins.str:
        value = self.get(key, default)
        if value not in options:
            self.fail(self._key(key), f"one of {', '.join(options)}", value)
        return value

    def obj(self, key: builtins.str, *, default: Any = ...) -> _Fields:
        return _Fields(self.get(key, default), self._key(key), self.source)

    def list(self, key: builtins.str, *, default: Any = ...) -> builtins.list[Any]:
        value = self.get(key, default)
        if not isinstance(value, list):
            self.fail(self._key(key), "a JSON list", value)
        return value

    def items(self, key: builtins.str, *, default: Any = ...) -> builtins.list[_Fields]:
        return [
            _Fields(v, f"{self._key(key)}[{i}]", self.source)
            for i, v in enumerate(self.list(key, default=default))
        ]

    @overload
    def name(
        self,
        key: builtins.str,
        pattern: re.Pattern[builtins.str] = ...,
        *,
        optional: Literal[False] = False,
    ) -> builtins.str: ...

    @overload
    def name(
        self, key: builtins.str, pattern: re.Pattern[builtins.str] = ..., *, optional: bool
    ) -> builtins.str | None: ...

    def name(
        self,
        key: builtins.str,
        pattern: re.Pattern[builtins.str] = _PLAIN_NAME,
        *,
        optional: bool = False,
    ) -> builtins.str | None:
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
    segmenter_trained: bool | None = None
    """Whether the masks come from a trained segmenter (``dermris train segmenter``); None:
    not recorded (stores made before this field; read as untrained, since every preset's
    segmenter is untrained)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config.to_dict(),
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
        }
        if self.segmenter_trained is not None:
            out["segmenter_trained"] = self.segmenter_trained
        return out

    @classmethod
    def from_fields(cls, f: _Fields) -> "ModelRecord":
        try:
            config = ModelConfig.from_dict(f.get("config"))
        except (ConfigError, TypeError, ValueError) as exc:
            raise StoreFormatError(f"{f.source}: invalid model config: {exc}") from None
        weights_file = f.str("weights_file", default=None, optional=True)
        if weights_file not in (None, MODEL_FILE):
            f.fail("model.weights_file", f"null or {MODEL_FILE!r}", weights_file)
        sha = f.str("weights_sha256", default=None, optional=True)
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            f.fail("model.weights_sha256", "a hex sha256", sha)
        trained = f.get("segmenter_trained", None)
        if trained is not None and not isinstance(trained, bool):
            f.fail("model.segmenter_trained", "true, false or null", trained)
        return cls(config, weights_file, sha, trained)


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
            "style": {
                "dim": self.style_dim,
                "dtype": self.style_dtype,
                "shard_rows": self.style_shard_rows,
            },
            "mask": {
                "size": self.mask_size,
                "bytes": self.mask_bytes,
                "packing": "numpy.packbits row-major",
            },
            "mask_area": {"dtype": "int32"},
        }
        if self.mask_grid is not None:
            out["mask_blocks"] = {"dtype": "int32", "grid": self.mask_grid}
        return out

    @classmethod
    def from_fields(cls, f: _Fields) -> "ArraySpec":
        feat_f, style_f, mask_f = f.obj("features"), f.obj("style"), f.obj("mask")
        blocks = f.get("mask_blocks", None)
        mask_size = mask_f.int("size", minimum=1)
        spec = cls(
            feature_dim=feat_f.int("dim", minimum=1),
            style_dim=style_f.int("dim", minimum=1),
            style_dtype=style_f.choice("dtype", STYLE_DTYPES),
            style_shard_rows=style_f.int("shard_rows", minimum=1, default=1),
            mask_size=mask_size,
            mask_bytes=mask_f.int("bytes", minimum=1),
            mask_grid=None if blocks is None else f.obj("mask_blocks").int("grid", minimum=1),
        )
        if spec.mask_bytes != (mask_size * mask_size + 7) // 8:
            mask_f.fail(
                "arrays.mask.bytes",
                f"{(mask_size * mask_size + 7) // 8} for size {mask_size}",
                spec.mask_bytes,
            )
        if spec.mask_grid is not None and mask_size % spec.mask_grid:
            f.fail(
                "arrays.mask_blocks.grid", f"a divisor of the mask size {mask_size}", spec.mask_grid
            )
        return spec


@dataclass(frozen=True)
class StyleInfo:
    """Stage layout of the style vectors and their float16 scales (None before the first rows)."""

    layout: StyleLayout
    scales: tuple[float, ...] | None
    dtype: str
    clipped_values: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.layout.to_dict(),
            "scales": None if self.scales is None else list(self.scales),
            "dtype": self.dtype,
            "clipped_values": self.clipped_values,
        }

    @classmethod
    def from_fields(cls, f: _Fields) -> "StyleInfo":
        try:
            channels = [int(c) for c in f.list("channels") if type(c) is int]
            weights = [
                float(w)
                for w in f.list("weights")
                if isinstance(w, (int, float)) and not isinstance(w, bool)
            ]
            if len(channels) != len(f.list("channels")) or len(weights) != len(f.list("weights")):
                raise ConfigError("channels must be integers and weights numbers")
            layout = StyleLayout.from_channels(channels, weights)
        except ConfigError as exc:
            raise StoreFormatError(f"{f.source}: invalid style layout: {exc}") from None
        scales_raw = f.get("scales", None)
        scales = None
        if scales_raw is not None:
            if (
                not isinstance(scales_raw, list)
                or len(scales_raw) != len(channels)
                or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0
                    for s in scales_raw
                )
            ):
                f.fail(
                    "style.scales",
                    f"null or a list of {len(channels)} positive numbers",
                    scales_raw,
                )
            scales = tuple(float(s) for s in scales_raw)
        return cls(
            layout=layout,
            scales=scales,
            dtype=f.choice("dtype", STYLE_DTYPES, default="float16"),
            clipped_values=f.int("clipped_values", default=0),
        )


@dataclass(frozen=True)
class MetadataPart(_Record):
    """One Parquet file of ``metadata/``, holding rows ``[start, stop)``."""

    file: str
    start: int
    stop: int
    sha256: str | None = None

    @classmethod
    def from_fields(cls, f: _Fields) -> "MetadataPart":
        part = cls(
            f.name("file"),
            f.int("start"),
            f.int("stop", minimum=1),
            f.str("sha256", default=None, optional=True),
        )
        if not part.file.endswith(".parquet"):
            f.fail(f"{f.where}.file", "a .parquet file name", part.file)
        return part


@dataclass(frozen=True)
class DeletedImage(_Record):
    """An image marked deleted (still in the arrays until compaction)."""

    row: int
    image_id: str
    sha256: str
    deleted: str

    @classmethod
    def from_fields(cls, f: _Fields) -> "DeletedImage":
        return cls(f.int("row"), f.str("image_id"), f.str("sha256"), f.str("deleted", default=""))


@dataclass(frozen=True)
class PurgedImage(_Record):
    """An image removed by compaction (remembered so that re-indexing does not add it back)."""

    image_id: str
    sha256: str
    deleted: str

    @classmethod
    def from_fields(cls, f: _Fields) -> "PurgedImage":
        return cls(f.str("image_id"), f.str("sha256"), f.str("deleted", default=""))


@dataclass(frozen=True)
class RejectedFile(_Record):
    """A file an indexing run could not index, and why."""

    path: str
    reason: str

    @classmethod
    def from_fields(cls, f: _Fields) -> "RejectedFile":
        return cls(f.str("path"), f.str("reason"))


@dataclass(frozen=True)
class FaissFile:
    """A whole-store FAISS index file as stores written before FAISS parts recorded it (read,
    checked, and replaced by parts the next time the store's FAISS files are updated)."""

    name: str
    file: str
    ntotal: int


@dataclass(frozen=True)
class FaissPart(_Record):
    """One file of a derived FAISS index, holding rows ``[start, stop)`` (ids = rows).

    An index's parts are contiguous from row 0; each run that adds rows writes one new part
    per index (nothing already written is rewritten). They hold deleted rows until compaction.
    """

    name: str
    file: str
    start: int
    stop: int

    @classmethod
    def from_fields(cls, f: _Fields) -> "FaissPart":
        part = cls(
            f.choice("name", FAISS_NAMES), f.name("file"), f.int("start"), f.int("stop", minimum=1)
        )
        match = _FAISS_PART.match(part.file)
        if (
            match is None
            or match.group(1) != part.name
            or int(match.group(2)) != part.start
            or int(match.group(3)) != part.stop
            or part.stop <= part.start
        ):
            f.fail(
                f"{f.where}.file",
                f"{faiss_part_file(part.name, part.start, part.stop)!r}",
                part.file,
            )
        return part


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

    @classmethod
    def from_fields(cls, f: _Fields) -> "SketchInfo":
        return cls(
            group=f.name("group", _SKETCH_GROUP),
            serial=f.int("serial"),
            dim=f.int("dim"),
            dim_requested=f.int("dim_requested"),
            fitted_rows=f.int("fitted_rows"),
            orthonormality_error=f.float("orthonormality_error"),
            rows=f.int("rows"),
        )


def _contiguous(parts: list, source: str, what: str) -> int:
    """Parts must cover rows ``0, 1, ...`` without gaps or overlaps; returns the rows covered."""
    expected = 0
    for part in parts:
        if part.start != expected or part.stop <= part.start:
            raise StoreFormatError(
                f"{source}: {what} {part.file} covers rows {part.start}..{part.stop}, "
                f"expected to start at {expected}"
            )
        expected = part.stop
    return expected


_KNOWN_KEYS = frozenset(
    {
        "format",
        "format_version",
        "rows",
        "model",
        "arrays",
        "style",
        "metadata_parts",
        "faiss",
        "faiss_files",
        "faiss_parts",
        "rejected",
        "deleted",
        "purged",
        "sketch",
        "created",
        "updated",
        "generation",
    }
)


@dataclass(frozen=True)
class Manifest:
    """A store's manifest (format version 1), typed and validated.

    Build one with :meth:`from_dict` / :meth:`from_json`; change it with :meth:`replace`
    (it is frozen). Unknown top-level keys written by other tools are kept in ``extra``.
    ``generation`` identifies the arrays this manifest describes: ``arrays.zarr`` carries the
    same value in its attributes, and compaction (which renumbers rows) starts a new one.
    ``faiss_files`` says whether the store keeps FAISS files of its features (only when asked:
    the retriever builds its own indexes); ``faiss_parts`` lists them.
    """

    rows: int
    model: ModelRecord
    arrays: ArraySpec
    style: StyleInfo
    metadata_parts: tuple[MetadataPart, ...] = ()
    faiss: tuple[FaissFile, ...] = ()
    faiss_files: bool = False
    faiss_parts: tuple[FaissPart, ...] = ()
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
        """The recorded whole-store FAISS file ``name`` of an older store, if any."""
        return next((f for f in self.faiss if f.name == name), None)

    def faiss_parts_of(self, name: str) -> tuple[FaissPart, ...]:
        """The committed parts of FAISS index ``name`` (none past :attr:`rows`), in row order."""
        return tuple(p for p in self.faiss_parts if p.name == name and p.stop <= self.rows)

    @property
    def faiss_rows(self) -> int:
        """Committed rows covered by every FAISS index's parts (0 without parts)."""
        return min(max((p.stop for p in self.faiss_parts_of(n)), default=0) for n in FAISS_NAMES)

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
                f"{source} has store format version {version!r}; "
                f"this dermris reads version {FORMAT_VERSION} only"
            )
        top = _Fields(data, "", source)
        rows = top.int("rows")
        arrays = ArraySpec.from_fields(top.obj("arrays"))
        style = StyleInfo.from_fields(top.obj("style"))
        if style.layout.dim != arrays.style_dim:
            raise StoreFormatError(
                f"{source}: style layout has {style.layout.dim} values, "
                f"the style array {arrays.style_dim}"
            )
        if style.dtype != arrays.style_dtype:
            raise StoreFormatError(
                f"{source}: style dtype {style.dtype} differs from the style array's"
            )
        parts = [MetadataPart.from_fields(p) for p in top.items("metadata_parts")]
        if _contiguous(parts, source, "metadata part") < rows:
            raise StoreFormatError(
                f"{source}: metadata parts cover {parts[-1].stop if parts else 0} rows, "
                f"the manifest commits {rows}"
            )
        faiss_parts = [FaissPart.from_fields(p) for p in top.items("faiss_parts", default=[])]
        for (
            name
        ) in FAISS_NAMES:  # parts past the committed rows are never read (check reports them)
            _contiguous([p for p in faiss_parts if p.name == name], source, "FAISS part")
        deleted = tuple(DeletedImage.from_fields(d) for d in top.items("deleted", default=[]))
        if any(d.row >= rows for d in deleted):
            raise StoreFormatError(f"{source}: deleted rows lie outside the {rows} committed rows")
        sketch = (
            SketchInfo.from_fields(top.obj("sketch"))
            if top.get("sketch", None) is not None
            else None
        )
        generation = top.str("generation", default=None, optional=True)
        if generation is not None and not re.fullmatch(r"[0-9a-f]{8,64}", generation):
            top.fail("generation", "a hex string", generation)
        faiss_files = top.get("faiss_files", False)
        if not isinstance(faiss_files, bool):
            top.fail("faiss_files", "true or false", faiss_files)
        return cls(
            rows=rows,
            model=ModelRecord.from_fields(top.obj("model")),
            arrays=arrays,
            style=style,
            metadata_parts=tuple(parts),
            faiss=_legacy_faiss(top),
            faiss_files=faiss_files,
            faiss_parts=tuple(faiss_parts),
            rejected=tuple(RejectedFile.from_fields(r) for r in top.items("rejected", default=[])),
            deleted=deleted,
            purged=tuple(PurgedImage.from_fields(p) for p in top.items("purged", default=[])),
            sketch=sketch,
            created=top.str("created", default=None, optional=True),
            updated=top.str("updated", default=None, optional=True),
            generation=generation,
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the same keys every dermris version 1 store has)."""
        out = dict(self.extra)
        out.update(
            {
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
            }
        )
        if self.faiss_files:
            out["faiss_files"] = True
        if self.faiss_parts:
            out["faiss_parts"] = [p.to_dict() for p in self.faiss_parts]
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


def _legacy_faiss(top: _Fields) -> tuple[FaissFile, ...]:
    """The ``faiss`` entries of stores written before FAISS parts (one file per index)."""
    raw = top.get("faiss", {})
    faiss_f = _Fields(raw if raw is not None else {}, "faiss", top.source)
    out = []
    for name in faiss_f.data:
        if name not in FAISS_FILES:
            faiss_f.fail("faiss", f"keyed by {', '.join(FAISS_FILES)}", name)
        entry = faiss_f.obj(name)
        file = entry.str("file", default=FAISS_FILES[name])
        if file != FAISS_FILES[name]:
            entry.fail(f"faiss.{name}.file", repr(FAISS_FILES[name]), file)
        out.append(FaissFile(name, file, entry.int("ntotal")))
    return tuple(out)
