"""Recovery: what a writer does, under the store's lock, before it touches a store.

* An interrupted compaction is finished (a complete copy marked ``READY`` is switched in) or
  cleared (an incomplete copy is removed; the store itself was never touched).
* Files an interrupted writer left are removed: Parquet parts and FAISS parts the manifest
  does not list (independent readers list ``metadata/`` themselves), and temporary files.

Readers never call this: opening a store for reading never moves or deletes anything. Only
regular files and real directories inside the store are removed or moved; symbolic links are
removed as links, never followed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dermris.core.atomic import fsync_dir
from dermris.core.errors import StoreFormatError

from ._files import inside
from ._format import ARRAYS_DIR, FAISS_DIR, MANIFEST_NAME, METADATA_DIR, Manifest

__all__ = [
    "COMPACT_DIR",
    "COMPACT_OLD",
    "COMPACT_READY",
    "compaction_pending",
    "finish_compaction",
    "remove_tree",
    "remove_uncommitted_files",
]

COMPACT_DIR = ".compact"
COMPACT_OLD = ".compact-old"
COMPACT_READY = "READY"
_SWITCHED = (ARRAYS_DIR, METADATA_DIR, FAISS_DIR)


def _real_dir(path: Path) -> bool:
    """A directory that is not a symbolic link."""
    return path.is_dir() and not path.is_symlink()


def remove_tree(path: Path) -> None:
    """Remove a directory inside the store; a symbolic link is unlinked, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def compaction_pending(root: Path) -> bool:
    """Whether a complete compacted copy waits to be switched in."""
    staging = root / COMPACT_DIR
    return (
        _real_dir(staging)
        and (staging / COMPACT_READY).is_file()
        and not (staging / COMPACT_READY).is_symlink()
    )


def finish_compaction(root: Path) -> None:
    """Switch a complete compacted store (``.compact/``, marked READY) into place; idempotent.

    Only a writer holding the store's lock may call this. Only real directories inside the
    store are moved or removed; symbolic links are removed as links, never followed.
    """
    staging, old = root / COMPACT_DIR, root / COMPACT_OLD
    if not compaction_pending(root):
        if staging.exists() or staging.is_symlink():
            remove_tree(staging)  # an incomplete copy: the store itself was never touched
        if old.exists() or old.is_symlink():
            remove_tree(old)
        return
    if old.is_symlink() or (old.exists() and not old.is_dir()):
        old.unlink()
    old.mkdir(exist_ok=True)
    for name in _SWITCHED:
        source = staging / name
        if source.is_symlink():
            raise StoreFormatError(
                f"{source} is a symbolic link; refusing to switch it into the store"
            )
        if _real_dir(source):
            current = root / name
            if current.exists() or current.is_symlink():
                parked = old / name
                if parked.exists() or parked.is_symlink():
                    remove_tree(parked)
                os.replace(current, parked)
            os.replace(source, current)
    fsync_dir(root)
    new_manifest = staging / MANIFEST_NAME
    if new_manifest.is_file() and not new_manifest.is_symlink():
        os.replace(new_manifest, root / MANIFEST_NAME)
        fsync_dir(root)
    remove_tree(staging)
    remove_tree(old)


def remove_uncommitted_files(root: Path, manifest: Manifest) -> None:
    """Delete what an interrupted writer left: unlisted Parquet and FAISS parts, temporary files.

    Only regular files inside the store are removed, never through a symbolic link.
    """
    listed = {
        METADATA_DIR: {p.file for p in manifest.metadata_parts},
        FAISS_DIR: {p.file for p in manifest.faiss_parts}
        | {os.path.basename(f.file) for f in manifest.faiss},
    }
    for folder, keep in listed.items():
        directory = inside(root, folder)
        if directory.is_dir() and not directory.is_symlink():
            for path in directory.iterdir():
                if path.name not in keep and path.is_file() and not path.is_symlink():
                    path.unlink()
    for dirpath, _dirnames, filenames in os.walk(root):  # os.walk does not follow links
        for name in filenames:
            if name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp")):
                path = Path(dirpath) / name
                if not path.is_symlink():
                    path.unlink()
