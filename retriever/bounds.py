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
import torch

from dermris.indexer.store import Store, StyleSketch, mask_block_counts

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

    def __init__(self, store: Store, *, device: torch.device | str = "cpu") -> None:
        self.store = store
        self.device = torch.device(device)
        self.rows = store.rows
        self.features = store.features()
        features64 = self.features.astype(np.float64)
        self.feature_norms = np.sqrt(np.einsum("ij,ij->i", features64, features64))
        del features64
        self.live = store.live
        self.mask_areas = store.mask_areas()
        self.mask_blocks, self.mask_grid = store.mask_blocks()
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
        # What every query touches, as float64 tensors on the device (features stay float32
        # and are widened block by block).
        dev = self.device
        self.features_t = torch.from_numpy(self.features).to(dev)
        self.feature_norms_t = torch.from_numpy(self.feature_norms).to(dev)
        self.components_t = torch.from_numpy(sketch.components).to(dev, torch.float64)
        self.mean_t = torch.from_numpy(sketch.mean).to(dev, torch.float64)
        self.projections_t = torch.from_numpy(sketch.projections).to(dev, torch.float64)
        self.projection_sq_t = (self.projections_t * self.projections_t).sum(dim=1)
        self.style_row_bytes = store.style_row_bytes
        self.mask_row_bytes = store.mask_row_bytes

    def set_deleted(self, rows: np.ndarray) -> None:
        """Exclude deleted rows from every ranking and normaliser."""
        live = np.ones(self.rows, bool)
        live[np.asarray(rows, np.int64)] = False
        self.live = live

    def nbytes(self) -> int:
        """Approximate resident bytes of the in-memory arrays."""
        arrays = (self.features, self.feature_norms, self.mask_areas, self.mask_blocks,
                  self.sketch_residuals, self.sketch_sq_norms)
        tensors = (self.components_t, self.projection_sq_t, self.mean_t, self.projections_t)
        if self.device.type != "cpu":
            tensors += (self.features_t, self.feature_norms_t)
        return int(sum(a.nbytes for a in arrays) + sum(t.numel() * t.element_size() for t in tensors))

    def project(self, styles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sketch a batch of query style vectors.

        Returns
        -------
        (np.ndarray, np.ndarray, np.ndarray)
            ``||y_q - y_x||^2`` for every row ``(B, N)``, ``r_q`` ``(B,)``, ``||q - mu||^2``
            ``(B,)``, all float64.
        """
        z = torch.from_numpy(np.atleast_2d(styles)).to(self.device, torch.float64) - self.mean_t
        y = z @ self.components_t.T
        residual = z - y @ self.components_t
        r = torch.sqrt((residual * residual).sum(dim=1))
        sq = (z * z).sum(dim=1)
        dy2 = (y * y).sum(dim=1)[:, None] + self.projection_sq_t[None, :] - 2.0 * (y @ self.projections_t.T)
        return torch.clamp(dy2, min=0.0).cpu().numpy(), r.cpu().numpy(), sq.cpu().numpy()

    def feature_distances(self, feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distance and cosine of every row to each query feature, ``(B, N)`` float64."""
        n, b = self.rows, len(feats)
        dev = self.device
        qs = torch.from_numpy(np.stack(feats) if b else np.zeros((0, self.features.shape[1]), np.float32))
        qs = qs.to(dev, torch.float64)
        q_norms = torch.sqrt((qs * qs).sum(dim=1))
        ed = torch.empty((b, n), dtype=torch.float64, device=dev)
        dots = torch.empty((b, n), dtype=torch.float64, device=dev)
        for a in range(0, n, _FEATURE_BLOCK):
            block = self.features_t[a:a + _FEATURE_BLOCK].to(torch.float64)
            for i in range(b):
                diff = block - qs[i]
                ed[i, a:a + len(block)] = torch.sqrt((diff * diff).sum(dim=1))
            dots[:, a:a + len(block)] = qs @ block.T
        denom = q_norms[:, None] * self.feature_norms_t[None, :]
        cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 0.0)
        return ed.cpu().numpy(), cos.cpu().numpy()


def _mask_block_counts_of(mask_packed: np.ndarray, size: int, grid: int) -> np.ndarray:
    mask = np.unpackbits(mask_packed, count=size * size).astype(bool).reshape(1, size, size)
    return mask_block_counts(mask, grid)[0].astype(np.int64)


class _Query:
    """Per-query state: exact arrays, bounds, lazily filled exact values."""

    def __init__(
        self, index: StoreIndex, q: QueryVectors, ed: np.ndarray, cos: np.ndarray,
        dy2: np.ndarray, r_q: float, sq_q: float,
    ) -> None:
        self.index = index
        self.q = q
        n = index.rows
        self.es = normalised_score(ed, float(ed[index.live].max(initial=0.0)))
        self.cs = cosine_score(cos)
        # style loss bounds from the sketch (widened for float rounding and the basis' error)
        residuals = index.sketch_residuals
        slack = 4.0 * index.sketch_error * dy2 + _FLOAT64_SLACK * (sq_q + index.sketch_sq_norms)
        self.ls_lower = np.maximum(dy2 + (r_q - residuals) ** 2 - slack, 0.0)
        self.ls_upper = dy2 + (r_q + residuals) ** 2 + slack
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
        eds, coss = index.feature_distances([q.feature for q in queries])
        if queries:
            dy2s, r_qs, sq_qs = index.project(np.stack([q.style for q in queries]))
        else:
            dy2s = r_qs = sq_qs = []
        self.queries = [_Query(index, q, *args) for q, *args in zip(queries, eds, coss, dy2s, r_qs, sq_qs)]
        for query in self.queries:
            query.stats.add_time("features+bounds", started)
        dev = index.device
        self._style_q = (torch.from_numpy(np.stack([q.style for q in queries])).to(dev, torch.float64)
                         if queries else None)
        self._buffer = torch.empty(index.store.style_dim, dtype=torch.float64, device=dev)

    # -- lazily computed exact components ----------------------------------------------
    def ensure_style(self, query: _Query, rows: np.ndarray) -> None:
        """Exact style losses of ``rows`` for every query of the batch that lacks them."""
        rows = np.unique(rows[np.isnan(query.ls[rows])])
        if len(rows) == 0:
            return
        started = time.perf_counter()
        store = self.index.store
        buf = self._buffer
        dev = self.index.device
        for row in rows:
            x = torch.from_numpy(store.style_rows([int(row)])[0]).to(dev, torch.float64)
            for other, q64 in zip(self.queries, self._style_q):
                if np.isnan(other.ls[row]):
                    torch.sub(x, q64, out=buf)
                    other.ls[row] = float(torch.dot(buf, buf))
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
            live = self.index.live
            if not live.any():
                query._ls_max = 0.0
            else:
                candidates = np.flatnonzero(live & (query.ls_upper >= query.ls_lower[live].max()))
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
        computed = 0
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
            chunk = np.sort(chunk[upper[chunk] >= kth])
            visited_rows.append(chunk)
            visited_scores.append(measure_score(measure, self.exact_components(query, chunk, names)))
            computed += len(chunk)
            pos += batch
            batch = min(4 * batch, 4096)
            all_scores = np.concatenate(visited_scores)
            if len(all_scores) >= k:
                kth = np.partition(all_scores, len(all_scores) - k)[len(all_scores) - k]
        rows = np.concatenate(visited_rows) if visited_rows else np.zeros(0, np.int64)
        scores = np.concatenate(visited_scores) if visited_scores else np.zeros(0)
        best = rank(scores, k, rows=rows)
        query.stats.reranked[measure] = computed
        query.stats.add_time(f"rank {measure}", started)
        return rows[best], scores[best]

    def hit_components(self, query: _Query, rows: np.ndarray) -> dict[str, np.ndarray]:
        """All four exact components of the hit rows."""
        return self.exact_components(query, rows, ("es", "cs", "ss", "dc"))
