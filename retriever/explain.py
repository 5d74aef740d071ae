"""Explanations of a ranking: which style stages make up a style loss, and mask outlines.

The style vector packs ``sqrt(w_s) * triu(G_s)`` stage after stage (off-diagonal entries times
``sqrt(2)``), so the style loss splits exactly into one term per block stage:
``LS(x, y) = sum_s ||v_s(x) - v_s(y)||^2`` with
``||v_s(x) - v_s(y)||^2 = w_s ||G_s^x - G_s^y||_F^2``.
The Dice score is what the two lesion masks share; drawing their outlines over the images makes
it visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dermris.core.style_layout import StyleLayout

__all__ = [
    "SAME_STYLE",
    "Explanation",
    "StageLoss",
    "mask_outline",
    "outline_of",
    "stage_losses",
    "stage_summary",
    "style_stages",
    "unpack_mask",
]


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
        return {
            "stage": self.stage,
            "channels": self.channels,
            "loss": self.loss,
            "share": self.share,
        }


def stage_losses(layout: StyleLayout, losses: np.ndarray) -> list[StageLoss]:
    """:class:`StageLoss` records from the style loss of every stage (in stage order)."""
    values = [float(v) for v in losses]
    total = sum(values)
    return [
        StageLoss(s, c, loss, loss / total if total > 0 else 0.0)
        for s, (c, loss) in enumerate(zip(layout.channels, values, strict=True))
    ]


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
    return stage_losses(layout, np.add.reduceat(sq, np.asarray(layout.offsets[:-1], np.intp)))


def unpack_mask(packed: np.ndarray, size: int) -> np.ndarray:
    """A bit-packed ``size x size`` mask as ``(size, size)`` bool."""
    return (
        np.unpackbits(np.asarray(packed, np.uint8), count=size * size)
        .astype(bool)
        .reshape(size, size)
    )


def outline_of(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a 2-d bool mask (mask pixels with a 4-neighbour outside it or on
    the image border)."""
    mask = np.asarray(mask, bool)
    interior = mask.copy()
    interior[1:, :] &= mask[:-1, :]
    interior[:-1, :] &= mask[1:, :]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[0, :] = interior[-1, :] = False
    interior[:, 0] = interior[:, -1] = False
    return mask & ~interior


def mask_outline(packed: np.ndarray, size: int) -> np.ndarray:
    """The boundary pixels of a bit-packed ``size x size`` mask, ``(size, size)`` bool."""
    return outline_of(unpack_mask(packed, size))


@dataclass(frozen=True)
class Explanation:
    """Why a search ranked its hits as it did, for every row in a result.

    Attributes
    ----------
    mask_size : int
        Side of the masks (they cover the whole image, resized to a square).
    query_mask : np.ndarray
        The query's bit-packed lesion mask.
    masks : dict of int to np.ndarray
        Row -> its bit-packed lesion mask (Dice compares it with ``query_mask``).
    stages : dict of int to list of StageLoss
        Row -> the style loss between the query and the row, split by block stage.
    """

    mask_size: int
    query_mask: np.ndarray
    masks: dict
    stages: dict

    def top_stages(self, row: int, n: int = 3) -> list[StageLoss]:
        """The ``n`` stages that make up most of the style loss to ``row``, largest first."""
        return sorted(self.stages[row], key=lambda s: -s.loss)[:n]


SAME_STYLE = 1e-6
"""A hit whose style score ``ss`` is within this of 1 has the query's style up to the store's
float16 rounding: its stage shares are rounding noise and are not shown."""


def stage_summary(explanation: Explanation, hit, n: int = 3) -> list[StageLoss]:
    """The stages worth naming for ``hit``: :meth:`Explanation.top_stages`, or none when the hit
    has the query's style (``ss`` within :data:`SAME_STYLE` of 1)."""
    if hit.components.get("ss", 0.0) > 1.0 - SAME_STYLE:
        return []
    return explanation.top_stages(hit.row, n)
