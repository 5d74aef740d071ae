"""Compaction: physically remove deleted rows, crash-safe.

The compacted store is built in ``STORE/.compact`` (a new *generation* of arrays) and marked
``READY`` once complete; the switch then renames ``arrays.zarr``, ``metadata`` and ``faiss``
into place and the new manifest last. A crash before ``READY`` leaves the store as it was (the
next writer clears the staging folder); a crash during the switch is finished by the next
writer, under the writer lock. Readers never move or delete anything: one that meets a store
in the middle of a switch waits briefly and then reports it (its manifest's generation does
not match the arrays').
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from dermris.core.atomic import atomic_write_bytes
from dermris.core.errors import StoreFormatError

from ._files import WriterLock, read_manifest, write_manifest
from ._format import LOCK_NAME, PurgedImage
from .recovery import COMPACT_DIR, COMPACT_READY, finish_compaction, remove_tree
from .writer import StoreWriter, initialise_store

__all__ = ["compact"]


def compact(writer: StoreWriter, *, chunk_rows: int = 256) -> int:
    """Build a copy of the store without its deleted rows and switch it in.

    Rows of the remaining images are renumbered ``0..N'-1`` in order; retrievers opened before
    notice (the manifest's generation changes) and must be reopened.

    The writer (which holds the store's lock) sees the compacted store afterwards.

    Returns
    -------
    int
        The number of rows removed.
    """
    root = writer.root
    store = writer.reader()
    deleted = store.deleted_rows
    if len(deleted) == 0:
        return 0
    staging = root / COMPACT_DIR
    if staging.exists() or staging.is_symlink():
        remove_tree(staging)
    staging.mkdir()
    m = writer.manifest
    fresh = initialise_store(
        staging,
        m.model.config,
        m.style.layout,
        style_dtype=m.style.dtype,
        model_record=m.model,
        created=m.created,
    )
    purged = m.purged + tuple(PurgedImage(d.image_id, d.sha256, d.deleted) for d in m.deleted)
    # the same float16 scales keep the stored bits identical
    write_manifest(
        staging,
        fresh.replace(
            style=dataclasses.replace(fresh.style, scales=m.style.scales),
            rejected=m.rejected,
            purged=purged,
            faiss_files=m.faiss_files or bool(m.faiss),
        ),
    )

    new = StoreWriter(staging, lock=WriterLock(staging))
    try:
        live = np.flatnonzero(store.live)
        meta = store.metadata().drop_columns(["row"])
        features = store.features()
        for a in range(0, len(live), chunk_rows):
            rows = live[a : a + chunk_rows]
            new.append(
                features=features[rows],
                style=store.style_rows(rows.tolist()),
                masks=store.mask_rows(rows.tolist()),
                records=meta.take(pa.array(rows)),
            )
        new.build_derived(sketch_dim=m.sketch.dim_requested if m.sketch else 256)
    finally:
        new.close()
    (staging / LOCK_NAME).unlink(missing_ok=True)
    if read_manifest(staging).rows != len(live):
        raise StoreFormatError(
            f"{root}: the compacted copy is incomplete; the store was left as it was"
        )
    atomic_write_bytes(staging / COMPACT_READY, b"ready\n")
    finish_compaction(root)
    writer.reload()
    return len(deleted)
