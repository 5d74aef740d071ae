"""The in-memory part of a store that the exact search needs (style rows stay on disk).

:class:`StoreIndex` holds, for every committed row, the 1024-d features and their norms, the
mask areas (and the masks themselves up to a size), the Dice block counts, and the style
sketch (projections, residuals) the style-loss bounds come from. It also owns the one exact
arithmetic every score goes through (:func:`distance_and_dot`, :func:`squared_distances`),
so that a row's value never depends on the path that computed it. NumPy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dermris.indexer.store import Store, StyleSketch, mask_block_counts

from .measures import dice_score
from .types import SearchOptions

__all__ = [
    "StoreIndex",
    "distance_and_dot",
    "cosine_of",
    "squared_distances",
    "mask_block_counts_of",
]

_FEATURE_BLOCK = 8192


class StoreIndex:
    """The in-memory part of a store the bounds need (style rows stay on disk).

    Parameters
    ----------
    store : Store
        An opened store snapshot.
    options : SearchOptions, optional
        Memory limits, the cost model and whether FAISS answers the feature measures.
    use_gpu : bool
        Put the FAISS indexes on the GPU (faiss-gpu).
    """

    def __init__(
        self, store: Store, *, options: SearchOptions | None = None, use_gpu: bool = False
    ) -> None:
        options = options if options is not None else SearchOptions()
        self.store = store
        self.options = options
        self.cost = options.cost_model
        self.use_gpu = use_gpu
        self.rows = store.rows
        self.features = store.features()
        self.feature_sq = (
            np.concatenate(
                [
                    np.sum(b * b, axis=1)
                    for b in (
                        self.features[a : a + _FEATURE_BLOCK].astype(np.float64)
                        for a in range(0, self.rows, _FEATURE_BLOCK)
                    )
                ]
            )
            if self.rows
            else np.zeros(0)
        )
        self.feature_norms = np.sqrt(self.feature_sq)
        self.live = store.live
        self.mask_areas = store.mask_areas()
        self.style_row_bytes = store.style_row_bytes
        self.mask_row_bytes = store.mask_row_bytes
        self.masks: np.ndarray | None = None
        if self.rows * self.mask_row_bytes <= options.mask_memory_bytes:
            self.masks = store.masks()
        self.exact_dice = (
            self.masks is not None and self.rows * self.mask_row_bytes <= options.exact_dice_bytes
        )
        if self.exact_dice:
            self.mask_blocks, self.mask_grid = np.zeros((self.rows, 1), np.uint16), 1
        else:
            blocks, self.mask_grid = store.mask_blocks()
            # cells hold at most (S / grid)^2 pixels: uint16 halves the memory of large stores
            self.mask_blocks = (
                blocks.astype(np.uint16) if blocks.size and blocks.max() < 65536 else blocks
            )
        sketch = store.sketch()
        if sketch is None:
            big_d = store.style_dim
            sketch = StyleSketch(
                np.zeros((0, big_d), np.float32),
                np.zeros(big_d),
                np.zeros((0, 0)),
                np.zeros(0),
                np.zeros(0),
                0.0,
            )
        if sketch.rows < self.rows:  # derived data behind the commit: extend it in memory
            sketch = sketch.extend(block for _, block in store.iter_style_blocks(start=sketch.rows))
        self.sketch_rows = sketch.rows
        self.sketch_dim = sketch.dim
        self.sketch_residuals = sketch.residuals
        self.sketch_sq_norms = sketch.sq_norms
        self.sketch_error = sketch.orthonormality_error
        # The basis, widened once to float64 (its float32 values are exact there): a query reads
        # it once (the residual comes from an identity, not from a second pass).
        self.components = np.ascontiguousarray(sketch.components, np.float64)
        self.mean = np.asarray(sketch.mean, np.float64)
        self.projections = np.asarray(sketch.projections, np.float64)
        self.projection_sq = np.sum(self.projections * self.projections, axis=1)
        self._gram_error: np.ndarray | None = None
        self._feature_search = None if options.use_faiss else False

    def set_deleted(self, rows: np.ndarray) -> None:
        """Exclude deleted rows from every ranking and normaliser."""
        live = np.ones(self.rows, bool)
        live[np.asarray(rows, np.int64)] = False
        self.live = live

    def nbytes(self) -> int:
        """Approximate resident bytes of the in-memory arrays."""
        arrays = [
            self.features,
            self.feature_norms,
            self.mask_areas,
            self.mask_blocks,
            self.sketch_residuals,
            self.sketch_sq_norms,
        ]
        if self.masks is not None:
            arrays.append(self.masks)
        arrays += [self.components, self.projection_sq, self.mean, self.projections]
        return int(sum(a.nbytes for a in arrays))

    def _basis_gram_error(self) -> np.ndarray:
        """``P P^T - I`` of the stored (float32) basis, in float64 (computed once)."""
        if self._gram_error is None:
            p = self.components
            self._gram_error = p @ p.T - np.eye(p.shape[0])
        return self._gram_error

    def project(self, styles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sketch a batch of query style vectors, reading the basis once.

        ``y = P z`` in float64, and the residual norm from
        ``r^2 = ||z||^2 - ||y||^2 + y^T (P P^T - I) y`` (exact for any ``P``), so no second pass
        over the basis is needed (half the memory traffic of forming ``z - P^T y``).

        Returns
        -------
        (np.ndarray, np.ndarray, np.ndarray)
            ``||y_q - y_x||^2`` for every row ``(B, N)``, ``r_q`` ``(B,)``, ``||q - mu||^2``
            ``(B,)``, all float64.
        """
        z = np.atleast_2d(styles).astype(np.float64) - self.mean
        sq = np.sum(z * z, axis=1)
        y = z @ self.components.T
        if self.components.shape[0]:
            correction = np.sum((y @ self._basis_gram_error()) * y, axis=1)
        else:
            correction = np.zeros_like(sq)
        y_sq = np.sum(y * y, axis=1)
        r = np.sqrt(np.maximum(sq - y_sq + correction, 0.0))
        dy2 = y_sq[:, None] + self.projection_sq[None, :] - 2.0 * (y @ self.projections.T)
        return np.maximum(dy2, 0.0), r, sq

    def feature_distances(self, feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distance and cosine of every row to each query feature, ``(B, N)`` float64."""
        n, b = self.rows, len(feats)
        qs = [np.asarray(f, np.float32).astype(np.float64) for f in feats]
        ed = np.empty((b, n), np.float64)
        cos = np.empty((b, n), np.float64)
        for a in range(0, n, _FEATURE_BLOCK):
            block = self.features[a : a + _FEATURE_BLOCK].astype(np.float64)
            for i, q in enumerate(qs):
                ed[i, a : a + len(block)], dots = distance_and_dot(block, q)
                cos[i, a : a + len(block)] = cosine_of(
                    dots, self.feature_norms[a : a + len(block)], q
                )
        return ed, cos

    def feature_bounds(
        self, feature: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Bounds on every row's Euclidean distance and cosine to ``feature`` from one float32
        BLAS pass, widened by the worst-case float32 error of a length-F dot product
        (``F u ||x|| ||q||``): ``(ed_low, ed_high, cos_low, cos_high)``, float64."""
        q32 = np.asarray(feature, np.float32)
        q64 = q32.astype(np.float64)
        qsq = float(np.sum(q64 * q64))
        qn = np.sqrt(qsq)
        dots = (self.features @ q32).astype(np.float64)
        f = self.features.shape[1]
        err = (
            1.01 * f * 2.0**-24 * self.feature_norms * qn + 1e-12 * (self.feature_sq + qsq) + 1e-300
        )
        ed2 = self.feature_sq + qsq - 2.0 * dots
        ed_low = np.sqrt(np.maximum(ed2 - 2.0 * err, 0.0))
        ed_high = np.sqrt(np.maximum(ed2 + 2.0 * err, 0.0))
        denom = self.feature_norms * qn
        safe = np.where(denom > 0, denom, 1.0)
        cos = np.where(denom > 0, dots / safe, 0.0)
        dcos = np.where(denom > 0, err / safe, 0.0)
        return ed_low, ed_high, np.clip(cos - dcos, -1.0, 1.0), np.clip(cos + dcos, -1.0, 1.0)

    def feature_search(self):
        """FAISS flat indexes over the features (built on first use), or None without FAISS."""
        if self._feature_search is None:
            try:
                from .feature_search import FeatureSearch

                self._feature_search = FeatureSearch(
                    self.features, use_gpu=self.use_gpu, exact=self.feature_values
                )
            except ImportError:  # pragma: no cover - faiss is a dependency
                self._feature_search = False
        return self._feature_search or None

    def feature_values(
        self, feature: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact Euclidean distance and cosine of ``rows`` to one query feature (float64), by
        the same arithmetic as :meth:`feature_distances`."""
        rows = np.asarray(rows, np.int64)
        q = np.asarray(feature, np.float32).astype(np.float64)
        ed, dots = distance_and_dot(self.features[rows].astype(np.float64), q)
        return ed, cosine_of(dots, self.feature_norms[rows], q)

    def dice_rows(self, mask: np.ndarray, area: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Exact Dice of ``rows`` (default: every row) against a packed mask, from the masks in
        memory, float64."""
        assert self.masks is not None  # called only when the masks are in memory
        masks = self.masks if rows is None else self.masks[rows]
        areas = self.mask_areas if rows is None else self.mask_areas[rows]
        words = masks.shape[1] // 8 * 8
        inter = np.zeros(len(masks), np.int64)
        q64 = np.ascontiguousarray(mask[:words]).view(np.uint64)
        for a in range(0, len(masks), 1024):  # 64-bit words: 8x fewer elements than bytes
            block = masks[a : a + 1024]
            inter[a : a + 1024] = np.bitwise_count(
                np.ascontiguousarray(block[:, :words]).view(np.uint64) & q64
            ).sum(axis=1, dtype=np.int64)
            if words < masks.shape[1]:
                inter[a : a + 1024] += np.bitwise_count(block[:, words:] & mask[words:]).sum(
                    axis=1, dtype=np.int64
                )
        return dice_score(inter, areas, area)


def distance_and_dot(block: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance and dot product of each float64 row with ``q``.

    The one arithmetic every exact feature value goes through (full passes, single rows, FAISS
    certificates). NumPy's reduction along the contiguous last axis sums each row pairwise in
    an order fixed by the row's length alone, so a row's value never depends on which rows it
    was computed with. (``einsum`` and parallel BLAS reductions pick their order from the
    whole shape and change the last bits: a row scored alone and in a block would differ.)
    """
    diff = block - q
    return np.sqrt(np.sum(diff * diff, axis=1)), np.sum(block * q, axis=1)


def cosine_of(dots: np.ndarray, norms: np.ndarray, q: np.ndarray) -> np.ndarray:
    denom = norms * np.sqrt(np.sum(q * q))
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def squared_distances(block: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``||x - q||^2`` of each float64 row (the exact style loss; fixed per-row order)."""
    diff = block - q
    return np.sum(diff * diff, axis=1)


def mask_block_counts_of(mask_packed: np.ndarray, size: int, grid: int) -> np.ndarray:
    mask = np.unpackbits(mask_packed, count=size * size).astype(bool).reshape(1, size, size)
    return mask_block_counts(mask, grid)[0].astype(np.int64)
