"""Exact top-k without scanning the style rows: bounds, lazy exact values, threshold ranking.

For one query (or a batch sharing reads) this module keeps, for every committed row:

* ``es`` and ``cs`` exactly (1024-d features stay in memory, computed for all rows);
* lower and upper bounds on the style loss from the style sketch, and exact style losses for
  the rows read so far (``LS_max`` is exact: only rows whose upper bound reaches the largest
  lower bound are read);
* an upper bound on Dice from the mask block counts, and exact Dice for the rows read so far.

A measure's top k is found by visiting rows in decreasing order of their score's upper bound
(the harmonic mean is non-decreasing in every component, so the harmonic mean of the component
upper bounds bounds the score, a threshold algorithm in Fagin's sense) until the k-th best exact
score exceeds the bound of every row not visited. Rows with equal bounds are visited, so ties
are resolved by row exactly as a full scan would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from indexer import Store
from indexer.sketch import StyleSketch, project_style

from .measures import MEASURE_COMPONENTS, cosine_score, dice_score, measure_score, normalised_score, rank

__all__ = ["SearchStats", "StoreIndex", "QueryVectors", "QueryBatch"]

_FEATURE_BLOCK = 8192
_FLOAT64_SLACK = 1e-9  # relative to ||q - mu||^2 + ||x - mu||^2: float64 rounding of length-D sums


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
    reranked : dict of str to int
        Rows whose exact score was computed, per measure.
    seconds : dict of str to float
        Wall time per stage.
    """

    rows: int = 0
    style_rows_read: int = 0
    mask_rows_read: int = 0
    bytes_read: int = 0
    reranked: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, stage: str, started: float) -> None:
        """Add the time since ``started`` (``time.perf_counter()``) to ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "rows": self.rows, "style_rows_read": self.style_rows_read,
            "mask_rows_read": self.mask_rows_read, "bytes_read": self.bytes_read,
            "reranked": dict(self.reranked),
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
        }


class StoreIndex:
    """The in-memory part of a store the bounds need (style rows and masks stay on disk).

    Parameters
    ----------
    store : indexer.Store
        An opened store snapshot.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.rows = store.rows
        self.features = store.features()
        self.feature_norms = np.sqrt(np.einsum("ij,ij->i", self.features.astype(np.float64),
                                               self.features.astype(np.float64)))
        self.mask_areas = store.mask_areas()
        self.mask_blocks, self.mask_grid = store.mask_blocks()
        sketch = store.sketch()
        if sketch is None:
            big_d = store.style_dim
            sketch = StyleSketch(np.zeros((0, big_d), np.float32), np.zeros(big_d), np.zeros((0, 0)),
                                 np.zeros(0), np.zeros(0), 0.0)
        if sketch.rows < self.rows:  # derived data behind the commit: extend it in memory
            sketch = sketch.extend(block for _, block in store.iter_style_blocks(start=sketch.rows))
        self.sketch = sketch
        # float64 copies used by every query: the basis, and ||y_x||^2 of every row
        self.components64 = np.asarray(sketch.components, dtype=np.float64)
        self.projection_sq = np.einsum("ij,ij->i", sketch.projections, sketch.projections)
        self.style_row_bytes = store.style_dim * np.dtype(store.manifest["arrays"]["style"]["dtype"]).itemsize
        self.mask_row_bytes = store.manifest["arrays"]["mask"]["bytes"]

    def nbytes(self) -> int:
        """Approximate resident bytes of the in-memory arrays."""
        s = self.sketch
        return int(sum(a.nbytes for a in (self.features, self.feature_norms, self.mask_areas, self.mask_blocks,
                                          s.components, self.components64, s.mean, s.projections,
                                          self.projection_sq, s.residuals, s.sq_norms)))


def _mask_block_counts_of(mask_packed: np.ndarray, size: int, grid: int) -> np.ndarray:
    from indexer.sketch import mask_block_counts

    mask = np.unpackbits(mask_packed, count=size * size).astype(bool).reshape(1, size, size)
    return mask_block_counts(mask, grid)[0].astype(np.int64)


class _Query:
    """Per-query state: exact arrays, bounds, lazily filled exact values."""

    def __init__(self, index: StoreIndex, q: QueryVectors, ed: np.ndarray, cos: np.ndarray) -> None:
        self.index = index
        self.q = q
        n = index.rows
        self.es = normalised_score(ed, float(ed.max(initial=0.0)))
        self.cs = cosine_score(cos)
        # style loss bounds from the sketch
        sk = index.sketch
        y, r, sq = project_style(q.style[None], index.components64, sk.mean)
        dy2 = np.maximum((y[0] @ y[0]) + index.projection_sq - 2.0 * (sk.projections @ y[0]), 0.0)
        slack = 4.0 * sk.orthonormality_error * dy2 + _FLOAT64_SLACK * (sq[0] + sk.sq_norms)
        self.ls_lower = np.maximum(dy2 + (r[0] - sk.residuals) ** 2 - slack, 0.0)
        self.ls_upper = dy2 + (r[0] + sk.residuals) ** 2 + slack
        self.ls = np.full(n, np.nan)
        self._ls_max: float | None = None
        # dice bounds from block counts
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
        eds, coss = self._feature_distances([q.feature for q in queries])
        self.queries = [_Query(index, q, ed, cos) for q, ed, cos in zip(queries, eds, coss)]
        for query in self.queries:
            query.stats.add_time("features+bounds", started)
        self._style_q = np.stack([q.style.astype(np.float64) for q in queries]) if queries else None
        self._buffer = np.empty(index.store.style_dim, np.float64)

    # -- all-row exact components ------------------------------------------------------
    def _feature_distances(self, feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        index = self.index
        n, b = index.rows, len(feats)
        qs = np.stack([f.astype(np.float64) for f in feats]) if b else np.zeros((0, index.features.shape[1]))
        q_norms = np.sqrt(np.einsum("ij,ij->i", qs, qs))
        ed = np.empty((b, n), np.float64)
        dots = np.empty((b, n), np.float64)
        for a in range(0, n, _FEATURE_BLOCK):
            block = index.features[a:a + _FEATURE_BLOCK].astype(np.float64)
            for i in range(b):
                diff = block - qs[i]
                ed[i, a:a + len(block)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            dots[:, a:a + len(block)] = qs @ block.T
        denom = q_norms[:, None] * index.feature_norms[None, :]
        cos = np.zeros((b, n), np.float64)
        np.divide(dots, denom, out=cos, where=denom > 0)
        return ed, cos

    # -- lazily computed exact components ----------------------------------------------
    def ensure_style(self, query: _Query, rows: np.ndarray) -> None:
        """Exact style losses of ``rows`` for every query of the batch that lacks them."""
        rows = np.unique(rows[np.isnan(query.ls[rows])])
        if len(rows) == 0:
            return
        started = time.perf_counter()
        store = self.index.store
        buf = self._buffer
        for row in rows:
            x = store.style_rows([int(row)])[0].astype(np.float64)
            for other, q64 in zip(self.queries, self._style_q):
                if np.isnan(other.ls[row]):
                    np.subtract(x, q64, out=buf)
                    other.ls[row] = float(np.dot(buf, buf))
        query.stats.style_rows_read += len(rows)
        query.stats.bytes_read += len(rows) * self.index.style_row_bytes
        query.stats.add_time("style rows", started)

    def ensure_dice(self, query: _Query, rows: np.ndarray) -> None:
        """Exact Dice of ``rows`` for every query of the batch that lacks it."""
        rows = np.unique(rows[np.isnan(query.dc[rows])])
        if len(rows) == 0:
            return
        started = time.perf_counter()
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
        """Exact maximum style loss over all committed rows."""
        if query._ls_max is None:
            if self.index.rows == 0:
                query._ls_max = 0.0
            else:
                candidates = np.flatnonzero(query.ls_upper >= query.ls_lower.max())
                self.ensure_style(query, candidates)
                query._ls_max = float(np.nanmax(query.ls[candidates]))
        return query._ls_max

    def _component_upper(self, query: _Query, name: str) -> np.ndarray:
        if name == "es":
            return query.es
        if name == "cs":
            return query.cs
        if name == "dc":
            return np.where(np.isnan(query.dc), query.dc_upper, query.dc)
        ls_max = self.ls_max(query)
        lower = np.where(np.isnan(query.ls), query.ls_lower, query.ls)
        return normalised_score(lower, ls_max)

    def exact_components(self, query: _Query, rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Exact component scores of ``rows`` (reading what is missing)."""
        out = {}
        for name in names:
            if name == "es":
                out[name] = query.es[rows]
            elif name == "cs":
                out[name] = query.cs[rows]
            elif name == "dc":
                self.ensure_dice(query, rows)
                out[name] = query.dc[rows]
            else:
                ls_max = self.ls_max(query)
                self.ensure_style(query, rows)
                out[name] = normalised_score(query.ls[rows], ls_max)
        return out

    # -- ranking -----------------------------------------------------------------------
    def top_k(self, query: _Query, measure: str, k: int, exclude_row: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and exact scores of the ``k`` best rows under ``measure``."""
        started = time.perf_counter()
        names = MEASURE_COMPONENTS[measure]
        n = self.index.rows
        allowed = np.ones(n, bool)
        if exclude_row is not None and 0 <= exclude_row < n:
            allowed[exclude_row] = False
        if set(names) <= {"es", "cs"}:  # exact for every row already
            rows = np.flatnonzero(allowed)
            scores = measure_score(measure, {c: getattr(query, c)[rows] for c in names})
            best = rank(scores, k, rows=rows)
            query.stats.reranked[measure] = 0
            query.stats.add_time(f"rank {measure}", started)
            return rows[best], scores[best]
        upper = measure_score(measure, {c: self._component_upper(query, c) for c in names})
        candidates = np.flatnonzero(allowed)
        order = candidates[np.lexsort((candidates, -upper[candidates]))]
        visited_rows: list[np.ndarray] = []
        visited_scores: list[np.ndarray] = []
        kth = -np.inf
        pos, batch = 0, max(2 * k, 16)
        while pos < len(order):
            head = upper[order[pos]]
            if head < kth:
                break
            if head <= 0.0:  # every remaining row scores exactly 0 (0 <= score <= bound)
                visited_rows.append(order[pos:])
                visited_scores.append(np.zeros(len(order) - pos))
                break
            chunk = order[pos:pos + batch]
            chunk = chunk[upper[chunk] >= kth]
            comps = self.exact_components(query, np.sort(chunk), names)
            sorted_chunk = np.sort(chunk)
            visited_rows.append(sorted_chunk)
            visited_scores.append(measure_score(measure, comps))
            pos += batch
            batch = min(4 * batch, 4096)
            all_scores = np.concatenate(visited_scores)
            if len(all_scores) >= k:
                kth = np.partition(all_scores, len(all_scores) - k)[len(all_scores) - k]
        rows = np.concatenate(visited_rows) if visited_rows else np.zeros(0, np.int64)
        scores = np.concatenate(visited_scores) if visited_scores else np.zeros(0)
        best = rank(scores, k, rows=rows)
        query.stats.reranked[measure] = int(sum(len(v) for v in visited_rows))
        query.stats.add_time(f"rank {measure}", started)
        return rows[best], scores[best]

    def hit_components(self, query: _Query, rows: np.ndarray) -> dict[str, np.ndarray]:
        """All four exact components of the hit rows."""
        return self.exact_components(query, rows, ("es", "cs", "ss", "dc"))
