"""The store directory on disk: reading and committing the manifest, the writer lock, and
paths that never lead outside the store."""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from dermris.core.atomic import atomic_write_bytes
from dermris.core.errors import (
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
)

from ._format import LOCK_NAME, MANIFEST_NAME, Manifest, now

__all__ = ["read_manifest", "write_manifest", "manifest_stamp", "inside", "WriterLock"]

_MAX_MANIFEST_BYTES = 256 << 20


def inside(root: Path, relative: str | os.PathLike, *, must_exist: bool = False) -> Path:
    """``root / relative``, refusing any path that resolves (through ``..`` or a symbolic link)
    outside the store.

    Raises
    ------
    StoreFormatError
        If the path leaves the store.
    """
    path = root / relative
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise StoreFormatError(
            f"{root}: {relative} leads outside the store (symbolic link or '..')"
        )
    if must_exist and not os.path.exists(real):
        raise StoreFormatError(f"{root}: {relative} is missing")
    return path


def read_manifest(root: Path) -> Manifest:
    """Read and validate ``root/manifest.json``.

    Raises
    ------
    StoreNotFoundError
        No store at ``root``.
    StoreFormatError
        A damaged, foreign or wrongly typed manifest (one line).
    """
    if not root.exists():
        raise StoreNotFoundError(f"no store at {root}")
    path = root / MANIFEST_NAME
    if path.is_symlink():
        raise StoreFormatError(
            f"{path} is a symbolic link; a store's manifest must be a plain file"
        )
    if not path.is_file():
        raise StoreNotFoundError(f"{root} is not a dermris store (no {MANIFEST_NAME})")
    try:
        size = path.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise StoreFormatError(f"{path} is {size} bytes; not a dermris manifest")
        data = path.read_bytes()
    except PermissionError as exc:
        raise StoreReadOnlyError(f"cannot read {path}: {exc.strerror}") from None
    except OSError as exc:
        raise StoreFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    return Manifest.from_json(data, source=str(path))


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Commit ``manifest`` (stamped with the time): the atomic rename is the commit point."""
    manifest = manifest.replace(updated=now())
    try:
        atomic_write_bytes(root / MANIFEST_NAME, manifest.to_json())
    except PermissionError as exc:
        raise StoreReadOnlyError(f"cannot write to {root}: {exc.strerror}") from None
    return manifest


def manifest_stamp(root: Path) -> tuple[int, int] | None:
    """Inode and modification time of the manifest (every commit renames a new file into place)."""
    try:
        info = (root / MANIFEST_NAME).stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


class WriterLock:
    """The store's one-writer lock (``STORE/.writer.lock``, via :mod:`filelock`).

    Parameters
    ----------
    root : Path
        The store directory.
    timeout : float
        Seconds to wait for another writer; 0 fails at once with :class:`StoreLockedError`.
    """

    def __init__(self, root: Path, *, timeout: float = 0.0) -> None:
        self.root = root
        lock_path = inside(root, LOCK_NAME)
        if lock_path.is_symlink():
            raise StoreFormatError(f"{lock_path} is a symbolic link")
        self._lock = FileLock(str(lock_path), timeout=timeout, thread_local=False)
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreLockedError(f"another process is writing to {root}") from None
        except PermissionError as exc:
            raise StoreReadOnlyError(f"cannot write to {root}: {exc.strerror or exc}") from None
        except OSError as exc:
            raise StoreReadOnlyError(
                f"cannot lock {root} for writing: {exc.strerror or exc}"
            ) from None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._lock.is_locked

    def release(self) -> None:
        """Release the lock (also released when the process ends)."""
        if self._lock.is_locked:
            self._lock.release(force=True)
