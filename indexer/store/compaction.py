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
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from dermris.models.atomic import atomic_write_bytes, fsync_dir
from dermris.models.errors import StoreFormatError

from ._files import read_manifest, write_manifest
from ._format import ARRAYS_DIR, FAISS_DIR, LOCK_NAME, MANIFEST_NAME, METADATA_DIR, PurgedImage

if TYPE_CHECKING:
    from .writer import StoreWriter

__all__ = ["COMPACT_DIR", "COMPACT_OLD", "compact", "finish_compaction", "compaction_pending"]

COMPACT_DIR = ".compact"
COMPACT_OLD = ".compact-old"
COMPACT_READY = "READY"
_SWITCHED = (ARRAYS_DIR, METADATA_DIR, FAISS_DIR)


def _real_dir(path: Path) -> bool:
    """A directory that is not a symbolic link."""
    return path.is_dir() and not path.is_symlink()


def _remove_tree(path: Path) -> None:
    """Remove a directory inside the store; a symbolic link is unlinked, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def compaction_pending(root: Path) -> bool:
    """Whether a complete compacted copy waits to be switched in."""
    staging = root / COMPACT_DIR
    return _real_dir(staging) and (staging / COMPACT_READY).is_file() and not (staging / COMPACT_READY).is_symlink()


def finish_compaction(root: Path) -> None:
    """Switch a complete compacted store (``.compact/``, marked READY) into place; idempotent.

    Only a writer holding the store's lock may call this. Only real directories inside the
    store are moved or removed; symbolic links are removed as links, never followed.
    """
    staging, old = root / COMPACT_DIR, root / COMPACT_OLD
    if not compaction_pending(root):
        if staging.exists() or staging.is_symlink():
            _remove_tree(staging)  # an incomplete copy: the store itself was never touched
        if old.exists() or old.is_symlink():
            _remove_tree(old)
        return
    if old.is_symlink() or (old.exists() and not old.is_dir()):
        old.unlink()
    old.mkdir(exist_ok=True)
    for name in _SWITCHED:
        source = staging / name
        if source.is_symlink():
            raise StoreFormatError(f"{source} is a symbolic link; refusing to switch it into the store")
        if _real_dir(source):
            current = root / name
            if current.exists() or current.is_symlink():
                parked = old / name
                if parked.exists() or parked.is_symlink():
                    _remove_tree(parked)
                os.replace(current, parked)
            os.replace(source, current)
    fsync_dir(root)
    new_manifest = staging / MANIFEST_NAME
    if new_manifest.is_file() and not new_manifest.is_symlink():
        os.replace(new_manifest, root / MANIFEST_NAME)
        fsync_dir(root)
    _remove_tree(staging)
    _remove_tree(old)


def compact(writer: "StoreWriter", *, chunk_rows: int = 256) -> int:
    """Build a copy of the store without its deleted rows and switch it in.

    Rows of the remaining images are renumbered ``0..N'-1`` in order; retrievers opened before
    notice (the manifest's generation changes) and must be reopened.

    Returns
    -------
    int
        The number of rows removed.
    """
    from .writer import StoreWriter, initialise_store

    root = writer.root
    store = writer.reader()
    deleted = store.deleted_rows
    if len(deleted) == 0:
        return 0
    staging = root / COMPACT_DIR
    if staging.exists() or staging.is_symlink():
        _remove_tree(staging)
    staging.mkdir()
    m = writer.manifest
    fresh = initialise_store(staging, m.model.config, m.style.layout, style_dtype=m.style.dtype,
                             model_record=m.model, created=m.created)
    purged = m.purged + tuple(PurgedImage(d.image_id, d.sha256, d.deleted) for d in m.deleted)
    # the same float16 scales keep the stored bits identical
    write_manifest(staging, fresh.replace(style=dataclasses.replace(fresh.style, scales=m.style.scales),
                                          rejected=m.rejected, purged=purged))
    from ._files import WriterLock

    new = StoreWriter(staging, lock=WriterLock(staging))
    try:
        live = np.flatnonzero(store.live)
        meta = store.metadata().drop_columns(["row"])
        features = store.features()
        for a in range(0, len(live), chunk_rows):
            rows = live[a:a + chunk_rows]
            new.append(features=features[rows], style=store.style_rows(rows.tolist()),
                       masks=store.mask_rows(rows.tolist()), records=meta.take(pa.array(rows)))
        new.build_derived(sketch_dim=m.sketch.dim_requested if m.sketch else 256)
    finally:
        new.close()
    (staging / LOCK_NAME).unlink(missing_ok=True)
    if read_manifest(staging).rows != len(live):
        raise StoreFormatError(f"{root}: the compacted copy is incomplete; the store was left as it was")
    atomic_write_bytes(staging / COMPACT_READY, b"ready\n")
    finish_compaction(root)
    return len(deleted)
