"""Safe image decoding shared by indexing, querying and training.

PIL only: EXIF orientation is applied, every mode (grayscale, palette, RGBA, CMYK, 16-bit) is
converted to 8-bit RGB, and PIL's decompression-bomb limit is enforced as an error. Every
failure is an :class:`ImageDecodeError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError

__all__ = ["to_rgb", "decode_image_bytes", "decode_image"]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float images are rescaled, not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scaled = values / 257.0
        else:
            lo, hi = float(values.min()), float(values.max())
            if image.mode == "I" and lo >= 0 and hi <= 255:
                scaled = values
            elif image.mode == "I" and lo >= 0 and hi <= 65535:
                scaled = values / 257.0
            else:
                scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image_bytes(data: bytes, *, name: str = "<bytes>", draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """Decode image bytes to an RGB PIL image with EXIF orientation applied.

    Parameters
    ----------
    data : bytes
        The encoded file.
    name : str
        Used in error messages.
    draft_size : int, optional
        Let JPEG decoding shrink by powers of two while keeping both sides >= this.

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
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if image.format == "JPEG" and draft_size:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            orientation = image.getexif().get(0x0112, 1)
            image = ImageOps.exif_transpose(image)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            image = to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{name}: too many pixels (PIL's decompression-bomb limit): {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as exc:
        raise ImageDecodeError(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{name}: image has no pixels")
    return image, width, height


def decode_image(path: str | os.PathLike, *, draft_size: int | None = None) -> tuple[Image.Image, int, int, str]:
    """Read and decode one file; return ``(rgb_image, width, height, sha256_of_bytes)``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    image, width, height = decode_image_bytes(data, name=str(path), draft_size=draft_size)
    return image, width, height, hashlib.sha256(data).hexdigest()
