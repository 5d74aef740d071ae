"""Reading whole rows of sharded arrays by bytes, not by calls.

The style array (and the mask array of newer stores) keeps one row per chunk inside shards of
many rows (zarr v3 ``sharding_indexed``), so that a row can be read alone. Reading rows through
zarr costs one trip through its codec pipeline per row (about 12 ms per 160-KB row measured);
this module reads the same files directly, as the zarr v3 sharding specification lays them out:

* a shard file ends with its index, ``rows_per_shard`` pairs of little-endian ``uint64``
  ``(offset, nbytes)`` followed by the index's crc32c;
* each chunk is the row's bytes (optionally zstd-compressed) followed by their crc32c.

The rows a search needs are grouped by shard, sorted, and read with one ``pread`` per run of
adjacent chunks; every chunk's checksum is verified and a chunk missing from its shard is an
error (zarr would silently return the fill value). Arrays of any other layout are read through
zarr. Open file handles are kept per shard (LRU), which also keeps a reader's snapshot
consistent while a writer rewrites a shard to append rows.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import google_crc32c
import numpy as np

from dermris.core.errors import StoreFormatError

from ._zstd import decode_bounded

__all__ = ["ShardedRows", "index_problem"]

_EMPTY = np.uint64(2**64 - 1)
_MAX_GAP = 64 << 10  # read through gaps up to this many bytes between wanted chunks


def _crc32c(data) -> int:
    return google_crc32c.value(data)


def index_problem(index: np.ndarray, data_end: int, *, first_row: int = 0) -> str | None:
    """What is wrong with a shard index, or None when it is sound.

    Parameters
    ----------
    index : np.ndarray
        ``(rows, 2)`` uint64 ``(offset, nbytes)`` entries; ``offset == 2**64 - 1`` marks a
        chunk that was never written (then ``nbytes`` must be ``2**64 - 1`` too).
    data_end : int
        Where the chunks end (the file size less the index).
    first_row : int
        The row of the first entry (messages name rows).

    Returns
    -------
    str or None
        One phrase naming the first bad entry: an entry past the end of
        the file or whose ``offset + nbytes`` wraps around ``2**64``, a chunk too short to
        hold its checksum, two entries pointing at one chunk, or two overlapping chunks.
        Checksums cannot catch these: every chunk read through such an index can be a valid
        chunk of another row.
    """
    offsets = index[:, 0]
    sizes = index[:, 1]
    empty = offsets == _EMPTY
    half = np.flatnonzero(empty & (sizes != _EMPTY))
    if len(half):
        return f"the entry of row {first_row + int(half[0])} marks no chunk but gives a length"
    written = np.flatnonzero(~empty)
    if not len(written):
        return None
    off, n = offsets[written], sizes[written]
    end = np.uint64(max(data_end, 0))
    # offset <= end first, so that end - offset cannot wrap; then nbytes <= end - offset
    outside = (off > end) | (n > end - np.minimum(off, end))
    if outside.any():
        i = int(written[np.flatnonzero(outside)[0]])
        return (
            f"the entry of row {first_row + i} (offset {int(offsets[i])}, {int(sizes[i])} "
            f"bytes) points outside the {int(end)} bytes of chunks"
        )
    short = n < 4
    if short.any():
        i = int(written[np.flatnonzero(short)[0]])
        return (
            f"the chunk of row {first_row + i} is {int(sizes[i])} bytes, too short for its checksum"
        )
    order = np.argsort(off, kind="stable")
    off, n, rows = off[order], n[order], written[order]
    same = np.flatnonzero(off[1:] == off[:-1])
    if len(same):
        a, b = sorted((int(rows[same[0]]), int(rows[same[0] + 1])))
        return f"rows {first_row + a} and {first_row + b} point at one chunk"
    overlap = np.flatnonzero(off[1:] < off[:-1] + n[:-1])  # no wrap: both are within end
    if len(overlap):
        a, b = sorted((int(rows[overlap[0]]), int(rows[overlap[0] + 1])))
        return f"the chunks of rows {first_row + a} and {first_row + b} overlap"
    return None


class ShardedRows:
    """Direct row reads of a 2-D zarr v3 array with one row per inner chunk.

    Use :meth:`for_array`, which returns None when the array has another layout.

    Parameters
    ----------
    array_dir : Path
        The array's directory (holding ``zarr.json`` and ``c/``).
    name : str
        Array name, for error messages.
    shard_rows, width : int
        Rows per shard and values per row.
    dtype : numpy dtype
        Little-endian element type.
    zstd : bool
        Chunks are zstd-compressed.
    missing_ok : bool
        A row missing from its shard reads as zeros (zarr's fill value), for arrays written
        without ``write_empty_chunks``; otherwise it is an error.
    """

    def __init__(
        self,
        array_dir: Path,
        name: str,
        *,
        shard_rows: int,
        width: int,
        dtype,
        zstd: bool,
        missing_ok: bool = False,
        max_open: int = 64,
    ) -> None:
        self.dir = array_dir
        self.name = name
        self.shard_rows = shard_rows
        self.width = width
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_bytes = width * self.dtype.itemsize
        self.zstd = zstd
        self.missing_ok = missing_ok
        self._max_open = max_open
        self._open: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_array(
        cls, array_dir: Path, name: str, *, missing_ok: bool = False
    ) -> "ShardedRows | None":
        """A reader for the array in ``array_dir``, or None when its layout is not one row per
        inner chunk in shards with checksums (then read it through zarr)."""
        try:
            meta = json.loads((array_dir / "zarr.json").read_text("utf-8"))
            shape, codecs = meta["shape"], meta["codecs"]
            if len(shape) != 2 or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
                return None
            conf = codecs[0]["configuration"]
            shard_rows, shard_width = meta["chunk_grid"]["configuration"]["chunk_shape"]
            if conf["chunk_shape"] != [1, shape[1]] or shard_width != shape[1]:
                return None
            if conf.get("index_location", "end") != "end":
                return None
            if [c.get("name") for c in conf["index_codecs"]] != ["bytes", "crc32c"]:
                return None
            inner = [c.get("name") for c in conf["codecs"]]
            if inner not in (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"]):
                return None
            if conf["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
                return None
            if meta.get("chunk_key_encoding", {}).get("name", "default") != "default":
                return None
            separator = (
                meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
            )
            if separator != "/":
                return None
            dtype = np.dtype(meta["data_type"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        return cls(
            array_dir,
            name,
            shard_rows=int(shard_rows),
            width=int(shape[1]),
            dtype=dtype,
            zstd=inner[1] == "zstd",
            missing_ok=missing_ok,
        )

    # -- shards --------------------------------------------------------------------------
    def _shard(self, shard: int) -> tuple[int, np.ndarray]:
        with self._lock:
            hit = self._open.get(shard)
            if hit is not None:
                self._open.move_to_end(shard)
                return hit
        path = self.dir / "c" / str(shard) / "0"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if self.missing_ok:
                return -1, np.full((self.shard_rows, 2), _EMPTY, dtype="<u8")
            raise StoreFormatError(
                f"array {self.name}: shard file c/{shard}/0 is missing"
            ) from None
        except OSError as exc:
            raise StoreFormatError(
                f"array {self.name}: cannot open shard c/{shard}/0 ({exc.strerror})"
            ) from None
        try:
            size = os.fstat(fd).st_size
            index_bytes = 16 * self.shard_rows + 4
            if size < index_bytes:
                raise StoreFormatError(f"array {self.name}: shard c/{shard}/0 is truncated")
            raw = os.pread(fd, index_bytes, size - index_bytes)
            if _crc32c(np.frombuffer(raw, np.uint8)[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise StoreFormatError(
                    f"array {self.name}: the index of shard c/{shard}/0 fails its checksum"
                )
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.shard_rows, 2)
            problem = index_problem(index, size - index_bytes, first_row=shard * self.shard_rows)
            if problem is not None:
                raise StoreFormatError(
                    f"array {self.name}: the index of shard c/{shard}/0 is damaged ({problem})"
                )
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._open[shard] = (fd, index)
            while len(self._open) > self._max_open:
                _, (old, _) = self._open.popitem(last=False)
                os.close(old)
        return fd, index

    def close(self) -> None:
        """Close the cached shard files."""
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown
        try:
            self.close()
        except Exception:
            pass

    # -- rows ----------------------------------------------------------------------------
    def _decode(self, chunk: np.ndarray, row: int) -> np.ndarray:
        if len(chunk) < 4 or _crc32c(chunk[:-4]) != int.from_bytes(chunk[-4:].tobytes(), "little"):
            raise StoreFormatError(
                f"array {self.name}: row {row} fails its checksum (damaged chunk)"
            )
        payload = chunk[:-4]
        if self.zstd:  # bounded: a frame stating another size is refused before allocating
            try:
                payload = decode_bounded(payload, self.row_bytes)
            except ValueError as exc:
                raise StoreFormatError(
                    f"array {self.name}: row {row} cannot be decompressed ({exc})"
                ) from None
        if len(payload) != self.row_bytes:
            raise StoreFormatError(
                f"array {self.name}: row {row} has {len(payload)} bytes, expected {self.row_bytes}"
            )
        return np.frombuffer(payload, dtype=self.dtype)

    def read(self, rows) -> np.ndarray:
        """Rows (any order, repeats allowed) as ``(len(rows), width)``, checksums verified."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.width), dtype=self.dtype.newbyteorder("="))
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shards = sorted_rows // self.shard_rows
        bounds = np.flatnonzero(np.diff(shards)) + 1
        for group in np.split(np.arange(len(sorted_rows)), bounds):
            shard = int(shards[group[0]])
            fd, index = self._shard(shard)
            local = sorted_rows[group] - shard * self.shard_rows
            offsets, sizes = index[local, 0], index[local, 1]
            missing = offsets == _EMPTY
            if missing.any():
                if not self.missing_ok:
                    row = int(sorted_rows[group[np.flatnonzero(missing)[0]]])
                    raise StoreFormatError(
                        f"array {self.name}: row {row} is missing from shard c/{shard}/0"
                    )
                out[order[group[missing]]] = 0
                group, offsets, sizes = group[~missing], offsets[~missing], sizes[~missing]
            by_offset = np.argsort(offsets, kind="stable")
            run_start = 0
            while run_start < len(by_offset):
                first = by_offset[run_start]
                begin = int(offsets[first])
                end = begin + int(sizes[first])
                run_end = run_start + 1
                while run_end < len(by_offset):
                    nxt = by_offset[run_end]
                    if int(offsets[nxt]) - end > _MAX_GAP:
                        break
                    end = max(end, int(offsets[nxt]) + int(sizes[nxt]))
                    run_end += 1
                try:
                    buf = np.frombuffer(os.pread(fd, end - begin, begin), np.uint8)
                except OSError as exc:
                    raise StoreFormatError(
                        f"array {self.name}: cannot read shard c/{shard}/0 ({exc.strerror})"
                    ) from None
                for j in by_offset[run_start:run_end]:
                    start = int(offsets[j]) - begin
                    row = int(sorted_rows[group[j]])
                    out[order[group[j]]] = self._decode(buf[start : start + int(sizes[j])], row)
                run_start = run_end
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (a sequential scan), checksums verified."""
        return self.read(np.arange(start, stop, dtype=np.int64))
