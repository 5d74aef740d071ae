"""Exact top-k without scanning the style rows: bounds, lazy exact values, a cost model.

For one query (or a batch sharing reads) this module keeps, for every committed row:

* ``es`` and ``cs`` exactly (the 1024-d features stay in memory, computed for all rows);
* lower and upper bounds on the style loss from the style sketch, and exact style losses for
  the rows read so far (``LS_max`` is exact: only rows whose upper bound reaches the largest
  lower bound are read);
* Dice exactly for every row when the store's masks fit in memory (the default up to
  :data:`MASK_MEMORY_BYTES`: a popcount over all masks costs milliseconds), otherwise an upper
  bound from the mask block counts and exact Dice for the rows read so far.

A measure's top k is found by visiting rows in decreasing order of their score's upper bound
(the harmonic mean is non-decreasing in every component, so the harmonic mean of the component
upper bounds bounds the score: Fagin's threshold algorithm) until the k-th best exact score
exceeds the bound of every row not visited. Rows with equal bounds are visited, so ties are
resolved by row exactly as a full scan would.

A cost model keeps this from losing to a scan: before each batch of row reads it compares what
the rows still in contention would cost read one by one (bytes plus a per-request cost) with a
sequential scan of every row not yet scored, and scans when that is cheaper. Exactness does
not depend on the path taken. Rows are always read in batches: sorted, one request per run of
adjacent rows of a shard (:mod:`dermris.indexer.store.rows`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from dermris.indexer.store import Store, StyleSketch, mask_block_counts

from .measures import MEASURE_COMPONENTS, cosine_score, dice_score, measure_score, normalised_score, rank

__all__ = ["CostModel", "SearchStats", "StoreIndex", "QueryVectors", "QueryBatch", "MASK_MEMORY_BYTES"]

_FEATURE_BLOCK = 8192
_LS_BLOCK = 64  # style rows turned into float64 at a time
_FLOAT64_SLACK = 1e-9  # relative to ||q - mu||^2 + ||x - mu||^2: float64 rounding of length-D sums

MASK_MEMORY_BYTES = 1 << 30
"""Masks are kept in memory (no mask is read from disk during a search) up to this many bytes."""

EXACT_DICE_BYTES = 32 << 20
"""Up to this many bytes of masks, Dice is computed exactly for every row at once (a popcount
of a few milliseconds); above it, Dice is bounded from block counts first and computed exactly,
from memory, only for the rows the threshold algorithm visits."""


@dataclass(frozen=True)
class CostModel:
    """Seconds to read rows one request per run versus a sequential scan.

    The defaults were measured on the 2-core machine the benchmarks ran on (page cache):
    a request costs about 40 us, and bytes come at about 2 GB/s read one by one and 3 GB/s
    in sequence, decoding included.

    Attributes
    ----------
    request_seconds : float
        Fixed cost of one row request.
    random_bytes_per_second, scan_bytes_per_second : float
        Throughput of row-by-row reads and of a sequential scan.
    """

    request_seconds: float = 40e-6
    random_bytes_per_second: float = 2e9
    scan_bytes_per_second: float = 3e9

    @classmethod
    def always_scan(cls) -> "CostModel":
        """A model under which any row read loses to a scan (for tests and comparisons)."""
        return cls(request_seconds=1e9)

    @classmethod
    def never_scan(cls) -> "CostModel":
        """A model under which a scan never wins (the bound path alone)."""
        return cls(scan_bytes_per_second=1e-12)

    def rows_seconds(self, rows: int, row_bytes: int) -> float:
        """Reading ``rows`` rows one by one."""
        return rows * (self.request_seconds + row_bytes / self.random_bytes_per_second)

    def scan_seconds(self, rows: int, row_bytes: int) -> float:
        """Reading ``rows`` rows in one sequential scan."""
        return rows * row_bytes / self.scan_bytes_per_second

    def prefer_scan(self, to_read: int, to_scan: int, row_bytes: int) -> bool:
        """Whether scanning ``to_scan`` rows is cheaper than reading ``to_read`` of them."""
        return to_read > 0 and self.scan_seconds(to_scan, row_bytes) < self.rows_seconds(to_read, row_bytes)


@dataclass(frozen=True)
class QueryVectors:
    """A query in the store's representation.

    Attributes
    ----------
    feature : np.ndarray
        ``(F,)`` float32.
    style : np.ndarray
        ``(D,)`` float32, as the store would hold it (float16 round trip applied).
    mask : np.ndarray
        ``(ceil(S*S/8),)`` uint8 bit-packed mask.
    mask_area : int
        Lesion pixels.
    row : int or None
        The stored row this query came from, if any.
    """

    feature: np.ndarray
    style: np.ndarray
    mask: np.ndarray
    mask_area: int
    row: int | None = None


@dataclass
class SearchStats:
    """What one search cost.

    Attributes
    ----------
    rows : int
        Committed rows in the store.
    style_rows_read : int
        Style rows read from disk (exact style losses computed).
    mask_rows_read : int
        Mask rows read from disk (exact Dice computed).
    bytes_read : int
        Bytes of style and mask rows read.
    scans : int
        Sequential scans the cost model chose.
    reranked : dict of str to int
        Rows whose exact score was computed, per measure.
    seconds : dict of str to float
        Wall time per stage.
    """

    rows: int = 0
    style_rows_read: int = 0
    mask_rows_read: int = 0
    bytes_read: int = 0
    scans: int = 0
    reranked: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, stage: str, started: float) -> None:
        """Add the time since ``started`` (``time.perf_counter()``) to ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "rows": self.rows, "style_rows_read": self.style_rows_read,
            "mask_rows_read": self.mask_rows_read, "bytes_read": self.bytes_read, "scans": self.scans,
            "reranked": dict(self.reranked),
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
        }


class StoreIndex:
    """The in-memory part of a store the bounds need (style rows stay on disk).

    Parameters
    ----------
    store : Store
        An opened store snapshot.
    device : torch.device or str
        Where the bound arithmetic runs.
    mask_memory_bytes : int
        Keep the masks in memory when they take at most this much (exact Dice for every row).
    cost_model : CostModel
        Row reads against scans.
    use_faiss : bool
        Answer the Euclidean and cosine measures (and ``ED_max``) through certified FAISS
        searches instead of a full pass over the features.
    exact_dice_bytes : int
        Up to this size of the masks in memory, Dice is computed for every row at once.
    """

    def __init__(self, store: Store, *, device: torch.device | str = "cpu",
                 mask_memory_bytes: int = MASK_MEMORY_BYTES, cost_model: CostModel = CostModel(),
                 use_faiss: bool = True, exact_dice_bytes: int = EXACT_DICE_BYTES) -> None:
        self.store = store
        self.device = torch.device(device)
        self.cost = cost_model
        self.rows = store.rows
        self.features = store.features()
        self.feature_sq = np.concatenate(
            [np.sum(b * b, axis=1) for b in
             (self.features[a:a + _FEATURE_BLOCK].astype(np.float64) for a in range(0, self.rows, _FEATURE_BLOCK))]
        ) if self.rows else np.zeros(0)
        self.feature_norms = np.sqrt(self.feature_sq)
        self.live = store.live
        self.mask_areas = store.mask_areas()
        self.style_row_bytes = store.style_row_bytes
        self.mask_row_bytes = store.mask_row_bytes
        self.masks: np.ndarray | None = None
        if self.rows * self.mask_row_bytes <= mask_memory_bytes:
            self.masks = store.masks()
        self.exact_dice = self.masks is not None and self.rows * self.mask_row_bytes <= exact_dice_bytes
        if self.exact_dice:
            self.mask_blocks, self.mask_grid = np.zeros((self.rows, 1), np.uint16), 1
        else:
            blocks, self.mask_grid = store.mask_blocks()
            # cells hold at most (S / grid)^2 pixels: uint16 halves the memory of large stores
            self.mask_blocks = blocks.astype(np.uint16) if blocks.size and blocks.max() < 65536 else blocks
        sketch = store.sketch()
        if sketch is None:
            big_d = store.style_dim
            sketch = StyleSketch(np.zeros((0, big_d), np.float32), np.zeros(big_d), np.zeros((0, 0)),
                                 np.zeros(0), np.zeros(0), 0.0)
        if sketch.rows < self.rows:  # derived data behind the commit: extend it in memory
            sketch = sketch.extend(block for _, block in store.iter_style_blocks(start=sketch.rows))
        self.sketch_rows = sketch.rows
        self.sketch_dim = sketch.dim
        self.sketch_residuals = sketch.residuals
        self.sketch_sq_norms = sketch.sq_norms
        self.sketch_error = sketch.orthonormality_error
        dev = self.device
        # The basis, widened once to float64 (its float32 values are exact there): a query reads
        # it once (the residual comes from an identity, not from a second pass).
        self.components_t = torch.from_numpy(np.ascontiguousarray(sketch.components)).to(dev, torch.float64)
        self.mean_t = torch.from_numpy(sketch.mean).to(dev, torch.float64)
        self.projections_t = torch.from_numpy(sketch.projections).to(dev, torch.float64)
        self.projection_sq_t = (self.projections_t * self.projections_t).sum(dim=1)
        self._gram_error: torch.Tensor | None = None
        self._feature_search = None if use_faiss else False

    def set_deleted(self, rows: np.ndarray) -> None:
        """Exclude deleted rows from every ranking and normaliser."""
        live = np.ones(self.rows, bool)
        live[np.asarray(rows, np.int64)] = False
        self.live = live

    def nbytes(self) -> int:
        """Approximate resident bytes of the in-memory arrays."""
        arrays = [self.features, self.feature_norms, self.mask_areas, self.mask_blocks,
                  self.sketch_residuals, self.sketch_sq_norms]
        if self.masks is not None:
            arrays.append(self.masks)
        tensors = [self.components_t, self.projection_sq_t, self.mean_t, self.projections_t]
        return int(sum(a.nbytes for a in arrays) + sum(t.numel() * t.element_size() for t in tensors))

    def _basis_gram_error(self) -> torch.Tensor:
        """``P P^T - I`` of the stored (float32) basis, in float64 (computed once)."""
        if self._gram_error is None:
            p = self.components_t
            d = p.shape[0]
            self._gram_error = p @ p.T - torch.eye(d, dtype=torch.float64, device=self.device)
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
        z = torch.from_numpy(np.atleast_2d(styles)).to(self.device, torch.float64) - self.mean_t
        sq = (z * z).sum(dim=1)
        d = self.components_t.shape[0]
        y = z @ self.components_t.T
        if d:
            correction = ((y @ self._basis_gram_error()) * y).sum(dim=1)
        else:
            correction = torch.zeros_like(sq)
        r2 = sq - (y * y).sum(dim=1) + correction
        r = torch.sqrt(torch.clamp(r2, min=0.0))
        dy2 = (y * y).sum(dim=1)[:, None] + self.projection_sq_t[None, :] - 2.0 * (y @ self.projections_t.T)
        return torch.clamp(dy2, min=0.0).cpu().numpy(), r.cpu().numpy(), sq.cpu().numpy()

    def feature_distances(self, feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distance and cosine of every row to each query feature, ``(B, N)`` float64."""
        n, b = self.rows, len(feats)
        qs = [np.asarray(f, np.float32).astype(np.float64) for f in feats]
        ed = np.empty((b, n), np.float64)
        cos = np.empty((b, n), np.float64)
        for a in range(0, n, _FEATURE_BLOCK):
            block = self.features[a:a + _FEATURE_BLOCK].astype(np.float64)
            for i, q in enumerate(qs):
                ed[i, a:a + len(block)], dots = _distance_and_dot(block, q)
                cos[i, a:a + len(block)] = _cosine(dots, self.feature_norms[a:a + len(block)], q)
        return ed, cos

    def feature_bounds(self, feature: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Bounds on every row's Euclidean distance and cosine to ``feature`` from one float32
        BLAS pass, widened by the worst-case float32 error of a length-F dot product
        (``F u ||x|| ||q||``): ``(ed_low, ed_high, cos_low, cos_high)``, float64."""
        q32 = np.asarray(feature, np.float32)
        q64 = q32.astype(np.float64)
        qsq = float(np.sum(q64 * q64))
        qn = np.sqrt(qsq)
        dots = (self.features @ q32).astype(np.float64)
        f = self.features.shape[1]
        err = 1.01 * f * 2.0 ** -24 * self.feature_norms * qn + 1e-12 * (self.feature_sq + qsq) + 1e-300
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

                self._feature_search = FeatureSearch(self.features, use_gpu=self.device.type == "cuda",
                                                     exact=self.feature_values)
            except ImportError:  # pragma: no cover - faiss is a dependency
                self._feature_search = False
        return self._feature_search or None

    def feature_values(self, feature: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact Euclidean distance and cosine of ``rows`` to one query feature (float64), by
        the same arithmetic as :meth:`feature_distances`."""
        rows = np.asarray(rows, np.int64)
        q = np.asarray(feature, np.float32).astype(np.float64)
        ed, dots = _distance_and_dot(self.features[rows].astype(np.float64), q)
        return ed, _cosine(dots, self.feature_norms[rows], q)

    def dice_rows(self, mask: np.ndarray, area: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Exact Dice of ``rows`` (default: every row) against a packed mask, from the masks in
        memory, float64."""
        masks = self.masks if rows is None else self.masks[rows]
        areas = self.mask_areas if rows is None else self.mask_areas[rows]
        words = masks.shape[1] // 8 * 8
        inter = np.zeros(len(masks), np.int64)
        q64 = np.ascontiguousarray(mask[:words]).view(np.uint64)
        for a in range(0, len(masks), 1024):  # 64-bit words: 8x fewer elements than bytes
            block = masks[a:a + 1024]
            inter[a:a + 1024] = np.bitwise_count(np.ascontiguousarray(block[:, :words]).view(np.uint64) & q64).sum(
                axis=1, dtype=np.int64)
            if words < masks.shape[1]:
                inter[a:a + 1024] += np.bitwise_count(block[:, words:] & mask[words:]).sum(axis=1, dtype=np.int64)
        return dice_score(inter, areas, area)


def _distance_and_dot(block: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance and dot product of each float64 row with ``q``.

    The one arithmetic every exact feature value goes through (full passes, single rows, FAISS
    certificates). NumPy's reduction along the contiguous last axis sums each row pairwise in
    an order fixed by the row's length alone, so a row's value never depends on which rows it
    was computed with. (``einsum`` and parallel torch reductions pick their order from the
    whole shape and change the last bits: a row scored alone and in a block would differ.)
    """
    diff = block - q
    return np.sqrt(np.sum(diff * diff, axis=1)), np.sum(block * q, axis=1)


def _cosine(dots: np.ndarray, norms: np.ndarray, q: np.ndarray) -> np.ndarray:
    denom = norms * np.sqrt(np.sum(q * q))
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def _squared_distances(block: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``||x - q||^2`` of each float64 row (the exact style loss; fixed per-row order)."""
    diff = block - q
    return np.sum(diff * diff, axis=1)


def _mask_block_counts_of(mask_packed: np.ndarray, size: int, grid: int) -> np.ndarray:
    mask = np.unpackbits(mask_packed, count=size * size).astype(bool).reshape(1, size, size)
    return mask_block_counts(mask, grid)[0].astype(np.int64)


class _Query:
    """Per-query state: exact arrays, bounds, lazily filled exact values."""

    def __init__(self, index: StoreIndex, q: QueryVectors, dy2: np.ndarray, r_q: float, sq_q: float) -> None:
        self.index = index
        self.q = q
        n = index.rows
        # es and cs of every row: computed when a measure needs them for all rows (the I1 scores)
        self.es: np.ndarray | None = None
        self.cs: np.ndarray | None = None
        self.ed_max: float | None = None
        self.feature_bounds: dict | None = None  # float32 bounds on es and cs, exact values per row
        # style loss bounds from the sketch (widened for float rounding and the basis' error)
        residuals = index.sketch_residuals
        slack = 4.0 * index.sketch_error * dy2 + _FLOAT64_SLACK * (sq_q + index.sketch_sq_norms)
        self.ls_lower = np.maximum(dy2 + (r_q - residuals) ** 2 - slack, 0.0)
        self.ls_upper = dy2 + (r_q + residuals) ** 2 + slack
        self.ls = np.full(n, np.nan)
        self._ls_max: float | None = None
        if index.exact_dice:  # exact Dice for every row: no bounds needed
            self.dc = index.dice_rows(q.mask, q.mask_area)
            self.dc_upper = self.dc
        else:  # dice bounds from block counts, exact values as rows are visited
            size = index.store.mask_size
            q_blocks = _mask_block_counts_of(q.mask, size, index.mask_grid)
            inter_upper = np.minimum(index.mask_blocks, q_blocks[None, :]).sum(axis=1)
            self.dc_upper = dice_score(inter_upper, index.mask_areas, q.mask_area)
            self.dc = np.full(n, np.nan)
            empty = (index.mask_areas == 0) | (q.mask_area == 0)
            self.dc[empty] = dice_score(np.zeros(int(empty.sum())), index.mask_areas[empty], q.mask_area)
        self.stats = SearchStats(rows=n)


class QueryBatch:
    """Exact scoring for one or more queries that share every row read from disk.

    Parameters
    ----------
    index : StoreIndex
        The store's in-memory part.
    queries : sequence of QueryVectors
        The queries.
    """

    def __init__(self, index: StoreIndex, queries: Sequence[QueryVectors]) -> None:
        self.index = index
        started = time.perf_counter()
        if queries:
            dy2s, r_qs, sq_qs = index.project(np.stack([q.style for q in queries]))
        else:
            dy2s = r_qs = sq_qs = []
        self.queries = [_Query(index, q, *args) for q, *args in zip(queries, dy2s, r_qs, sq_qs)]
        for query in self.queries:
            query.stats.add_time("bounds", started)
        self._style_q = [np.asarray(q.style, np.float32).astype(np.float64) for q in queries]

    # -- the feature components ---------------------------------------------------------
    def ed_max(self, query: _Query) -> float:
        """Exact ``ED_max`` over the live rows (a certified FAISS search, else the full pass)."""
        if query.ed_max is None:
            search = self.index.feature_search()
            value = search.max_distance(query.q.feature, self.index.live) if search is not None else None
            if value is None:
                self._all_features()
            else:
                query.ed_max = value
        return query.ed_max

    def _all_features(self) -> None:
        """es and cs of every row for every query of the batch (one pass over the features)."""
        todo = [q for q in self.queries if q.es is None]
        if not todo:
            return
        started = time.perf_counter()
        eds, coss = self.index.feature_distances([q.q.feature for q in todo])
        live = self.index.live
        for query, ed, cos in zip(todo, eds, coss):
            if query.ed_max is None:
                query.ed_max = float(ed[live].max(initial=0.0))
            query.es = normalised_score(ed, query.ed_max)
            query.cs = cosine_score(cos)
            query.stats.add_time("features", started)

    def _feature_scores(self, query: _Query, rows: np.ndarray, name: str) -> np.ndarray:
        if query.es is None and len(rows) > max(1024, self.index.rows // 8):
            self._all_features()  # one pass is cheaper than gathering most rows
        if query.es is not None:
            return (query.es if name == "es" else query.cs)[rows]
        ed, cos = self.index.feature_values(query.q.feature, rows)
        return normalised_score(ed, self.ed_max(query)) if name == "es" else cosine_score(cos)

    # -- lazily computed exact components ----------------------------------------------
    def _losses(self, rows: np.ndarray, block: np.ndarray) -> None:
        """Exact style losses of ``rows`` (decoded ``block``) for every query that lacks them."""
        for a in range(0, len(rows), _LS_BLOCK):
            x = block[a:a + _LS_BLOCK].astype(np.float64)
            part = rows[a:a + _LS_BLOCK]
            for query, q64 in zip(self.queries, self._style_q):
                todo = np.isnan(query.ls[part])
                if todo.any():
                    query.ls[part[todo]] = _squared_distances(x[todo], q64)

    def _scan_style(self, query: _Query) -> None:
        """Exact style losses of every row, by one sequential scan (the cost model's choice)."""
        store = self.index.store
        rows_read = 0
        for start, block in store.iter_style_blocks():
            rows = np.arange(start, start + len(block))
            need = np.zeros(len(rows), bool)
            for other in self.queries:
                need |= np.isnan(other.ls[rows])
            if need.any():
                self._losses(rows[need], block[need])
            rows_read += len(block)
        query.stats.scans += 1
        query.stats.style_rows_read += rows_read
        query.stats.bytes_read += rows_read * self.index.style_row_bytes

    def ensure_style(self, query: _Query, rows: np.ndarray) -> None:
        """Exact style losses of ``rows`` for every query of the batch that lacks them."""
        rows = np.unique(rows[np.isnan(query.ls[rows])])
        if len(rows) == 0:
            return
        started = time.perf_counter()
        index = self.index
        if index.cost.prefer_scan(len(rows), index.rows, index.style_row_bytes):
            self._scan_style(query)
        else:
            for a in range(0, len(rows), 256):
                part = rows[a:a + 256]
                self._losses(part, index.store.style_rows(part))
            query.stats.style_rows_read += len(rows)
            query.stats.bytes_read += len(rows) * index.style_row_bytes
        query.stats.add_time("style rows", started)

    def ensure_dice(self, query: _Query, rows: np.ndarray) -> None:
        """Exact Dice of ``rows`` for every query of the batch that lacks it."""
        rows = np.unique(rows[np.isnan(query.dc[rows])])
        if len(rows) == 0:
            return
        started = time.perf_counter()
        if self.index.masks is not None:  # in memory: nothing to read
            for other in self.queries:
                todo = rows[np.isnan(other.dc[rows])]
                other.dc[todo] = self.index.dice_rows(other.q.mask, other.q.mask_area, todo)
            query.stats.add_time("dice", started)
            return
        masks = self.index.store.mask_rows(rows)
        areas = self.index.mask_areas[rows]
        for other in self.queries:
            todo = np.isnan(other.dc[rows])
            inter = np.bitwise_count(masks[todo] & other.q.mask).sum(axis=1, dtype=np.int64)
            other.dc[rows[todo]] = dice_score(inter, areas[todo], other.q.mask_area)
        query.stats.mask_rows_read += len(rows)
        query.stats.bytes_read += len(rows) * self.index.mask_row_bytes
        query.stats.add_time("mask rows", started)

    def ls_max(self, query: _Query) -> float:
        """Exact maximum style loss over all committed (live) rows."""
        if query._ls_max is None:
            live = self.index.live
            if not live.any():
                query._ls_max = 0.0
            else:
                candidates = np.flatnonzero(live & (query.ls_upper >= query.ls_lower[live].max()))
                self.ensure_style(query, candidates)
                query._ls_max = float(np.nanmax(query.ls[candidates]))
        return query._ls_max

    def _component_bounds(self, query: _Query, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of a component for every row (exact where known)."""
        if name in ("es", "cs"):
            if query.es is None and self.index.feature_search() is not None:
                if query.feature_bounds is None:
                    ed_low, ed_high, cos_low, cos_high = self.index.feature_bounds(query.q.feature)
                    ed_max = self.ed_max(query)
                    query.feature_bounds = {
                        "es": (normalised_score(ed_high, ed_max), normalised_score(ed_low, ed_max)),
                        "cs": (cosine_score(cos_low), cosine_score(cos_high)),
                    }
                if query.es is None:  # ed_max may have needed the full pass after all
                    return query.feature_bounds[name]
            self._all_features()
            values = query.es if name == "es" else query.cs
            return values, values
        if name == "dc":
            known = ~np.isnan(query.dc)
            return np.where(known, query.dc, 0.0), np.where(known, query.dc, query.dc_upper)
        ls_max = self.ls_max(query)
        known = ~np.isnan(query.ls)
        upper_loss = np.where(known, query.ls, query.ls_upper)
        lower_loss = np.where(known, query.ls, query.ls_lower)
        return np.maximum(normalised_score(upper_loss, ls_max), 0.0), normalised_score(lower_loss, ls_max)

    def exact_components(self, query: _Query, rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Exact component scores of ``rows`` (reading what is missing)."""
        out = {}
        for name in names:
            if name in ("es", "cs"):
                out[name] = self._feature_scores(query, rows, name)
            elif name == "dc":
                self.ensure_dice(query, rows)
                out[name] = query.dc[rows]
            else:
                ls_max = self.ls_max(query)
                self.ensure_style(query, rows)
                out[name] = normalised_score(query.ls[rows], ls_max)
        return out

    def _unknown(self, query: _Query, names: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` still need a read for some component."""
        need = np.zeros(len(rows), bool)
        if "ss" in names:
            need |= np.isnan(query.ls[rows])
        if "dc" in names:
            need |= np.isnan(query.dc[rows])
        return need

    # -- ranking -----------------------------------------------------------------------
    def top_k(self, query: _Query, measure: str, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows and exact scores of the ``k`` best rows under ``measure`` among ``allowed``.

        Parameters
        ----------
        allowed : np.ndarray
            Boolean ``(N,)``: rows that may be returned (live, not excluded, passing the
            filter). Normalisers are taken over every live row regardless.
        """
        started = time.perf_counter()
        names = MEASURE_COMPONENTS[measure]
        if measure in ("euclidean", "cosine") and query.es is None:
            found = self._feature_top_k(query, measure, k, allowed)
            if found is not None:
                query.stats.reranked[measure] = 0
                query.stats.add_time(f"rank {measure}", started)
                return found
        candidates = np.flatnonzero(allowed)
        if not self._unknown(query, names, candidates).any() and "ss" not in names:
            # exact for every row already (features, and Dice when the masks are in memory)
            scores = measure_score(measure, self.exact_components(query, candidates, names))
            best = rank(scores, k, rows=candidates)
            query.stats.reranked[measure] = 0
            query.stats.add_time(f"rank {measure}", started)
            return candidates[best], scores[best]
        bounds = {c: self._component_bounds(query, c) for c in names}
        upper = measure_score(measure, {c: b[1] for c, b in bounds.items()})
        lower = measure_score(measure, {c: b[0] for c, b in bounds.items()})
        # Rows whose upper bound is below the k-th best lower bound can never be in the top k.
        if len(candidates) > k:
            kth_lower = np.partition(lower[candidates], len(candidates) - k)[len(candidates) - k]
            candidates = candidates[upper[candidates] >= kth_lower]
        order = candidates[np.lexsort((candidates, -upper[candidates]))]
        visited_rows: list[np.ndarray] = []
        visited_scores: list[np.ndarray] = []
        kth = -np.inf
        computed = 0
        pos, batch = 0, max(2 * k, 32)
        row_bytes = (self.index.style_row_bytes if "ss" in names else 0) + \
            (self.index.mask_row_bytes if "dc" in names and self.index.masks is None else 0)
        while pos < len(order):
            head = upper[order[pos]]
            if head < kth:
                break
            if head <= 0.0:  # every remaining row scores exactly 0 (0 <= score <= bound)
                visited_rows.append(order[pos:])
                visited_scores.append(np.zeros(len(order) - pos))
                break
            rest = order[pos:]
            contention = rest[upper[rest] >= kth]
            unread = int(self._unknown(query, names, contention).sum())
            # once a first batch has set the k-th score, compare reading what is still in
            # contention with scanning everything (before that, every row looks in contention)
            if "ss" in names and np.isfinite(kth) and self.index.cost.prefer_scan(unread, self.index.rows, row_bytes):
                self._scan_style(query)  # cheaper than reading the rows still in contention
                chunk = np.sort(contention)
                pos = len(order)
            else:
                chunk = order[pos:pos + batch]
                chunk = np.sort(chunk[upper[chunk] >= kth])
                pos += batch
                batch = min(4 * batch, 4096)
            visited_rows.append(chunk)
            visited_scores.append(measure_score(measure, self.exact_components(query, chunk, names)))
            computed += len(chunk)
            all_scores = np.concatenate(visited_scores)
            if len(all_scores) >= k:
                kth = np.partition(all_scores, len(all_scores) - k)[len(all_scores) - k]
        rows = np.concatenate(visited_rows) if visited_rows else np.zeros(0, np.int64)
        scores = np.concatenate(visited_scores) if visited_scores else np.zeros(0)
        best = rank(scores, k, rows=rows)
        query.stats.reranked[measure] = computed
        query.stats.add_time(f"rank {measure}", started)
        return rows[best], scores[best]

    def _feature_top_k(self, query: _Query, measure: str, k: int, allowed: np.ndarray):
        """Top k by ES or CS through a certified FAISS search (None when not certified)."""
        search = self.index.feature_search()
        if search is None:
            return None
        found = search.nearest(query.q.feature, k, allowed, by=measure)
        if found is None:
            return None
        rows = found[0]
        name = "es" if measure == "euclidean" else "cs"
        scores = self._feature_scores(query, rows, name)
        best = rank(scores, k, rows=rows)
        return rows[best], scores[best]

    def hit_components(self, query: _Query, rows: np.ndarray) -> dict[str, np.ndarray]:
        """All four exact components of the hit rows."""
        return self.exact_components(query, rows, ("es", "cs", "ss", "dc"))
