"""Derived summaries that let the retriever bound every row without reading it.

* **Style sketch**: an orthonormal basis ``P`` (``d x D``, principal directions of the stored
  style vectors, mean ``mu``), each row's projection ``y = P (x - mu)``, residual norm
  ``r = ||(x - mu) - P^T y||`` and squared norm ``||x - mu||^2``. For any query ``q``:
  ``||y_q - y_x||^2 + (r_q - r_x)^2 <= ||q - x||^2 <= ||y_q - y_x||^2 + (r_q + r_x)^2``.
* **Mask block counts**: lesion pixels in each cell of a ``G x G`` grid; the intersection of
  two masks is at most ``sum_b min(a_b, c_b)``, which bounds Dice from above.

All arithmetic that the bounds rest on is float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "MASK_GRID",
    "mask_block_counts",
    "orthonormality_error",
    "StyleSketch",
    "fit_style_basis",
    "project_style",
]

MASK_GRID = 16
"""Cells per side of the mask block-count grid of new stores (stores made before use 8)."""


def mask_block_counts(masks: np.ndarray, grid: int = MASK_GRID) -> np.ndarray:
    """Lesion pixels per grid cell.

    Parameters
    ----------
    masks : np.ndarray
        ``(B, S, S)`` bool.
    grid : int
        Cells per side; must divide ``S`` (otherwise one cell, i.e. the area, is used).

    Returns
    -------
    np.ndarray
        ``(B, grid * grid)`` int32.
    """
    b, s, _ = masks.shape
    if s % grid:
        grid = 1
    cell = s // grid
    counts = masks.reshape(b, grid, cell, grid, cell).sum(axis=(2, 4), dtype=np.int64)
    return counts.reshape(b, grid * grid).astype(np.int32)


@dataclass
class StyleSketch:
    """The style sketch of a store's first ``rows`` rows.

    Attributes
    ----------
    components : np.ndarray
        ``(d, D)`` float32, orthonormal rows (``d`` may be 0).
    mean : np.ndarray
        ``(D,)`` float64.
    projections : np.ndarray
        ``(rows, d)`` float64.
    residuals : np.ndarray
        ``(rows,)`` float64.
    sq_norms : np.ndarray
        ``(rows,)`` float64 ``||x - mu||^2``.
    orthonormality_error : float
        ``||P P^T - I||_2`` of the float32 basis; the bounds widen by a multiple of it.
    """

    components: np.ndarray
    mean: np.ndarray
    projections: np.ndarray
    residuals: np.ndarray
    sq_norms: np.ndarray
    orthonormality_error: float

    @property
    def rows(self) -> int:
        """Rows covered."""
        return len(self.residuals)

    @property
    def dim(self) -> int:
        """Sketch dimension ``d``."""
        return self.components.shape[0]

    def extend(self, blocks: Iterable[np.ndarray]) -> "StyleSketch":
        """Return a sketch that also covers the rows in ``blocks`` (decoded style, in order)."""
        ys, rs, ns = [self.projections], [self.residuals], [self.sq_norms]
        for block in blocks:
            y, r, n = project_style(block, self.components, self.mean)
            ys.append(y)
            rs.append(r)
            ns.append(n)
        return StyleSketch(
            self.components,
            self.mean,
            np.concatenate(ys),
            np.concatenate(rs),
            np.concatenate(ns),
            self.orthonormality_error,
        )


def _column_blocks(dim: int, width: int = 1 << 15):
    for start in range(0, dim, width):
        yield slice(start, min(dim, start + width))


def _cuda(device) -> "torch.device | None":
    """The torch CUDA device to compute on, or None for NumPy on the CPU."""
    if device is None:
        return None
    import torch

    device = torch.device(device)
    return device if device.type == "cuda" else None


def fit_style_basis(sample: np.ndarray, dim: int, *, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Principal directions of a sample of style vectors.

    Uses the ``m x m`` Gram matrix of the centred sample (``m`` rows, ``m << D``), so the cost
    is ``m^2 D`` and memory ``m D`` float32.

    Parameters
    ----------
    sample : np.ndarray
        ``(m, D)`` float32 decoded style vectors.
    dim : int
        Wanted sketch dimension; fewer are kept when the sample has lower rank.

    device : torch.device, optional
        A CUDA device computes the same float64 arithmetic there (much faster for B6 rows).

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``components`` ``(d, D)`` float32 with orthonormal rows, ``mean`` ``(D,)`` float64.
    """
    m, big_d = sample.shape
    mean = sample.mean(axis=0, dtype=np.float64)
    if m < 2 or dim < 1:
        return np.zeros((0, big_d), np.float32), mean
    cuda = _cuda(device)
    if cuda is not None:
        import torch

        z = torch.from_numpy(np.ascontiguousarray(sample)).to(
            cuda, torch.float64
        ) - torch.from_numpy(mean).to(cuda)
        evals, evecs = torch.linalg.eigh(z @ z.T)
        evals, evecs = evals.flip(0), evecs.flip(1)
        keep = evals > max(float(evals[0]), 0.0) * 1e-10
        keep[dim:] = False
        evals, evecs = evals[keep], evecs[:, keep]
        basis = (evecs.T @ z) / torch.sqrt(evals)[:, None]
        del z
        if len(basis):
            q, _ = torch.linalg.qr(basis.T)
            basis = q.T
        return basis.to(torch.float32).cpu().numpy(), mean
    gram = np.zeros((m, m), np.float64)
    for cols in _column_blocks(big_d):
        z = sample[:, cols].astype(np.float64) - mean[cols]
        gram += z @ z.T
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    keep = evals > max(evals[0], 0.0) * 1e-10
    keep[dim:] = False
    evals, evecs = evals[keep], evecs[:, keep]
    basis = np.empty((len(evals), big_d), np.float64)
    for cols in _column_blocks(big_d):
        z = sample[:, cols].astype(np.float64) - mean[cols]
        basis[:, cols] = (evecs.T @ z) / np.sqrt(evals)[:, None]
    # Re-orthonormalise in float64 (QR of the transpose) before rounding to float32.
    if len(basis):
        q, _ = np.linalg.qr(basis.T)
        basis = q.T
    return basis.astype(np.float32), mean


def project_style(
    block: np.ndarray, components: np.ndarray, mean: np.ndarray, *, device=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projections, residual norms and squared norms of style vectors (float64 throughout).

    Parameters
    ----------
    block : np.ndarray
        ``(b, D)`` float32 (or float64) style vectors.
    components : np.ndarray
        ``(d, D)`` basis, float32 as stored (or already converted to float64: faster).
    mean : np.ndarray
        ``(D,)`` float64.

    device : torch.device, optional
        A CUDA device computes the same float64 arithmetic there.

    Returns
    -------
    (np.ndarray, np.ndarray, np.ndarray)
        ``y`` ``(b, d)``, ``r`` ``(b,)``, ``||x - mu||^2`` ``(b,)``, all float64.
    """
    block = np.atleast_2d(block)
    cuda = _cuda(device)
    if cuda is not None:
        import torch

        z_t = torch.from_numpy(np.ascontiguousarray(block)).to(
            cuda, torch.float64
        ) - torch.from_numpy(np.asarray(mean, np.float64)).to(cuda)
        p_t = torch.from_numpy(np.asarray(components)).to(cuda, torch.float64)
        y_t = z_t @ p_t.T
        sq_t = (z_t * z_t).sum(dim=1)
        e_t = z_t - y_t @ p_t
        return (
            y_t.cpu().numpy(),
            torch.sqrt((e_t * e_t).sum(dim=1)).cpu().numpy(),
            sq_t.cpu().numpy(),
        )
    b, big_d = block.shape
    d = components.shape[0]
    y = np.zeros((b, d), np.float64)
    sq = np.zeros(b, np.float64)
    for cols in _column_blocks(big_d):
        z = block[:, cols].astype(np.float64) - mean[cols]
        y += z @ np.asarray(components[:, cols], dtype=np.float64).T
        sq += np.einsum("ij,ij->i", z, z)
    res = np.zeros(b, np.float64)
    for cols in _column_blocks(big_d):
        z = block[:, cols].astype(np.float64) - mean[cols]
        e = z - y @ np.asarray(components[:, cols], dtype=np.float64)
        res += np.einsum("ij,ij->i", e, e)
    return y, np.sqrt(res), sq


def orthonormality_error(components: np.ndarray) -> float:
    """``||P P^T - I||_2`` computed in float64 (0 for an empty basis)."""
    d, big_d = components.shape
    if d == 0:
        return 0.0
    gram = np.zeros((d, d), np.float64)
    for cols in _column_blocks(big_d):
        p = components[:, cols].astype(np.float64)
        gram += p @ p.T
    return float(np.abs(np.linalg.eigvalsh(gram - np.eye(d))).max())
