"""The seven augmentations of the paper (section 3.2), on ``(3, H, W)`` float images in [0, 1].

GridMask (Chen et al. 2020), random left/right flip, random up/down flip, random brightness,
contrast, hue and saturation. Masks follow the geometric transforms (the flips) only. Use
:func:`expand_offline` for the paper's 7x expansion (each image plus one copy per augmentation)
or :func:`random_augment` on the fly.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF

__all__ = ["AUGMENTATIONS", "grid_mask", "augment", "expand_offline", "random_augment"]

AUGMENTATIONS = ("gridmask", "hflip", "vflip", "brightness", "contrast", "hue", "saturation")


def grid_mask(
    image: torch.Tensor,
    rng: np.random.Generator,
    *,
    d_range: tuple[float, float] = (0.1, 0.3),
    ratio: float = 0.6,
) -> torch.Tensor:
    """GridMask: zero a square of side ``(1 - ratio) d`` in every ``d x d`` unit of a shifted grid.

    Parameters
    ----------
    image : torch.Tensor
        ``(3, H, W)``.
    rng : numpy.random.Generator
        Randomness (unit size and offsets).
    d_range : (float, float)
        Unit size as a fraction of the shorter side.
    ratio : float
        The paper's ``r``: the kept fraction of each unit's side (keep ratio ``1 - (1 - r)^2``).
    """
    _, h, w = image.shape
    d = max(2, int(rng.uniform(*d_range) * min(h, w)))
    side = max(1, int(round((1 - ratio) * d)))
    dy, dx = rng.integers(0, d, 2)
    ys = (np.arange(h) + dy) % d < side
    xs = (np.arange(w) + dx) % d < side
    drop = torch.from_numpy(ys[:, None] & xs[None, :])
    return image.masked_fill(drop[None], 0.0)


def augment(
    image: torch.Tensor, mask: torch.Tensor | None, name: str, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one named augmentation; geometric ones also to ``mask`` (``(H, W)``)."""
    if name == "gridmask":
        return grid_mask(image, rng), mask
    if name == "hflip":
        return image.flip(-1), None if mask is None else mask.flip(-1)
    if name == "vflip":
        return image.flip(-2), None if mask is None else mask.flip(-2)
    if name == "brightness":
        return TF.adjust_brightness(image, float(rng.uniform(0.75, 1.25))).clamp(0, 1), mask
    if name == "contrast":
        return TF.adjust_contrast(image, float(rng.uniform(0.75, 1.25))).clamp(0, 1), mask
    if name == "hue":
        return TF.adjust_hue(image, float(rng.uniform(-0.05, 0.05))).clamp(0, 1), mask
    if name == "saturation":
        return TF.adjust_saturation(image, float(rng.uniform(0.75, 1.25))).clamp(0, 1), mask
    raise ValueError(f"unknown augmentation {name!r}; expected one of {', '.join(AUGMENTATIONS)}")


def expand_offline(
    image: torch.Tensor, mask: torch.Tensor | None, rng: np.random.Generator
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The paper's expansion: the image plus one copy per augmentation (8 in all)."""
    return [(image, mask)] + [augment(image, mask, name, rng) for name in AUGMENTATIONS]


def random_augment(
    image: torch.Tensor, mask: torch.Tensor | None, rng: np.random.Generator, *, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """On-the-fly augmentation: each of the seven applied with probability ``p``."""
    for name in AUGMENTATIONS:
        if rng.random() < p:
            image, mask = augment(image, mask, name, rng)
    return image, mask
