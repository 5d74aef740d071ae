"""The core columns every metadata row has, defined once.

``row`` (int64, = FAISS id), ``image_id``, ``path``, ``sha256`` (of the file's bytes), ``width``
and ``height`` (of the image as decoded, EXIF orientation applied). A user's metadata columns
follow them; a user column of one of these names is renamed (``csv_<name>``) on the way in.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

__all__ = ["CORE_SCHEMA", "CORE_COLUMNS", "core_records"]

CORE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
"""Types of the core columns, in the order they are written."""

CORE_COLUMNS: tuple[str, ...] = tuple(CORE_SCHEMA.names)
"""Names of the core columns."""


def core_records(
    *,
    image_ids: Sequence[str],
    paths: Sequence[str],
    sha256: Sequence[str],
    widths: Sequence[int],
    heights: Sequence[int],
) -> pa.Table:
    """The core columns but ``row`` (the writer numbers rows when it commits them)."""
    values = {
        "image_id": image_ids,
        "path": paths,
        "sha256": sha256,
        "width": widths,
        "height": heights,
    }
    return pa.table(
        {
            name: pa.array(list(values[name]), CORE_SCHEMA.field(name).type)
            for name in CORE_COLUMNS[1:]
        }
    )
