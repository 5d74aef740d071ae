"""zstd decompression bounded by the size the caller expects, checked before anything is
allocated.

A zstd frame states how many bytes it decompresses to in its header (``Frame_Content_Size``,
RFC 8878 section 3.1.1.1). numcodecs (and so zarr) allocates that many bytes before
decompressing: a 32-KB chunk whose header says 1 GiB costs 1 GiB of memory, even though the
chunk's crc32c is valid. Every zstd chunk a store reads is parsed here first; a frame that
does not state its size, states another size than the chunk must have, or is not a zstd
frame at all is refused, and a frame that lies about its size fails inside a buffer of the
expected size (numcodecs never grows it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["frame_content_size", "decode_bounded", "zarr_chunks_problem"]

_MAGIC = 0xFD2FB528
_HEADER_MAX = 18  # magic 4, descriptor 1, window 1, dictionary id 4, content size 8


def frame_content_size(header: bytes | bytearray | memoryview | np.ndarray) -> int | None:
    """The decompressed size a zstd frame states in its header, or None when it states none.

    Parameters
    ----------
    header : bytes-like
        The frame's first bytes (18 are always enough).

    Raises
    ------
    ValueError
        Not the start of a zstd frame (wrong magic number, reserved bit set, truncated).
    """
    data = np.frombuffer(header, np.uint8)[:_HEADER_MAX].tobytes()
    if len(data) < 5 or int.from_bytes(data[:4], "little") != _MAGIC:
        raise ValueError("not a zstd frame")
    descriptor = data[4]
    if descriptor & 0x08:
        raise ValueError("zstd frame header has its reserved bit set")
    fcs_flag = descriptor >> 6
    single_segment = bool(descriptor & 0x20)
    did_size = (0, 1, 2, 4)[descriptor & 0x03]
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    pos = 5 + (0 if single_segment else 1) + did_size
    if fcs_size == 0:
        return None
    if len(data) < pos + fcs_size:
        raise ValueError("zstd frame header is truncated")
    value = int.from_bytes(data[pos : pos + fcs_size], "little")
    return value + 256 if fcs_size == 2 else value


def decode_bounded(payload: bytes | np.ndarray, expected: int) -> np.ndarray:
    """Decompress one zstd frame that must hold exactly ``expected`` bytes.

    The frame header is checked before any buffer is allocated, and the frame is
    decompressed into a buffer of ``expected`` bytes.

    Parameters
    ----------
    payload : bytes-like
        The compressed chunk (its checksum already verified and stripped).
    expected : int
        The chunk's decompressed size.

    Returns
    -------
    np.ndarray
        ``(expected,)`` uint8.

    Raises
    ------
    ValueError
        The frame states no size or another size, is not zstd, or fails to decompress into
        ``expected`` bytes; the message says which.
    """
    from numcodecs import Zstd

    buf = np.frombuffer(payload, np.uint8) if not isinstance(payload, np.ndarray) else payload
    stated = frame_content_size(buf[:_HEADER_MAX])
    if stated is None:
        raise ValueError("the zstd frame does not state its decompressed size")
    if stated != expected:
        raise ValueError(
            f"the zstd frame says it decompresses to {stated} bytes, the chunk has {expected}"
        )
    out = np.empty(expected, np.uint8)
    try:
        Zstd().decode(np.ascontiguousarray(buf), out=out)
    except Exception as exc:  # numcodecs raises RuntimeError or ValueError on bad frames
        raise ValueError(f"zstd: {exc}") from None
    return out


def zarr_chunks_problem(array_dir, arr, start: int, stop: int) -> str | None:
    """Check, before zarr decompresses them, that the zstd chunks holding rows
    ``[start, stop)`` of a zarr v3 array state the size their chunk must have.

    Only the first bytes of each chunk file are read. Arrays without zstd need nothing.

    Parameters
    ----------
    array_dir : Path
        The array's directory.
    arr : zarr.Array
        The opened array.
    start, stop : int
        The rows about to be read.

    Returns
    -------
    str or None
        What is wrong (a chunk stating another size, a chunk that is not a zstd frame, or
        zstd in a codec layout whose sizes cannot be checked), or None.
    """
    import os

    codecs = [c.get("name") for c in arr.metadata.to_dict()["codecs"]]
    if "zstd" not in codecs:
        return None
    if arr.shards is not None or codecs[1:] not in (["zstd"], ["zstd", "crc32c"]):
        return f"zstd in a codec layout dermris does not write ({' -> '.join(codecs)})"
    chunk_rows = arr.chunks[0]
    expected = int(np.prod(arr.chunks)) * arr.dtype.itemsize
    if stop <= start:
        return None
    for c in range(start // chunk_rows, (stop - 1) // chunk_rows + 1):
        key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
        try:
            with open(os.path.join(array_dir, key), "rb") as fh:
                header = fh.read(_HEADER_MAX)
        except FileNotFoundError:
            continue  # read as the fill value (stores that must have it check it elsewhere)
        except OSError as exc:
            return f"chunk {key} unreadable ({exc.strerror})"
        try:
            stated = frame_content_size(header)
        except ValueError as exc:
            return f"chunk {key}: {exc}"
        if stated != expected:
            said = "no size" if stated is None else f"{stated} bytes"
            return f"chunk {key}: its zstd frame states {said}, the chunk has {expected} bytes"
    return None
