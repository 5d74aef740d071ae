"""The in-memory part of a store that the exact search needs, and its access to style rows.

:class:`StoreIndex` holds, for every committed row: the features (float32, once) and their
squared norms, the mask areas (and the bit-packed masks themselves up to a size), Dice block
counts when the masks stay on disk, and the style sketch (float32 projections, residuals,
squared norms) the style-loss bounds come from. Style rows stay in the store: memory-mapped
when they fit the memory budget (every process that maps them shares one copy in the page
cache), read by bytes otherwise. It also owns the one exact arithmetic every score goes
through (:func:`distance_and_dot`, :func:`squared_distances`), so that a row's value never
depends on the path that computed it. NumPy only (no torch).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import numpy as np

from dermris.indexer.store import Store, StyleSketch, mask_block_counts

from .measures import dice_score
from .scan import parallel
from .types import CostModel, SearchOptions

__all__ = [
    "StoreIndex",
    "StyleAccess",
    "cosine_of",
    "distance_and_dot",
    "estimate_memory",
    "mask_block_counts_of",
    "squared_distances",
]

_FEATURE_BLOCK = 8192
_MASK_BLOCK = 1024  # mask rows intersected at a time (6 MB of 224 x 224 masks)
_U32 = 2.0**-24


class StyleAccess:
    """Reading stored style rows: memory-mapped shards, or reads by bytes.

    Parameters
    ----------
    store : Store
        The snapshot.
    budget_bytes : int
        Map the style array when it takes at most this much; otherwise read rows from disk as
        they are needed (and scan block by block).
    """

    def __init__(self, store: Store, budget_bytes: int) -> None:
        self.store = store
        self.rows = store.rows
        self.row_bytes = store.style_row_bytes
        self.dtype = np.dtype(store.manifest.arrays.style_dtype)
        total = self.rows * self.row_bytes
        self.mapped = store.mapped_style() if total <= budget_bytes else None

    @property
    def in_memory(self) -> bool:
        """Whether the rows are memory-mapped (reads cost no system call)."""
        return self.mapped is not None

    def rows_stored(self, rows: np.ndarray) -> np.ndarray:
        """The stored values of ``rows`` (sorted or not), ``(len(rows), D)``."""
        rows = np.asarray(rows, np.int64)
        if self.mapped is None:
            return self.store.stored_style_rows(rows)
        out = np.empty((len(rows), self.store.style_dim), self.dtype)
        shard_rows = self.mapped.shard_rows
        shards = rows // shard_rows
        for shard in np.unique(shards):
            pick = np.flatnonzero(shards == shard)
            local = rows[pick] - shard * shard_rows
            self.mapped.verify(int(shard), local)
            out[pick] = self.mapped.shard(int(shard))[local]
        return out

    def row_chunks(
        self, rows: np.ndarray, chunk: int, *, read_rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | Callable[[], np.ndarray]]]:
        """``(position, rows, stored values)`` for ``rows`` in chunks of ``chunk`` rows.

        Mapped rows come as a function that gathers (and verifies) them, to be called on a
        worker thread; rows on disk are read as the iterator advances, ``read_rows`` at a time
        (default: all in one call, one request per run of adjacent rows), so whoever advances
        it reads them (:func:`~dermris.retriever.scan.parallel` advances its tasks under one
        lock: the shard reader stays single-threaded).
        """
        rows = np.asarray(rows, np.int64)
        if self.mapped is not None:
            for a in range(0, len(rows), chunk):
                part = rows[a : a + chunk]
                yield a, part, functools.partial(self.rows_stored, part)
            return
        step = max(1, len(rows) if read_rows is None else read_rows)
        for a in range(0, len(rows), step):
            part = rows[a : a + step]
            stored = self.store.stored_style_rows(part)
            for b in range(0, len(part), chunk):
                yield a + b, part[b : b + chunk], stored[b : b + chunk]

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, stored values)`` over every committed row, in order."""
        if self.mapped is not None:
            yield from self.mapped.blocks()
        else:
            yield from self.store.iter_style_blocks(stored=True)

    def measure_cost(self) -> CostModel:
        """The cost model of this store's style rows on this machine.

        Mapped rows cost no system call: a row read and a scan differ only by the copy of a
        gathered row, so the model keeps a small per-row cost (scans win only when nearly
        every row is wanted). Rows read from disk: a few random reads and the sequential read
        of one shard are timed (after one warm-up read, so the figures are of the disk and the
        page cache, not of opening files).
        """
        n = self.rows
        if n == 0:
            return CostModel()
        if self.mapped is not None:
            return CostModel(
                request_seconds=5e-6, random_bytes_per_second=2e9, scan_bytes_per_second=2.4e9
            )
        rng = np.random.default_rng(0)
        self.rows_stored(np.array([0]))  # opens the first shard
        sample = np.unique(rng.integers(0, n, size=min(8, n)))
        started = time.perf_counter()
        self.rows_stored(sample)
        read = max(time.perf_counter() - started, 1e-6)
        started = time.perf_counter()
        count = len(next(self.blocks())[1])
        scan = max(time.perf_counter() - started, 1e-6)
        bandwidth = count * self.row_bytes / scan
        per_read = read / len(sample)
        return CostModel(
            request_seconds=max(per_read - self.row_bytes / bandwidth, 0.0),
            random_bytes_per_second=bandwidth,
            scan_bytes_per_second=bandwidth,
        )


class StoreIndex:
    """The in-memory part of a store the bounds need.

    Parameters
    ----------
    store : Store
        An opened store snapshot.
    options : SearchOptions, optional
        Memory limits and the cost model.
    """

    def __init__(self, store: Store, *, options: SearchOptions | None = None) -> None:
        options = options if options is not None else SearchOptions()
        self.store = store
        self.options = options
        self.rows = store.rows
        self.features = store.features()
        self.feature_sq = np.zeros(self.rows)
        for a in range(0, self.rows, _FEATURE_BLOCK):
            block = self.features[a : a + _FEATURE_BLOCK].astype(np.float64)
            self.feature_sq[a : a + _FEATURE_BLOCK] = np.sum(block * block, axis=1)
        self.live = store.live
        self.mask_areas = store.mask_areas().astype(np.int32)
        self.style_row_bytes = store.style_row_bytes
        self.mask_row_bytes = store.mask_row_bytes
        self.masks: np.ndarray | None = None
        if self.rows * self.mask_row_bytes <= options.mask_memory_bytes:
            self.masks = store.masks()
        self.exact_dice = (
            self.masks is not None and self.rows * self.mask_row_bytes <= options.exact_dice_bytes
        )
        self.mask_blocks: np.ndarray | None = None
        self.mask_grid = 1
        if not self.exact_dice:
            blocks, self.mask_grid = store.mask_blocks()
            cell = (store.mask_size // self.mask_grid) ** 2
            self.mask_blocks = blocks.astype(np.uint8 if cell < 256 else np.uint16)
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
        self.sketch_dim = sketch.dim
        self.sketch_residuals = np.asarray(sketch.residuals, np.float64)
        self.sketch_sq_norms = np.asarray(sketch.sq_norms, np.float64)
        self.sketch_error = sketch.orthonormality_error
        # projections as float32 (half the memory; the bounds widen by their rounding)
        self.projections = np.ascontiguousarray(sketch.projections, np.float32)
        wide = self.projections.astype(np.float64) if self.rows else np.zeros((0, sketch.dim))
        self.projection_sq = np.sum(wide * wide, axis=1)
        del wide
        # The basis, widened once to float64 (its float32 values are exact there): a query reads
        # it once (the residual comes from an identity, not from a second pass).
        self.components = np.ascontiguousarray(sketch.components, np.float64)
        self.mean = np.asarray(sketch.mean, np.float64)
        self.mean_norm = float(np.sqrt(self.mean @ self.mean))
        self._gram_error: np.ndarray | None = None
        self.style = StyleAccess(store, options.memory_budget())
        self.cost = (
            options.cost_model if options.cost_model is not None else self.style.measure_cost()
        )

    def set_deleted(self, rows: np.ndarray) -> None:
        """Exclude deleted rows from every ranking and normaliser."""
        live = np.ones(self.rows, bool)
        live[np.asarray(rows, np.int64)] = False
        self.live = live

    def nbytes(self) -> int:
        """Resident bytes of the per-row arrays and the basis (mapped style rows excluded: they
        live in the page cache, shared)."""
        return self.row_nbytes() * self.rows + self.fixed_nbytes()

    def row_nbytes(self) -> int:
        """Bytes held per row."""
        arrays = [
            self.features,
            self.feature_sq,
            self.live,
            self.mask_areas,
            self.sketch_residuals,
            self.sketch_sq_norms,
            self.projections,
            self.projection_sq,
        ]
        if self.masks is not None:
            arrays.append(self.masks)
        if self.mask_blocks is not None:
            arrays.append(self.mask_blocks)
        return int(sum(a.nbytes for a in arrays) // max(self.rows, 1))

    def fixed_nbytes(self) -> int:
        """Bytes that do not grow with the rows (the sketch's basis and mean)."""
        return int(self.components.nbytes + self.mean.nbytes)

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
        over the basis is needed.

        Returns
        -------
        (np.ndarray, np.ndarray, np.ndarray)
            ``y`` ``(B, d)``, ``r_q`` ``(B,)``, ``||q - mu||^2`` ``(B,)``, all float64.
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
        return y, r, sq

    def sketch_distances(self, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on ``||y_q - y_x||`` for every row and query, from one float32 product.

        Parameters
        ----------
        ys : np.ndarray
            ``(B, d)`` the queries' projections (float64, or a stored row's float32 one).

        Returns
        -------
        (np.ndarray, np.ndarray)
            ``(B, N)`` lower and upper bounds, float64. They account for the float32 rounding
            of the stored projections (``u ||y_x||`` each), of the query (``u ||y_q||``), and
            for the float32 sums of the product (``gamma_d ||y_x|| ||y_q||``).
        """
        ys = np.atleast_2d(np.asarray(ys, np.float64))
        b, d = ys.shape
        if d == 0 or self.rows == 0:
            zero = np.zeros((b, self.rows))
            return zero, zero
        y32 = ys.astype(np.float32)
        y32_wide = y32.astype(np.float64)
        q_sq = np.sum(y32_wide * y32_wide, axis=1)
        dots = (self.projections @ y32.T).T.astype(np.float64)  # (B, N)
        gamma = d * _U32 / (1 - d * _U32)
        x_norm = np.sqrt(self.projection_sq)
        q_norm = np.sqrt(q_sq)
        err = 1.01 * gamma * x_norm[None, :] * q_norm[:, None] + 1e-300
        dy2 = self.projection_sq[None, :] + q_sq[:, None] - 2.0 * dots
        slack = 1e-12 * (self.projection_sq[None, :] + q_sq[:, None])  # float64 rounding here
        low = np.sqrt(np.maximum(dy2 - 2.0 * err - slack, 0.0))
        high = np.sqrt(np.maximum(dy2 + 2.0 * err + slack, 0.0))
        # the stored projections and the query in float32 moved by at most u ||.|| (each)
        moved = 1.01 * _U32 * (x_norm[None, :] + np.sqrt(np.sum(ys * ys, axis=1))[:, None])
        return np.maximum(low - moved, 0.0), high + moved

    def feature_bounds(self, features: np.ndarray) -> tuple[np.ndarray, ...]:
        """Bounds on every row's Euclidean distance and cosine to each query feature from one
        float32 BLAS product, widened by the worst-case float32 error of a length-F dot product
        (``F u ||x|| ||q||``): ``(ed_low, ed_high, cos_low, cos_high)``, each ``(B, N)``."""
        q32 = np.atleast_2d(np.asarray(features, np.float32))
        q64 = q32.astype(np.float64)
        qsq = np.sum(q64 * q64, axis=1)[:, None]
        qn = np.sqrt(qsq)
        dots = (self.features @ q32.T).T.astype(np.float64)
        f = self.features.shape[1]
        norms = np.sqrt(self.feature_sq)[None, :]
        err = 1.01 * f * _U32 * norms * qn + 1e-12 * (self.feature_sq[None, :] + qsq) + 1e-300
        ed2 = self.feature_sq[None, :] + qsq - 2.0 * dots
        ed_low = np.sqrt(np.maximum(ed2 - 2.0 * err, 0.0))
        ed_high = np.sqrt(np.maximum(ed2 + 2.0 * err, 0.0))
        denom = norms * qn
        safe = np.where(denom > 0, denom, 1.0)
        cos = np.where(denom > 0, dots / safe, 0.0)
        dcos = np.where(denom > 0, err / safe, 0.0)
        return ed_low, ed_high, np.clip(cos - dcos, -1.0, 1.0), np.clip(cos + dcos, -1.0, 1.0)

    def feature_values(
        self, feature: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact Euclidean distance and cosine of ``rows`` to one query feature (float64)."""
        rows = np.asarray(rows, np.int64)
        q = np.asarray(feature, np.float32).astype(np.float64)
        ed, dots = distance_and_dot(self.features[rows].astype(np.float64), q)
        return ed, cosine_of(dots, np.sqrt(self.feature_sq[rows]), q)

    def dice_rows(self, mask: np.ndarray, area: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Exact Dice of ``rows`` (default: every row) against a packed mask, from the masks in
        memory, float64."""
        assert self.masks is not None  # called only when the masks are in memory
        masks = self.masks if rows is None else self.masks[rows]
        areas = self.mask_areas if rows is None else self.mask_areas[rows]
        return dice_score(_intersections(masks, mask), areas, area)

    def dice_upper(self, mask: np.ndarray, area: int) -> np.ndarray:
        """An upper bound on every row's Dice: from the block counts, or the areas alone."""
        if self.mask_blocks is None:
            areas = self.mask_areas.astype(np.float64)
            return dice_score(np.minimum(areas, float(area)), areas, area)
        q_blocks = mask_block_counts_of(mask, self.store.mask_size, self.mask_grid)
        inter = np.zeros(self.rows, np.int64)
        for a in range(0, self.rows, 8192):
            block = self.mask_blocks[a : a + 8192]
            inter[a : a + 8192] = np.minimum(block, q_blocks[None, :]).sum(axis=1, dtype=np.int64)
        return dice_score(inter, self.mask_areas, area)


def _intersections(masks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixels each bit-packed row shares with ``mask`` (popcounts of 64-bit words, blocks of
    rows shared out to every core)."""
    words = masks.shape[1] // 8 * 8
    inter = np.zeros(len(masks), np.int64)
    q64 = np.ascontiguousarray(mask[:words]).view(np.uint64)

    def work(a: int, scratch: np.ndarray) -> None:
        block = masks[a : a + _MASK_BLOCK]
        both = scratch[: len(block)]
        np.bitwise_and(np.ascontiguousarray(block[:, :words]).view(np.uint64), q64, out=both)
        inter[a : a + _MASK_BLOCK] = np.bitwise_count(both).sum(axis=1, dtype=np.int64)
        if words < masks.shape[1]:
            inter[a : a + _MASK_BLOCK] += np.bitwise_count(block[:, words:] & mask[words:]).sum(
                axis=1, dtype=np.int64
            )

    parallel(
        range(0, len(masks), _MASK_BLOCK),
        work,
        lambda: np.empty((_MASK_BLOCK, words // 8), np.uint64),
    )
    return inter


def distance_and_dot(block: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance and dot product of each float64 row with ``q``.

    The one arithmetic every exact feature value goes through. NumPy's reduction along the
    contiguous last axis sums each row pairwise in an order fixed by the row's length alone, so
    a row's value never depends on which rows it was computed with. (``einsum`` and BLAS pick
    their order from the whole shape and change the last bits: a row scored alone and in a
    block would differ.)
    """
    diff = block - q
    return np.sqrt(np.sum(diff * diff, axis=1)), np.sum(block * q, axis=1)


def cosine_of(dots: np.ndarray, norms: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Cosines from dot products, row norms and the query (0 where a norm is 0)."""
    denom = norms * np.sqrt(np.sum(q * q))
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def squared_distances(block: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``||x - q||^2`` of each float64 row (the exact style loss; fixed per-row order)."""
    diff = block - q
    return np.sum(diff * diff, axis=1)


def mask_block_counts_of(mask_packed: np.ndarray, size: int, grid: int) -> np.ndarray:
    """Lesion pixels of one bit-packed mask in each cell of the ``grid x grid`` block grid."""
    mask = np.unpackbits(mask_packed, count=size * size).astype(bool).reshape(1, size, size)
    return mask_block_counts(mask, grid)[0].astype(np.int64)


def estimate_memory(store: Store, options: SearchOptions | None = None) -> dict[str, int]:
    """What a :class:`~dermris.retriever.Retriever` on ``store`` would hold, without opening one.

    Returns
    -------
    dict
        ``bytes_per_row`` (the per-row arrays, as :meth:`StoreIndex.row_nbytes` counts them),
        ``fixed_bytes`` (the sketch's basis and mean) and ``total_bytes``. Memory-mapped style
        rows are not counted: they live in the page cache, shared by every process.
    """
    options = options if options is not None else SearchOptions()
    n = store.rows
    spec = store.manifest.arrays
    sketch = store.manifest.sketch
    d = sketch.dim if sketch is not None else 0
    per_row = spec.feature_dim * 4 + 8 + 1 + 4 + 8 + 8 + d * 4 + 8
    masks_kept = n * spec.mask_bytes <= options.mask_memory_bytes
    if masks_kept:
        per_row += spec.mask_bytes
    if not (masks_kept and n * spec.mask_bytes <= options.exact_dice_bytes):
        grid = spec.mask_grid or (16 if spec.mask_size % 16 == 0 else 1)
        cell = (spec.mask_size // grid) ** 2
        per_row += grid * grid * (1 if cell < 256 else 2)
    fixed = (d * store.style_dim + store.style_dim) * 8
    return {"bytes_per_row": per_row, "fixed_bytes": fixed, "total_bytes": per_row * n + fixed}
