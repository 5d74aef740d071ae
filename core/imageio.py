"""Safe image reading and decoding shared by indexing, querying and training.

* Only regular files are read (a FIFO, a device or a socket is refused without blocking), up to
  :data:`MAX_FILE_BYTES`.
* PIL decodes only the formats dermris lists (:data:`IMAGE_FORMATS`): a file of another format
  renamed ``.jpg`` (EPS, which PIL would hand to Ghostscript, for example) is refused.
* EXIF orientation is applied, every mode (grayscale, palette, RGBA, CMYK, 16-bit) becomes
  8-bit RGB, and PIL's decompression-bomb limit is an error.

Every failure is an :class:`ImageDecodeError` with a one-line reason.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageDecodeError, PixelBudgetError

__all__ = [
    "IMAGE_FORMATS",
    "MAX_FILE_BYTES",
    "to_rgb",
    "read_file_bytes",
    "decode_image_bytes",
    "decode_image",
    "to_pixels",
]

IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
"""The formats PIL may decode for dermris (the file endings it indexes: jpg, png, bmp, tif)."""

MAX_FILE_BYTES = 256 << 20
"""Largest image file read (256 MiB; full ISIC JPEGs are at most a few tens of MB)."""


_STRIP_PIXELS = 1 << 20
"""Pixels converted at a time from 16-bit, 32-bit and float images (8 MB of float64 a strip)."""


def _strips(image: Image.Image):
    """Yield ``(top, float64 rows)`` of a single-band image, about :data:`_STRIP_PIXELS` at a
    time (never the whole image as float64)."""
    width, height = image.size
    step = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        bottom = min(height, top + step)
        yield top, np.asarray(image.crop((0, top, width, bottom)), dtype=np.float64)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float images are rescaled, not clipped).

    16-bit, 32-bit integer and float images are converted in strips of rows: the arithmetic
    (float64, per pixel) is the same as over the whole image, the memory a few MB beyond the
    image itself.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        sixteen = image.mode.startswith("I;16")
        lo = hi = 0.0
        if not sixteen:
            lows, highs = [], []
            for _, values in _strips(image):
                finite = values[np.isfinite(values)]
                if finite.size:
                    lows.append(float(finite.min()))
                    highs.append(float(finite.max()))
            if lows:
                lo, hi = min(lows), max(highs)
        gray = np.empty((image.height, image.width), np.uint8)
        for top, values in _strips(image):
            if sixteen:
                scaled = values / 257.0
            else:
                values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
                if image.mode == "I" and lo >= 0 and hi <= 255:
                    scaled = values
                elif image.mode == "I" and lo >= 0 and hi <= 65535:
                    scaled = values / 257.0
                else:
                    scaled = (
                        (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
                    )
            gray[top : top + len(values)] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def read_file_bytes(path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes.

    Opened non-blocking, so a FIFO never hangs; anything that is not a regular file (FIFO,
    device, socket, directory) and any file over the limit is refused.

    Raises
    ------
    ImageDecodeError
        With a one-line reason.
    """
    name = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        reason = "symbolic link loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise ImageDecodeError(f"{name}: cannot read ({reason})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError(f"{name}: not a regular file")
        if info.st_size > max_bytes:
            raise ImageDecodeError(
                f"{name}: file of {info.st_size} bytes is over the {max_bytes}-byte limit"
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ImageDecodeError(
                    f"{name}: file grew over the {max_bytes}-byte limit while read"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def decode_image_bytes(
    data: bytes,
    *,
    name: str = "<bytes>",
    draft_size: int | None = None,
    max_pixels: int | None = None,
) -> tuple[Image.Image, int, int]:
    """Decode image bytes to an RGB PIL image with EXIF orientation applied.

    Parameters
    ----------
    data : bytes
        The encoded file.
    name : str
        Used in error messages.
    draft_size : int, optional
        Let JPEG decoding shrink by powers of two while keeping both sides >= this.
    max_pixels : int, optional
        Refuse images with more pixels than this (as decoded, after a JPEG's draft shrink)
        before their pixels are decoded (:class:`~dermris.core.errors.PixelBudgetError`).

    Returns
    -------
    (PIL.Image.Image, int, int)
        The RGB image, and the original width and height (after EXIF orientation).

    Raises
    ------
    ImageDecodeError
        With a one-line reason.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter(
                "ignore", UserWarning
            )  # e.g. "Corrupt EXIF data", "Truncated File Read"
            image: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageDecodeError(f"{name}: image has no pixels")
            if image.format == "JPEG" and draft_size:
                image.draft("RGB", (draft_size, draft_size))
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise PixelBudgetError(
                    f"{name}: {image.width} x {image.height} pixels is over the budget of "
                    f"{max_pixels} pixels"
                )
            image.load()
            try:
                orientation = image.getexif().get(0x0112, 1)
                image = ImageOps.exif_transpose(image)
            except Exception:  # a malformed EXIF block: keep the pixels as stored
                orientation = 1
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            image = to_rgb(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            f"{name}: too many pixels (PIL's decompression-bomb limit): {exc}"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            f"{name}: not an image of a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except MemoryError:
        raise ImageDecodeError(f"{name}: cannot decode (out of memory)") from None
    except (
        Exception
    ) as exc:  # PIL raises many types on hostile input; each is a reject, never a crash
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise ImageDecodeError(f"{name}: cannot decode ({type(exc).__name__}: {message})") from None
    return image, width, height


def decode_image(
    path: str | os.PathLike, *, draft_size: int | None = None, max_bytes: int = MAX_FILE_BYTES
) -> tuple[Image.Image, int, int, str]:
    """Read and decode one file; return ``(rgb_image, width, height, sha256_of_bytes)``."""
    data = read_file_bytes(path, max_bytes=max_bytes)
    image, width, height = decode_image_bytes(data, name=os.fsdecode(path), draft_size=draft_size)
    return image, width, height, hashlib.sha256(data).hexdigest()


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The model's input pixels: the whole RGB image resized (no crop) to ``size x size``.

    Bilinear resampling, ``(size, size, 3)`` uint8. Indexing and queries both go through this
    function, so a query with an indexed file reproduces its stored row.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
