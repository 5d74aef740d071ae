"""The reader stage: find image files, decode them safely, and join user metadata.

Decoding is :mod:`models.imageio` (PIL, EXIF orientation, every mode to 8-bit RGB, the
decompression-bomb limit as an error); every failure becomes a recorded reject with a one-line
reason, so one bad file never aborts a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
from PIL import Image

from dermris.models.imageio import decode_image, decode_image_bytes, to_rgb

from dermris.models.errors import ImageDecodeError, MetadataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ID_COLUMN_CANDIDATES",
    "RESERVED_COLUMNS",
    "ImageFile",
    "DecodedImage",
    "Rejected",
    "list_images",
    "to_rgb",
    "decode_image",
    "decode_image_bytes",
    "read_images",
    "MetadataTable",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""File endings the indexer picks up (case-insensitive)."""

ID_COLUMN_CANDIDATES = ("isic_id", "image_name", "image_id", "image")
"""Metadata columns tried, in order, when no id column is named (isic-cli, ISIC challenges)."""

RESERVED_COLUMNS = ("row", "image_id", "path", "sha256", "width", "height")
"""Columns dermris writes itself; user columns with these names are kept as ``csv_<name>``."""


@dataclass(frozen=True)
class ImageFile:
    """An image file found under the indexed folder."""

    path: Path
    image_id: str


@dataclass
class DecodedImage:
    """A decoded image and what the store records about its file."""

    file: ImageFile
    image: Image.Image
    width: int
    height: int
    sha256: str


@dataclass(frozen=True)
class Rejected:
    """A file that was not indexed, and why."""

    path: str
    reason: str


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
    return [ImageFile(path=p.resolve(), image_id=p.stem) for p in found]


def read_images(
    files: Iterable[ImageFile], *, draft_size: int | None = None
) -> Iterator[DecodedImage | Rejected]:
    """Decode files one by one, yielding a :class:`Rejected` instead of raising."""
    for file in files:
        try:
            image, width, height, sha = decode_image(file.path, draft_size=draft_size)
        except ImageDecodeError as exc:
            yield Rejected(path=str(file.path), reason=str(exc).removeprefix(f"{file.path}: "))
            continue
        yield DecodedImage(file=file, image=image, width=width, height=height, sha256=sha)


class MetadataTable:
    """User metadata from a CSV, keyed by image id, columns kept with their inferred types.

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
            table = pacsv.read_csv(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise MetadataError(f"cannot read metadata CSV {path}: {exc}") from None
        columns = table.column_names
        if id_column is None:
            id_column = next((c for c in ID_COLUMN_CANDIDATES if c in columns), None)
            if id_column is None:
                raise MetadataError(
                    f"{path}: no id column found (looked for {', '.join(ID_COLUMN_CANDIDATES)}); "
                    f"name one with --id-column (columns: {', '.join(columns)})"
                )
        elif id_column not in columns:
            raise MetadataError(
                f"{path}: no column {id_column!r} (columns: {', '.join(columns)})"
            )
        ids = table.column(id_column).cast(pa.string())
        if ids.null_count:
            raise MetadataError(f"{path}: {ids.null_count} rows have an empty {id_column!r}")
        id_list = ids.to_pylist()
        index: dict[str, int] = {}
        duplicates = []
        for i, value in enumerate(id_list):
            if value in index:
                duplicates.append(value)
            index[value] = i
        if duplicates:
            shown = ", ".join(sorted(set(duplicates))[:5])
            raise MetadataError(f"{path}: {len(duplicates)} duplicate ids in {id_column!r} (e.g. {shown})")
        renamed = [
            f"csv_{c}" if c in RESERVED_COLUMNS and c != id_column else c for c in columns
        ]
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
