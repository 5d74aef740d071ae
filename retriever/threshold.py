"""The bound loop: exact top k by Fagin's threshold algorithm, for one query or a batch.

For one query (or a batch sharing reads) this module keeps, for every committed row:

* ``es`` and ``cs`` exactly (from the features in memory, computed for all rows when a
  measure needs them), or certified through FAISS for the feature measures alone;
* lower and upper bounds on the style loss from the style sketch, and exact style losses for
  the rows read so far (``LS_max`` is exact: only rows whose upper bound reaches the largest
  lower bound are read);
* Dice exactly for every row when the store's masks are small, otherwise an upper bound from
  the mask block counts and exact Dice for the rows visited.

A measure's top k is found by visiting rows in decreasing order of their score's upper bound
(the harmonic mean is non-decreasing in every component, so the harmonic mean of the component
upper bounds bounds the score) until the k-th best exact score exceeds the bound of every row
not visited. Rows with equal bounds are visited, so ties are resolved by row exactly as a full
scan would. A cost model keeps this from losing to a scan: before each batch of row reads it
compares reading the rows still in contention with a sequential scan, and scans when that is
cheaper. Exactness does not depend on the path taken.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .explain import Explanation, stage_losses
from .measures import (
    MEASURE_COMPONENTS,
    cosine_score,
    dice_score,
    measure_score,
    normalised_score,
    rank,
)
from .store_index import StoreIndex, mask_block_counts_of, squared_distances
from .types import QueryVectors, SearchStats

__all__ = ["QueryBatch"]

_LS_BLOCK = 64  # style rows turned into float64 at a time
_FLOAT64_SLACK = 1e-9  # relative to ||q - mu||^2 + ||x - mu||^2: float64 rounding of length-D sums


class _Query:
    """Per-query state: exact arrays, bounds, lazily filled exact values."""

    def __init__(
        self, index: StoreIndex, q: QueryVectors, dy2: np.ndarray, r_q: float, sq_q: float
    ) -> None:
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
            q_blocks = mask_block_counts_of(q.mask, size, index.mask_grid)
            inter_upper = np.minimum(index.mask_blocks, q_blocks[None, :]).sum(axis=1)
            self.dc_upper = dice_score(inter_upper, index.mask_areas, q.mask_area)
            self.dc = np.full(n, np.nan)
            empty = (index.mask_areas == 0) | (q.mask_area == 0)
            self.dc[empty] = dice_score(
                np.zeros(int(empty.sum())), index.mask_areas[empty], q.mask_area
            )
        self.stats = SearchStats(rows=n)
        self.stage_losses: dict[int, np.ndarray] = {}  # row -> style loss by stage (explain only)


class QueryBatch:
    """Exact scoring for one or more queries that share every row read from disk.

    Parameters
    ----------
    index : StoreIndex
        The store's in-memory part.
    queries : sequence of QueryVectors
        The queries.
    explain : bool
        Also keep, for every row whose exact style loss is computed, that loss split by block
        stage (:attr:`_Query.stage_losses`), and the masks of the rows whose Dice is read, so
        that explanations need no second reading of the hits.
    """

    def __init__(
        self, index: StoreIndex, queries: Sequence[QueryVectors], *, explain: bool = False
    ) -> None:
        self.index = index
        self.explain = explain
        self._stage_starts = np.asarray(index.store.layout.offsets[:-1], np.intp)
        started = time.perf_counter()
        if queries:
            dy2s, r_qs, sq_qs = index.project(np.stack([q.style for q in queries]))
        else:  # nothing to project (zip below yields nothing)
            dy2s = r_qs = sq_qs = np.zeros(0)
        self.queries = [_Query(index, q, *args) for q, *args in zip(queries, dy2s, r_qs, sq_qs)]
        for query in self.queries:
            query.stats.add_time("bounds", started)
        self._style_q = [np.asarray(q.style, np.float32).astype(np.float64) for q in queries]
        self.read_masks: dict[int, np.ndarray] = {}

    # -- the feature components ---------------------------------------------------------
    def ed_max(self, query: _Query) -> float:
        """Exact ``ED_max`` over the live rows (a certified FAISS search, else the full pass)."""
        if query.ed_max is None:
            search = self.index.feature_search()
            value = (
                search.max_distance(query.q.feature, self.index.live)
                if search is not None
                else None
            )
            if value is None:
                self._all_features()
            else:
                query.ed_max = value
        assert query.ed_max is not None  # set by the search or the full pass
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
            known = query.es if name == "es" else query.cs
            assert known is not None  # es and cs are computed together
            return known[rows]
        ed, cos = self.index.feature_values(query.q.feature, rows)
        return normalised_score(ed, self.ed_max(query)) if name == "es" else cosine_score(cos)

    # -- lazily computed exact components ----------------------------------------------
    def _losses(self, rows: np.ndarray, block: np.ndarray) -> None:
        """Exact style losses of ``rows`` (decoded ``block``) for every query that lacks them."""
        for a in range(0, len(rows), _LS_BLOCK):
            x = block[a : a + _LS_BLOCK].astype(np.float64)
            part = rows[a : a + _LS_BLOCK]
            for query, q64 in zip(self.queries, self._style_q):
                todo = np.isnan(query.ls[part])
                if todo.any():
                    query.ls[part[todo]] = squared_distances(x[todo], q64)
                    if self.explain:
                        diff = x[todo] - q64
                        stages = np.add.reduceat(diff * diff, self._stage_starts, axis=1)
                        query.stage_losses.update(zip(part[todo].tolist(), stages))

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
                part = rows[a : a + 256]
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
        if self.explain:
            self.read_masks.update(zip(rows.tolist(), masks))
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
            assert values is not None  # the full pass computed them
            return values, values
        if name == "dc":
            known = ~np.isnan(query.dc)
            return np.where(known, query.dc, 0.0), np.where(known, query.dc, query.dc_upper)
        ls_max = self.ls_max(query)
        known = ~np.isnan(query.ls)
        upper_loss = np.where(known, query.ls, query.ls_upper)
        lower_loss = np.where(known, query.ls, query.ls_lower)
        return np.maximum(normalised_score(upper_loss, ls_max), 0.0), normalised_score(
            lower_loss, ls_max
        )

    def exact_components(
        self, query: _Query, rows: np.ndarray, names: Sequence[str]
    ) -> dict[str, np.ndarray]:
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
    def top_k(
        self, query: _Query, measure: str, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
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
        row_bytes = (self.index.style_row_bytes if "ss" in names else 0) + (
            self.index.mask_row_bytes if "dc" in names and self.index.masks is None else 0
        )
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
            if (
                "ss" in names
                and np.isfinite(kth)
                and self.index.cost.prefer_scan(unread, self.index.rows, row_bytes)
            ):
                self._scan_style(query)  # cheaper than reading the rows still in contention
                chunk = np.sort(contention)
                pos = len(order)
            else:
                chunk = order[pos : pos + batch]
                chunk = np.sort(chunk[upper[chunk] >= kth])
                pos += batch
                batch = min(4 * batch, 4096)
            visited_rows.append(chunk)
            visited_scores.append(
                measure_score(measure, self.exact_components(query, chunk, names))
            )
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

    def explanation(self, query: _Query, rows: np.ndarray) -> Explanation:
        """Why ``rows`` (hits of ``query``, already scored exactly) scored as they did: their
        style losses by stage and their masks, from what the search computed and read."""
        if not self.explain:
            raise ValueError("the batch was not created with explain=True")
        rows = np.unique(np.asarray(rows, np.int64))
        self.ensure_style(query, rows)  # a no-op for hits: their exact losses are known
        layout = self.index.store.layout
        if self.index.masks is not None:
            masks = {int(r): self.index.masks[r] for r in rows}
        else:
            missing = [int(r) for r in rows if int(r) not in self.read_masks]
            if missing:
                self.read_masks.update(zip(missing, self.index.store.mask_rows(missing)))
            masks = {int(r): self.read_masks[int(r)] for r in rows}
        return Explanation(
            mask_size=self.index.store.mask_size,
            query_mask=np.asarray(query.q.mask),
            masks=masks,
            stages={int(r): stage_losses(layout, query.stage_losses[int(r)]) for r in rows},
        )
