"""Benchmark images from real pixels: variations of the photographs scikit-image ships.

Synthetic blobs give tight bounds and clean masks; real photographs do not. Each image here is
a random crop of one of scikit-image's sample photographs (colour and grey: astronaut, coffee,
retina, immunohistochemistry, Hubble, gravel, grass, brick, ...), randomly flipped and rotated,
with its colours jittered (hue, saturation, brightness, contrast) and, for a share of them,
a synthetic lesion blended in, so that textures, colours and masks vary as they do on
photographs. Everything is seeded: the same arguments give the same images.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

__all__ = ["SOURCES", "photo_variation", "write_photo_set"]

SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "retina",
    "immunohistochemistry",
    "hubble_deep_field",
    "stereo_motorcycle",
    "colorwheel",
    "brick",
    "grass",
    "gravel",
    "camera",
    "moon",
    "coins",
    "cell",
    "clock",
)
"""scikit-image sample photographs that ship with the package (no download)."""


@cache
def _source(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float64) / max(1.0, float(image.max())))).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def photo_variation(seed: int, size: int) -> Image.Image:
    """One seeded RGB image of ``size x size`` pixels made from a real photograph."""
    rng = np.random.default_rng(seed)
    src = _source(SOURCES[int(rng.integers(len(SOURCES)))])
    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = src[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    image = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    hsv = np.asarray(image.convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-40, 41))) % 256
    image = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.4, 1.6)))
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.7, 1.4)))
    if rng.random() < 0.4:
        from dermris.indexer.synthetic import TEXTURE_CLASSES, synthetic_lesion

        lesion = synthetic_lesion(TEXTURE_CLASSES[int(rng.integers(4))], seed=seed, size=size)
        alpha = Image.fromarray((lesion.mask * float(rng.uniform(120, 230))).astype(np.uint8))
        image = Image.composite(lesion.image, image, alpha)
    return image


def _write(args) -> str:
    folder, seed, size, quality = args
    path = Path(folder) / f"PHOTO_{seed:06d}.jpg"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        photo_variation(seed, size).save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, path)
    return str(path)


def write_photo_set(
    folder: str | os.PathLike,
    n: int,
    *,
    size: int,
    seed: int = 0,
    quality: int = 90,
    processes: int | None = None,
    first: int = 0,
) -> Path:
    """Write ``n`` JPEGs of ``size`` px into ``folder`` (kept between runs); returns the folder.

    The images are numbers ``first .. first + n - 1`` of the seeded sequence (``PHOTO_<i>``
    for ``seed=0``), so sets written in parts are the same images as one written whole.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), seed * 1_000_003 + i, size, quality) for i in range(first, first + n)]
    processes = processes or max(1, (os.cpu_count() or 2))
    if processes == 1 or n < 64:
        for job in jobs:
            _write(job)
    else:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write, jobs, chunksize=16))
    return folder
