"""Training losses of the paper: binary focal loss (members) and focal Tversky loss (segmenter)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["binary_focal_loss", "focal_tversky_loss"]


def binary_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Binary focal loss of Lin et al. (2017), mean over the batch.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t = p`` for positives and ``1 - p`` for
    negatives, ``alpha_t = alpha`` for positives and ``1 - alpha`` for negatives.

    Parameters
    ----------
    logits : torch.Tensor
        Raw scores, any shape.
    targets : torch.Tensor
        0/1 labels of the same shape.
    alpha : float
        Weight of the positive class (``alpha < 0`` disables the weighting).
    gamma : float
        Focusing parameter; 0 gives the (alpha-weighted) cross-entropy.
    """
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t), stable
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


def focal_tversky_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    *,
    alpha: float = 0.7,
    beta: float = 0.3,
    gamma: float = 0.75,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Focal Tversky loss of Abraham and Khan (2018), mean over the batch.

    ``TI = (TP + s) / (TP + alpha FN + beta FP + s)`` per image on soft predictions, and
    ``FTL = (1 - TI)^gamma`` (the paper's exponent ``1 / gamma`` with ``gamma = 4/3``).

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, 1, H, W)`` or ``(B, H, W)`` raw scores.
    masks : torch.Tensor
        0/1 masks of the same shape.
    alpha, beta : float
        Weights of false negatives and false positives (alpha > beta favours recall of small
        lesions).
    gamma : float
        Focal exponent applied to ``1 - TI``.
    smooth : float
        Additive smoothing.
    """
    p = torch.sigmoid(logits).reshape(logits.shape[0], -1)
    g = masks.to(p.dtype).reshape(masks.shape[0], -1)
    tp = (p * g).sum(dim=1)
    fn = ((1 - p) * g).sum(dim=1)
    fp = (p * (1 - g)).sum(dim=1)
    tversky = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    return ((1 - tversky).clamp(min=0) ** gamma).mean()
