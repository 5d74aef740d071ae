"""Synthetic, lesion-like dermoscopy images with known texture classes and masks.

Used by ``dermris demo`` and the tests: no data set can be downloaded here. Each image is a
skin-coloured background with an irregular, pigmented blob whose texture is one of
:data:`TEXTURE_CLASSES`; the blob is the ground-truth mask.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["TEXTURE_CLASSES", "SyntheticLesion", "synthetic_lesion", "write_synthetic_set"]

TEXTURE_CLASSES = ("globular", "reticular", "homogeneous", "streaks")
"""Texture classes of the synthetic lesions."""

_PIGMENTS = {
    "globular": (95, 60, 40),
    "reticular": (120, 80, 55),
    "homogeneous": (150, 95, 80),
    "streaks": (70, 45, 50),
}


@dataclass
class SyntheticLesion:
    """One synthetic image with its ground truth."""

    image: Image.Image
    mask: np.ndarray
    texture: str


def synthetic_lesion(texture: str, *, seed: int, size: int = 192) -> SyntheticLesion:
    """Draw one lesion-like RGB image.

    Parameters
    ----------
    texture : str
        One of :data:`TEXTURE_CLASSES`.
    seed : int
        Seed of shape, position, colours and noise.
    size : int
        Side of the square image in pixels.
    """
    if texture not in _PIGMENTS:
        raise ValueError(
            f"unknown texture {texture!r}; expected one of {', '.join(TEXTURE_CLASSES)}"
        )
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    skin = np.array([226, 180, 160], np.float64) + rng.normal(0, 8, 3)
    background = skin[None, None, :] * (0.9 + 0.1 * (xx[..., None] + yy[..., None]) / 2)
    background += rng.normal(0, 4, (size, size, 3))

    cx, cy = rng.uniform(0.35, 0.65, 2)
    ax, ay = rng.uniform(0.15, 0.32, 2)
    angle = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1 + sum(
        rng.uniform(0, 0.08) * np.sin(f * theta + rng.uniform(0, 6.3)) for f in (3, 5, 7)
    )
    radius = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) / wobble
    mask = radius < 1.0

    pigment = np.array(_PIGMENTS[texture], np.float64) + rng.normal(0, 10, 3)
    freq = rng.uniform(18, 30)
    if texture == "globular":
        pattern = (np.sin(freq * 2 * xx) * np.sin(freq * 2 * yy)) > 0.6
        shade = np.where(pattern, 0.55, 1.0)
    elif texture == "reticular":
        grid = np.abs(np.sin(freq * 1.5 * (xx + 0.3 * yy))) < 0.25
        grid |= np.abs(np.sin(freq * 1.5 * (yy - 0.3 * xx))) < 0.25
        shade = np.where(grid, 0.6, 1.1)
    elif texture == "homogeneous":
        shade = 1.0 + 0.05 * np.sin(3 * xx + 2 * yy)
    else:
        shade = 0.8 + 0.35 * (np.sin(freq * 1.2 * theta) > 0.3)
    lesion = pigment[None, None, :] * shade[..., None] + rng.normal(0, 6, (size, size, 3))
    edge = np.clip((1.0 - radius) * 8, 0, 1)[..., None]
    image = background * (1 - edge) + lesion * edge
    return SyntheticLesion(
        image=Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB"),
        mask=mask,
        texture=texture,
    )


def write_synthetic_set(
    folder: str | os.PathLike, *, per_class: int = 8, size: int = 192, seed: int = 0
) -> Path:
    """Write ``per_class`` JPEGs per texture class plus ``metadata.csv`` and mask PNGs.

    Returns
    -------
    Path
        The metadata CSV (columns ``image_id``, ``texture``, ``seed``).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for c, texture in enumerate(TEXTURE_CLASSES):
        for i in range(per_class):
            item_seed = seed * 100_003 + c * 10_007 + i
            lesion = synthetic_lesion(texture, seed=item_seed, size=size)
            image_id = f"SYN_{texture}_{i:03d}"
            lesion.image.save(folder / "images" / f"{image_id}.jpg", quality=92)
            Image.fromarray(lesion.mask.astype(np.uint8) * 255).save(
                folder / "masks" / f"{image_id}_segmentation.png"
            )
            rows.append({"image_id": image_id, "texture": texture, "seed": item_seed})
    csv_path = folder / "metadata.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image_id", "texture", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
