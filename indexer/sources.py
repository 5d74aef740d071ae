"""The reader stage: find image files, decode them safely, and join user metadata.

Reading and decoding is :mod:`dermris.core.imageio` (regular files only, a size limit, the
listed formats only, EXIF orientation, every mode to 8-bit RGB, the decompression-bomb limit as
an error); every failure becomes a recorded reject with a one-line reason, so one bad file never
aborts a run. :func:`load_image` is what the parallel workers of :mod:`.loader` run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dermris.core.errors import ImageDecodeError, MetadataError
from dermris.core.imageio import (
    IMAGE_FORMATS,
    MAX_FILE_BYTES,
    decode_image,
    decode_image_bytes,
    read_file_bytes,
    to_pixels,
    to_rgb,
)

from .store.schema import CORE_COLUMNS

__all__ = [
    "IMAGE_EXTENSIONS",
    "ID_COLUMN_CANDIDATES",
    "RESERVED_COLUMNS",
    "IMAGE_FORMATS",
    "ImageFile",
    "LoadedImage",
    "list_images",
    "load_image",
    "to_rgb",
    "to_pixels",
    "decode_image",
    "decode_image_bytes",
    "MetadataTable",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""File endings the indexer picks up (case-insensitive)."""

ID_COLUMN_CANDIDATES = ("isic_id", "image_name", "image_id", "image")
"""Metadata columns tried, in order, when no id column is named (isic-cli, ISIC challenges)."""

RESERVED_COLUMNS = CORE_COLUMNS
"""The core columns (:mod:`~.store.schema`): a CSV column of one of these names is renamed."""
"""Columns dermris writes itself; user columns with these names are kept as ``csv_<name>``."""


@dataclass(frozen=True)
class ImageFile:
    """An image file found under the indexed folder."""

    path: Path
    image_id: str


def list_images(root: str | os.PathLike) -> list[ImageFile]:
    """Return the image files under ``root``, sorted by relative path; hidden entries skipped.

    The image id is the file stem (``ISIC_0000000.jpg`` -> ``ISIC_0000000``), which is how
    the ISIC archive and challenge CSVs name images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    # absolute, but links are not followed (a link loop is a reject when read, not a crash here)
    return [ImageFile(path=Path(os.path.abspath(p)), image_id=p.stem) for p in found]


def load_image(
    file: ImageFile,
    *,
    size: int,
    draft_size: int | None = None,
    skip_sha256: frozenset[str] | set[str] = frozenset(),
    max_bytes: int = MAX_FILE_BYTES,
) -> "LoadedImage":
    """Read, hash, decode and resize one file for the model; never raises for a bad file.

    Parameters
    ----------
    file : ImageFile
        The file.
    size : int
        The model's input side: pixels are the whole image resized to ``size x size``.
    draft_size : int, optional
        JPEG draft decoding size (default ``2 * size``).
    skip_sha256 : set of str
        Files whose bytes hash to one of these are not decoded (``status == "known"``): images
        already in the store, or deleted from it.
    max_bytes : int
        Larger files are rejected.
    """
    path = str(file.path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode("utf-8", "backslashreplace").decode("utf-8")
        return LoadedImage(file, "rejected", reason=f"{shown}: file name is not valid UTF-8")
    try:
        data = read_file_bytes(file.path, max_bytes=max_bytes)
        sha = hashlib.sha256(data).hexdigest()
        if sha in skip_sha256:
            return LoadedImage(file, "known", sha256=sha)
        image, width, height = decode_image_bytes(
            data, name=path, draft_size=draft_size or 2 * size
        )
        pixels = to_pixels(image, size)
    except ImageDecodeError as exc:
        return LoadedImage(file, "rejected", reason=str(exc).removeprefix(f"{path}: "))
    return LoadedImage(file, "ok", sha256=sha, width=width, height=height, pixels=pixels)


@dataclass
class LoadedImage:
    """One file after the reader stage.

    Attributes
    ----------
    file : ImageFile
        The file.
    status : str
        ``"ok"`` (decoded), ``"known"`` (bytes already in the store: not decoded) or
        ``"rejected"`` (see ``reason``).
    sha256 : str or None
        sha256 of the file's bytes.
    width, height : int
        Original size (after EXIF orientation).
    pixels : np.ndarray or None
        ``(S, S, 3)`` uint8 model input (:func:`~dermris.core.imageio.to_pixels`).
    reason : str or None
        Why the file was rejected.
    """

    file: ImageFile
    status: str
    sha256: str | None = None
    width: int = 0
    height: int = 0
    pixels: np.ndarray | None = None
    reason: str | None = None


def decoded_pixels(items: Iterable[LoadedImage]) -> list[np.ndarray]:
    """The pixels of the items whose status is ``"ok"`` (decoded items carry them), in order."""
    out = []
    for it in items:
        if it.status == "ok":
            assert it.pixels is not None
            out.append(it.pixels)
    return out


class MetadataTable:
    """User metadata from a UTF-8 CSV, keyed by image id.

    The id column is always text (``0001`` stays ``0001``); other columns keep the types pyarrow
    infers, and a column that is empty in every row is text. Duplicate column names, non-UTF-8
    bytes, empty and duplicate ids are errors, raised before any image is embedded.

    Parameters
    ----------
    path : path-like
        The CSV file (the isic-cli export, an ISIC challenge ground-truth CSV, or any CSV).
    id_column : str, optional
        The column holding image ids; by default the first of :data:`ID_COLUMN_CANDIDATES`
        present.

    Raises
    ------
    MetadataError
        Unreadable CSV, no such id column, empty or duplicate ids.
    """

    def __init__(self, path: str | os.PathLike, *, id_column: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise MetadataError(f"metadata CSV not found: {path}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise MetadataError(f"cannot read metadata CSV {path}: {exc.strerror or exc}") from None
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark (spreadsheet exports)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MetadataError(
                f"{path} is not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
                "save it as UTF-8 (values would otherwise be stored as bytes)"
            ) from None
        parse = pacsv.ParseOptions(newlines_in_values=True)
        try:
            columns = pacsv.open_csv(pa.BufferReader(raw), parse_options=parse).schema.names
        except (pa.ArrowInvalid, OSError) as exc:
            raise MetadataError(
                f"cannot read metadata CSV {path}: {str(exc).splitlines()[0]}"
            ) from None
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise MetadataError(
                f"{path}: column names appear more than once: {', '.join(map(repr, duplicated))}"
            )
        if id_column is None:
            id_column = next((c for c in ID_COLUMN_CANDIDATES if c in columns), None)
            if id_column is None:
                raise MetadataError(
                    f"{path}: no id column found (looked for {', '.join(ID_COLUMN_CANDIDATES)}); "
                    f"name one with --id-column (columns: {', '.join(columns)})"
                )
        elif id_column not in columns:
            raise MetadataError(f"{path}: no column {id_column!r} (columns: {', '.join(columns)})")
        try:
            # ids are text, always: '0001' stays '0001' and '1e3' stays '1e3'
            table = pacsv.read_csv(
                pa.BufferReader(raw),
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(column_types={id_column: pa.string()}),
            )
        except (pa.ArrowInvalid, OSError) as exc:
            raise MetadataError(
                f"cannot read metadata CSV {path}: {str(exc).splitlines()[0]}"
            ) from None
        # a column empty in every row has no type yet: store it as text, so later runs can fill it
        for i, field in enumerate(table.schema):
            if pa.types.is_null(field.type):
                table = table.set_column(i, field.name, table.column(i).cast(pa.string()))
        id_list = table.column(id_column).to_pylist()
        empty = sum(1 for v in id_list if v is None or not v.strip())
        if empty:
            raise MetadataError(f"{path}: {empty} rows have an empty {id_column!r}")
        index: dict[str, int] = {}
        duplicates = []
        for i, value in enumerate(id_list):
            if value in index:
                duplicates.append(value)
            index[value] = i
        if duplicates:
            shown = ", ".join(sorted(set(duplicates))[:5])
            raise MetadataError(
                f"{path}: {len(duplicates)} duplicate ids in {id_column!r} (e.g. {shown})"
            )
        renamed = [f"csv_{c}" if c in RESERVED_COLUMNS and c != id_column else c for c in columns]
        clash = sorted({c for c in renamed if renamed.count(c) > 1})
        if clash:
            raise MetadataError(
                f"{path}: columns {', '.join(map(repr, clash))} clash with dermris's own columns"
            )
        table = table.rename_columns(renamed)
        self.path = path
        self.id_column = id_column
        self.table = table.drop_columns([id_column]) if id_column in RESERVED_COLUMNS else table
        self._index = index

    @property
    def schema(self) -> pa.Schema:
        """The schema of the user columns as they go into the store."""
        return self.table.schema

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def rows_for(self, image_ids: list[str]) -> pa.Table:
        """Return the metadata rows for ``image_ids`` in order; nulls where an id is absent."""
        take = pa.array([self._index.get(i) for i in image_ids], type=pa.int64())
        return self.table.take(take)
