"""Gram matrices and the style vector.

The paper's style loss (eq. 6) is ``LS(x, y) = sum_s w_s * ||G_s^x - G_s^y||_F^2`` over the
block stages ``s``. Because every Gram matrix is symmetric, packing
``v = concat_s sqrt(w_s) * triu(G_s)`` with the off-diagonal entries multiplied by ``sqrt(2)``
gives ``LS(x, y) == ||v_x - v_y||^2`` exactly, which turns style search into an L2 problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dermris.core.style_layout import StyleLayout

__all__ = ["gram_matrix", "pack_style", "style_loss_from_grams"]


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
        raise ValueError(
            f"expected a (B, C, H, W) feature map, got shape {tuple(feature_map.shape)}"
        )
    b, c, h, w = feature_map.shape
    with torch.autocast(device_type=feature_map.device.type, enabled=False):
        if (
            feature_map.is_contiguous(memory_format=torch.channels_last)
            and not feature_map.is_contiguous()
        ):
            rows = (
                feature_map.permute(0, 2, 3, 1).reshape(b, h * w, c).float()
            )  # NHWC: no copy before the cast
            return torch.bmm(rows.transpose(1, 2), rows) / float(h * w)
        flat = feature_map.reshape(b, c, h * w).float()
        return torch.bmm(flat, flat.transpose(1, 2)) / float(h * w)


def _packing(
    layout: StyleLayout, stage: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    c = layout.channels[stage]
    rows, cols = torch.triu_indices(c, c, device=device)
    factor = torch.full((rows.numel(),), math.sqrt(2.0), device=device)
    factor[rows == cols] = 1.0
    return torch.stack([rows, cols]), factor * math.sqrt(layout.weights[stage])


def pack_style(layout: StyleLayout, grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pack per-stage Gram matrices ``(B, C_s, C_s)`` into style vectors ``(B, D)``.

    Parameters
    ----------
    layout : StyleLayout
        Stage channels and weights.
    grams : sequence of torch.Tensor
        One ``(B, C_s, C_s)`` Gram matrix per stage.
    """
    if len(grams) != len(layout.channels):
        raise ValueError(f"expected {len(layout.channels)} Gram matrices, got {len(grams)}")
    parts = []
    for s, g in enumerate(grams):
        if g.shape[-1] != layout.channels[s] or g.shape[-2] != layout.channels[s]:
            raise ValueError(
                f"stage {s}: expected {layout.channels[s]} channels, got {tuple(g.shape)}"
            )
        index, factor = _packing(layout, s, g.device)
        parts.append(g[:, index[0], index[1]].float() * factor)
    return torch.cat(parts, dim=1)


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
    assert total is not None, "no style stages"
    return total
