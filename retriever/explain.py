"""Explanations of a ranking: which style stages make up a style loss, and mask outlines.

The style vector packs ``sqrt(w_s) * triu(G_s)`` stage after stage (off-diagonal entries times
``sqrt(2)``), so the style loss splits exactly into one term per block stage:
``LS(x, y) = sum_s ||v_s(x) - v_s(y)||^2`` with ``||v_s(x) - v_s(y)||^2 = w_s ||G_s^x - G_s^y||_F^2``.
The Dice score is what the two lesion masks share; drawing their outlines over the images makes
it visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dermris.models.gram import StyleLayout

__all__ = ["StageLoss", "style_stages", "mask_outline"]


@dataclass(frozen=True)
class StageLoss:
    """One block stage's part of a style loss.

    Attributes
    ----------
    stage : int
        Stage index (0 = the earliest, finest-grained block stage).
    channels : int
        Channels of the stage's feature maps (the Gram matrix is channels x channels).
    loss : float
        ``w_s ||G_s^x - G_s^y||_F^2``.
    share : float
        ``loss / LS`` (0 when the images have the same style).
    """

    stage: int
    channels: int
    loss: float
    share: float

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"stage": self.stage, "channels": self.channels, "loss": self.loss, "share": self.share}


def style_stages(layout: StyleLayout, a: np.ndarray, b: np.ndarray) -> list[StageLoss]:
    """Split the style loss between two (decoded) style vectors by block stage.

    Parameters
    ----------
    layout : StyleLayout
        The store's stage layout.
    a, b : np.ndarray
        ``(D,)`` style vectors as stored (decoded to float32).

    Returns
    -------
    list of StageLoss
        One per stage, in stage order; the losses add up to the style loss (float64).
    """
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    sq = diff * diff
    offsets = layout.offsets
    losses = [float(np.sum(sq[offsets[s]:offsets[s + 1]])) for s in range(len(layout.channels))]
    total = sum(losses)
    return [StageLoss(s, c, loss, loss / total if total > 0 else 0.0)
            for s, (c, loss) in enumerate(zip(layout.channels, losses))]


def mask_outline(packed: np.ndarray, size: int) -> np.ndarray:
    """The boundary pixels of a bit-packed ``size x size`` mask, ``(size, size)`` bool."""
    mask = np.unpackbits(np.asarray(packed, np.uint8), count=size * size).astype(bool).reshape(size, size)
    interior = mask.copy()
    interior[1:, :] &= mask[:-1, :]
    interior[:-1, :] &= mask[1:, :]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[0, :] = interior[-1, :] = False
    interior[:, 0] = interior[:, -1] = False
    return mask & ~interior
