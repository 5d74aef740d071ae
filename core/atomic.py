"""Durable, atomic file writes: the one helper every writer in dermris uses.

A file is written to a temporary name in the same directory, flushed and fsynced, given the
permissions a newly created file would get under the current umask, renamed over the target,
and the directory is fsynced. A reader therefore sees either the old file or the new one,
never a partial one, and a crash right after the call cannot lose the new file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "append_durably",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "default_file_mode",
    "fsync_dir",
    "fsync_file",
    "rename_durably",
]


def default_file_mode() -> int:
    """Permissions of a file created now (``0o666`` less the process umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and new entries in it survive a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` durably.

    For libraries that write to a path themselves (safetensors, FAISS, ``torch.save``,
    pyarrow). On an exception the temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> with atomic_path("index.faiss") as tmp:          # doctest: +SKIP
    ...     faiss.write_index(index, str(tmp))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # some writers replace the file mkstemp made (0600)
        fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None
) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` durably.

    Parameters
    ----------
    path : path-like
        The file to write.
    mode : str
        ``"wb"`` (default) or ``"w"``.
    encoding : str, optional
        Text encoding for ``mode="w"`` (default UTF-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as fh:
            yield fh
            fh.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def append_durably(path: str | os.PathLike, text: str, *, file_mode: int = 0o666) -> None:
    """Append ``text`` to a log file and fsync it before returning (a record is never lost).

    ``file_mode`` is the permission a new file is created with (less the umask), e.g.
    ``0o600`` for a log only its owner may read.
    """
    path = Path(path)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode)
    try:
        view = memoryview(text.encode("utf-8"))
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def rename_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` to ``target`` (replacing it) and fsync the directory (log rotation)."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)
