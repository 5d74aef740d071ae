"""Gram matrices and the style vector.

The paper's style loss (eq. 6) is ``LS(x, y) = sum_s w_s * ||G_s^x - G_s^y||_F^2`` over the
block stages ``s``. Because every Gram matrix is symmetric, packing
``v = concat_s sqrt(w_s) * triu(G_s)`` with the off-diagonal entries multiplied by ``sqrt(2)``
gives ``LS(x, y) == ||v_x - v_y||^2`` exactly, which turns style search into an L2 problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["gram_matrix", "StyleLayout", "style_loss_from_grams"]


def gram_matrix(feature_map: torch.Tensor) -> torch.Tensor:
    """Return the Gram matrices ``F F^T / (H W)`` of a batch of feature maps.

    Parameters
    ----------
    feature_map : torch.Tensor
        Shape ``(B, C, H, W)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B, C, C)``, float32 (computed in float32 even under autocast).
    """
    if feature_map.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(feature_map.shape)}")
    b, c, h, w = feature_map.shape
    with torch.autocast(device_type=feature_map.device.type, enabled=False):
        if feature_map.is_contiguous(memory_format=torch.channels_last) and not feature_map.is_contiguous():
            rows = feature_map.permute(0, 2, 3, 1).reshape(b, h * w, c).float()  # NHWC: no copy before the cast
            return torch.bmm(rows.transpose(1, 2), rows) / float(h * w)
        flat = feature_map.reshape(b, c, h * w).float()
        return torch.bmm(flat, flat.transpose(1, 2)) / float(h * w)


@dataclass(frozen=True)
class StyleLayout:
    """Where each stage's packed upper triangle lives in the style vector.

    Parameters
    ----------
    channels : tuple of int
        ``C_s`` of every stage.
    weights : tuple of float
        ``w_s`` of every stage (the paper's beta squared).
    """

    channels: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.weights) or not self.channels:
            raise ConfigError("style layout needs one weight per stage and at least one stage")
        if any(c < 1 for c in self.channels) or any(not w > 0 for w in self.weights):
            raise ConfigError("style layout channels must be >= 1 and weights > 0")

    @classmethod
    def from_channels(
        cls, channels: Sequence[int], weights: Sequence[float] | None = None
    ) -> "StyleLayout":
        """Build a layout; ``weights=None`` gives the default ``w_s = 1 / C_s ** 2``."""
        channels = tuple(int(c) for c in channels)
        if weights is None:
            weights = tuple(1.0 / (c * c) for c in channels)
        return cls(channels, tuple(float(w) for w in weights))

    @property
    def lengths(self) -> tuple[int, ...]:
        """Packed length ``C_s (C_s + 1) / 2`` of each stage."""
        return tuple(c * (c + 1) // 2 for c in self.channels)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each stage in the style vector (plus the total length at the end)."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def dim(self) -> int:
        """Length ``D`` of the style vector."""
        return self.offsets[-1]

    def stage_index(self) -> np.ndarray:
        """Return, for each of the ``D`` columns, the stage it belongs to (int32)."""
        return np.repeat(np.arange(len(self.channels), dtype=np.int32), self.lengths)

    def _packing(self, stage: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.channels[stage]
        rows, cols = torch.triu_indices(c, c, device=device)
        factor = torch.full((rows.numel(),), math.sqrt(2.0), device=device)
        factor[rows == cols] = 1.0
        return torch.stack([rows, cols]), factor * math.sqrt(self.weights[stage])

    def pack(self, grams: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pack per-stage Gram matrices ``(B, C_s, C_s)`` into style vectors ``(B, D)``."""
        if len(grams) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} Gram matrices, got {len(grams)}")
        parts = []
        for s, g in enumerate(grams):
            if g.shape[-1] != self.channels[s] or g.shape[-2] != self.channels[s]:
                raise ValueError(f"stage {s}: expected {self.channels[s]} channels, got {tuple(g.shape)}")
            index, factor = self._packing(s, g.device)
            parts.append(g[:, index[0], index[1]].float() * factor)
        return torch.cat(parts, dim=1)

    def to_dict(self) -> dict:
        """Return a JSON-ready dictionary."""
        return {"channels": list(self.channels), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, data: dict) -> "StyleLayout":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(int(c) for c in data["channels"]), tuple(float(w) for w in data["weights"]))


def style_loss_from_grams(
    grams_x: Sequence[torch.Tensor], grams_y: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """Style loss computed directly from Gram matrices (paper eq. 6), for checks.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``: ``sum_s w_s * ||G_s^x - G_s^y||_F^2`` in float64.
    """
    total = None
    for gx, gy, w in zip(grams_x, grams_y, weights, strict=True):
        term = w * ((gx.double() - gy.double()) ** 2).sum(dim=(-2, -1))
        total = term if total is None else total + term
    return total
