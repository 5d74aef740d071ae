"""Style rows as memory-mapped views of their shard files (no copy, shared by processes).

A shard of the style array holds one uncompressed chunk per row: the row's bytes followed by
their crc32c. Zarr writes a shard's chunks one after the other, so the rows of a shard sit at a
fixed stride: the whole shard is one strided ``(rows, D)`` view of the mapped file, which every
process that maps it shares through the page cache. The store replaces a shard file by
renaming a new one into place (never in place), so a mapping always shows the file as it was
when it was opened: a reader's snapshot stays consistent beside a writer.

Every row's checksum is verified the first time it is read through the mapping
(:meth:`MappedRows.verify`; crc32c runs at several GB/s), never again in the same process. The
shard index must lay the rows out at one stride without overlaps; a shard that does not
(written by another tool) is read into memory through :class:`~.rows.ShardedRows` instead,
which verifies the same checksums.
"""

from __future__ import annotations

import mmap
import os
import threading

import google_crc32c
import numpy as np

from dermris.core.errors import StoreFormatError

from .rows import ShardedRows

__all__ = ["MappedRows"]


class MappedRows:
    """Shard-sized views of a sharded row array (uncompressed chunks).

    Parameters
    ----------
    rows_reader : ShardedRows
        The array's byte-level reader (its shard index parsing and checksums are reused).
    rows : int
        Committed rows (views never extend past them).
    """

    def __init__(self, rows_reader: ShardedRows, rows: int) -> None:
        if rows_reader.zstd:
            raise ValueError("only uncompressed chunks can be mapped")
        self.reader = rows_reader
        self.rows = rows
        self.shard_rows = rows_reader.shard_rows
        self.width = rows_reader.width
        self._views: dict[int, np.ndarray] = {}
        self._raw: dict[int, tuple[np.ndarray, int]] = {}  # shard -> (file bytes, first offset)
        self._verified: dict[int, np.ndarray] = {}  # shard -> rows whose checksum was checked
        self._lock = threading.Lock()
        self._map_lock = threading.Lock()
        self.mapped_bytes = 0

    def shard(self, shard: int) -> np.ndarray:
        """Rows ``[shard * shard_rows, ...)`` (up to the committed rows) as a read-only view of
        their stored values (``dtype`` as stored). Call :meth:`verify` before using rows."""
        with self._lock:
            view = self._views.get(shard)
        if view is not None:
            return view
        with self._map_lock:  # one shard mapped at a time: its file descriptor stays its own
            with self._lock:
                view = self._views.get(shard)
            if view is None:
                view = self._map(shard)
                with self._lock:
                    self._views[shard] = view
        return view

    def verify(self, shard: int, local: np.ndarray | None = None) -> None:
        """Check the crc32c of rows ``local`` of ``shard`` (default: all of them) unless they
        were checked already; a mismatch is a :class:`StoreFormatError`."""
        view = self.shard(shard)
        with self._lock:
            done = self._verified[shard]
            raw = self._raw.get(shard)
        todo = np.arange(len(view)) if local is None else np.unique(np.asarray(local, np.int64))
        todo = todo[~done[todo]]
        if not len(todo) or raw is None:
            return
        data, first = raw
        chunk = self.reader.row_bytes + 4
        row_bytes = self.reader.row_bytes
        for i in todo.tolist():
            start = first + i * chunk
            stored = int.from_bytes(data[start + row_bytes : start + chunk].tobytes(), "little")
            if google_crc32c.value(data[start : start + row_bytes]) != stored:
                base = shard * self.shard_rows
                raise StoreFormatError(
                    f"array {self.reader.name}: row {base + i} fails its checksum (damaged chunk)"
                )
        with self._lock:
            done[todo] = True

    def blocks(self, start: int = 0, stop: int | None = None):
        """Yield ``(first_row, view)`` shard by shard over rows ``[start, stop)`` (verified)."""
        stop = self.rows if stop is None else min(stop, self.rows)
        first = start
        while first < stop:
            shard = first // self.shard_rows
            base = shard * self.shard_rows
            view = self.shard(shard)
            end = min(stop, base + len(view))
            self.verify(shard, np.arange(first - base, end - base))
            yield first, view[first - base : end - base]
            first = end

    def _map(self, shard: int) -> np.ndarray:
        reader = self.reader
        base = shard * self.shard_rows
        count = min(self.shard_rows, self.rows - base)
        if count <= 0:
            raise IndexError(f"shard {shard} holds no committed rows")
        fd, index = reader._shard(shard)
        entries = index[:count]
        chunk = reader.row_bytes + 4
        offsets = entries[:, 0].astype(np.int64)
        sizes = entries[:, 1].astype(np.int64)
        uniform = bool(
            (entries[:, 0] != np.uint64(2**64 - 1)).all()
            and (sizes == chunk).all()
            and (np.diff(offsets) == chunk).all()
            and offsets[0] % reader.dtype.itemsize == 0
        )
        if not uniform:  # another layout: read it (checksums verified) and keep the copy
            copy = reader.read(np.arange(base, base + count))
            copy.flags.writeable = False
            self.mapped_bytes += copy.nbytes
            with self._lock:
                self._verified[shard] = np.ones(count, bool)
            return copy
        size = os.fstat(fd).st_size
        if offsets[0] + count * chunk > size:
            raise StoreFormatError(f"array {reader.name}: shard c/{shard}/0 points past its end")
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        with self._lock:
            self._raw[shard] = (np.frombuffer(mapping, np.uint8), int(offsets[0]))
            self._verified[shard] = np.zeros(count, bool)
        view = np.ndarray(
            (count, self.width),
            dtype=reader.dtype,
            buffer=mapping,
            offset=int(offsets[0]),
            strides=(chunk, reader.dtype.itemsize),
        )
        view.flags.writeable = False
        self.mapped_bytes += count * reader.row_bytes
        return view
