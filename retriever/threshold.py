"""The bound loop: exact top k for one query or a batch, from bounds, tight scans and exact rows.

Every component score of every row is known as an interval, narrowed in three steps only as far
as a ranking needs:

1. **Bounds for all rows at once** (vectorised): ``es`` and ``cs`` from one float32 product
   over the features (widened by the float32 error of a length-F dot product); the style loss
   from the style sketch (projections, residuals); Dice from block counts or areas, or exactly
   when the masks are small.
2. **Tight intervals** for the rows still in contention: exact feature values (float64, cheap),
   exact Dice (popcounts), and style losses from the float16 rows through one float64 product
   (:mod:`.scan`, error below 1e-9 of the loss): for rows read one by one, or for every row by
   a sequential scan when the cost model (measured on this disk when the store is opened) says
   that is cheaper.
3. **Exact values** (the one float64 arithmetic of :mod:`.store_index`) for the rows that can
   still be in the top k: the hits and the rows tied with them.

A measure's top k: rows are visited in decreasing order of their score's upper bound (the
harmonic mean is non-decreasing in every component, so the harmonic mean of the upper bounds
bounds the score: Fagin's threshold algorithm); every row whose upper bound is below the k-th
largest lower bound is dropped. Rows whose bound equals the k-th score stay, so ties are broken
by row exactly as a full scan would. ``ED_max`` and ``LS_max`` are found the same way (the rows
whose upper bound reaches the largest lower bound). All queries of a batch share every row read
and every scan. Exactness does not depend on the path taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .explain import Explanation, stage_losses
from .grouping import Grouping, top_groups
from .measures import (
    MEASURE_COMPONENTS,
    cosine_score,
    dice_score,
    measure_score,
    normalised_score,
    rank,
)
from .scan import ROWS_PER_BLOCK, QueryWeights, dot_error, parallel, style_dots
from .store_index import StoreIndex
from .types import QueryVectors, SearchStats

__all__ = ["QueryBatch"]

_FLOAT64_SLACK = 1e-9  # relative to ||q - mu||^2 + ||x - mu||^2: float64 rounding of length-D sums
_FIRST_EXTRA = 32  # rows refined first beyond the k asked for
_EXACT_AT_ONCE = 2  # style rows scored exactly at once, per hit asked for (see _refine)
_EXACT_BLOCK = 64  # style rows read from disk at a time for exact values
_EXACT_ROWS = 4  # ... and turned into float64 at a time (stays in cache)


class _Query:
    """Per-query state: component intervals over all rows, and exact values as they are known."""

    def __init__(self, index: StoreIndex, q: QueryVectors) -> None:
        n = index.rows
        self.q = q
        self.stats = SearchStats(rows=n)
        self.q64 = np.asarray(q.style, np.float32).astype(np.float64)
        # features: float32 bounds for all rows (when a measure needs them), exact where known
        self.ed_lo: np.ndarray | None = None
        self.ed_hi = self.cos_lo = self.cos_hi = np.zeros(0)
        self.ed = np.full(n, np.nan)
        self.cos = np.full(n, np.nan)
        self.ed_max: float | None = None
        # style: sketch bounds, tightened by scans; exact where known
        self.ls_lo: np.ndarray | None = None
        self.ls_hi = np.zeros(0)
        self.tight = np.zeros(n, bool)
        self.ls = np.full(n, np.nan)
        self.ls_max: float | None = None
        self.sq_q = 0.0
        self.weights: QueryWeights | None = None
        self.mu_dot = 0.0
        # dice: exact where known, an upper bound elsewhere
        self.dc: np.ndarray | None = None
        self.dc_hi = np.zeros(0)
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
        stage, so that explanations need no second reading of the hits.
    """

    def __init__(
        self, index: StoreIndex, queries: Sequence[QueryVectors], *, explain: bool = False
    ) -> None:
        self.index = index
        self.explain = explain
        self.queries = [_Query(index, q) for q in queries]
        self._stage_starts = np.asarray(index.store.layout.offsets[:-1], np.intp)
        self._read_masks: dict[int, np.ndarray] = {}
        self._seen = np.zeros(index.rows, bool)  # style rows this batch has read (counted once)

    # -- features ------------------------------------------------------------------------
    def _feature_bounds(self) -> None:
        todo = [q for q in self.queries if q.ed_lo is None]
        if not todo:
            return
        started = time.perf_counter()
        bounds = self.index.feature_bounds(np.stack([q.q.feature for q in todo]))
        for i, query in enumerate(todo):
            query.ed_lo, query.ed_hi, query.cos_lo, query.cos_hi = (b[i] for b in bounds)
            query.stats.add_time("features", started)

    def _exact_features(self, query: _Query, rows: np.ndarray) -> None:
        rows = rows[np.isnan(query.ed[rows])]
        if len(rows):
            query.ed[rows], query.cos[rows] = self.index.feature_values(query.q.feature, rows)

    def ed_max(self, query: _Query) -> float:
        """Exact ``ED_max`` over the live rows."""
        if query.ed_max is None:
            self._feature_bounds()
            assert query.ed_lo is not None
            live = self.index.live
            if not live.any():
                query.ed_max = 0.0
            else:
                floor = query.ed_lo[live].max()
                candidates = np.flatnonzero(live & (query.ed_hi >= floor))
                self._exact_features(query, candidates)
                query.ed_max = float(query.ed[candidates].max())
        return query.ed_max

    # -- style ---------------------------------------------------------------------------
    def _style_bounds(self) -> None:
        todo = [q for q in self.queries if q.ls_lo is None]
        if not todo:
            return
        started = time.perf_counter()
        index = self.index
        ys = np.zeros((len(todo), index.sketch_dim))
        r_q = np.zeros(len(todo))
        sq_q = np.zeros(len(todo))
        uploads = [i for i, q in enumerate(todo) if q.q.row is None]
        for i, query in enumerate(todo):
            if query.q.row is not None:  # a stored row: its sketch is stored
                row = query.q.row
                ys[i] = index.projections[row]
                r_q[i], sq_q[i] = index.sketch_residuals[row], index.sketch_sq_norms[row]
        if uploads:
            y, r, sq = index.project(np.stack([todo[i].q.style for i in uploads]))
            ys[uploads], r_q[uploads], sq_q[uploads] = y, r, sq
        low, high = index.sketch_distances(ys)
        residuals = index.sketch_residuals
        for i, query in enumerate(todo):
            slack = 4.0 * index.sketch_error * high[i] ** 2 + _FLOAT64_SLACK * (
                sq_q[i] + index.sketch_sq_norms
            )
            query.ls_lo = np.maximum(low[i] ** 2 + (r_q[i] - residuals) ** 2 - slack, 0.0)
            query.ls_hi = high[i] ** 2 + (r_q[i] + residuals) ** 2 + slack
            query.sq_q = float(sq_q[i])
            z_q = query.q64 - index.mean
            query.weights = QueryWeights(
                z_q[None, :], index.store.codec.column_scales, stored_dtype=index.style.dtype
            )
            query.mu_dot = float(index.mean @ z_q)
            known = ~np.isnan(query.ls)  # explanations may have computed some exactly
            query.ls_lo[known] = query.ls_hi[known] = query.ls[known]
            query.stats.add_time("bounds", started)

    def _tighten(
        self, rows: np.ndarray | None, asking: _Query, sharing: Sequence[_Query] = ()
    ) -> None:
        """Tight style-loss intervals for ``rows`` for ``asking`` (and the queries ``sharing``
        the read: a lesion query's other images), or for every row (None: a sequential scan)
        for every query of the batch that has style bounds (they share it)."""
        queries = (
            [q for q in self.queries if q.ls_lo is not None] if rows is None else [asking, *sharing]
        )
        started = time.perf_counter()
        index = self.index
        n = index.rows
        blocks: Iterator[tuple[int, np.ndarray | Callable[[], np.ndarray]]]
        if rows is None:
            blocks = index.style.blocks()
            count = n
            asking.stats.scans += 1
        else:
            rows = np.unique(rows)
            count = len(rows)
            blocks = (
                (at, stored) for at, _, stored in index.style.row_chunks(rows, ROWS_PER_BLOCK)
            )
        parts = [q.weights for q in queries if q.weights is not None]
        weights = parts[0] if len(parts) == 1 else QueryWeights.stack(parts)
        dots = style_dots(blocks, weights, count)
        picked = np.arange(n) if rows is None else rows
        sq_x = index.sketch_sq_norms[picked]
        x_norm = np.sqrt(sq_x) + index.mean_norm
        err = dot_error(x_norm, weights)
        for j, query in enumerate(queries):
            estimate = sq_x + query.sq_q - 2.0 * (dots[:, j] - query.mu_dot)
            margin = 2.0 * err[:, j] + _FLOAT64_SLACK * (
                sq_x + query.sq_q + 2.0 * x_norm * weights.z_norms[j]
            )
            assert query.ls_lo is not None
            query.ls_lo[picked] = np.maximum(query.ls_lo[picked], estimate - margin)
            query.ls_hi[picked] = np.minimum(query.ls_hi[picked], estimate + margin)
            query.tight[picked] = True
        self._count_reads(asking, picked)
        asking.stats.add_time("style rows" if rows is not None else "style scan", started)

    def _count_reads(self, query: _Query, rows: np.ndarray) -> None:
        """Style rows read: each row once per batch (later reads of it come from the page cache)."""
        new = int(np.count_nonzero(~self._seen[rows]))
        self._seen[rows] = True
        query.stats.style_rows_read += new
        query.stats.bytes_read += new * self.index.style_row_bytes

    def _exact_style(self, query: _Query, rows: np.ndarray) -> None:
        """Exact style losses of ``rows`` (the one float64 arithmetic)."""
        rows = np.unique(rows[np.isnan(query.ls[rows])])
        if not len(rows):
            return
        started = time.perf_counter()
        codec = self.index.store.codec
        width = self.index.store.style_dim
        stage_starts = self._stage_starts
        explain = self.explain

        style = self.index.style

        def work(task, squares):
            _, chunk, stored = task
            if callable(stored):  # a mapped chunk, gathered on this worker thread
                stored = stored()
            x = codec.decode(stored)  # float32, as every path decodes
            sq = squares[: len(x)]
            # the one exact arithmetic (squared_distances), in place: float64 differences,
            # squared, summed pairwise along each row
            np.subtract(x, query.q64, out=sq)
            np.multiply(sq, sq, out=sq)
            query.ls[chunk] = sq.sum(axis=1)
            if explain:
                stages = np.add.reduceat(sq, stage_starts, axis=1)
                query.stage_losses.update(zip(chunk.tolist(), stages, strict=True))

        tasks = style.row_chunks(rows, _EXACT_ROWS, read_rows=_EXACT_BLOCK)
        parallel(tasks, work, lambda: np.empty((_EXACT_ROWS, width)))
        if query.ls_lo is not None:
            query.ls_lo[rows] = query.ls_hi[rows] = query.ls[rows]
        self._count_reads(query, rows)
        query.stats.add_time("exact style", started)

    def _tighten_rows(self, query: _Query, rows: np.ndarray) -> None:
        """Tight intervals for ``rows``, reading them or scanning everything (the cost model)."""
        rows = rows[~query.tight[rows] & np.isnan(query.ls[rows])]
        if not len(rows):
            return
        index = self.index
        if index.cost.prefer_scan(len(rows), index.rows, index.style_row_bytes):
            self._tighten(None, query)
        else:
            self._tighten(rows, query)

    def ls_max(self, query: _Query) -> float:
        """Exact maximum style loss over the committed, live rows."""
        if query.ls_max is None:
            self._style_bounds()
            assert query.ls_lo is not None
            live = self.index.live
            if not live.any():
                query.ls_max = 0.0
                return 0.0
            candidates = np.flatnonzero(live & (query.ls_hi >= query.ls_lo[live].max()))
            self._tighten_rows(query, candidates)
            candidates = np.flatnonzero(live & (query.ls_hi >= query.ls_lo[live].max()))
            self._exact_style(query, candidates)
            query.ls_max = float(np.max(query.ls[candidates]))
        return query.ls_max

    # -- dice ----------------------------------------------------------------------------
    def _dice(self, query: _Query) -> None:
        if query.dc is not None:
            return
        started = time.perf_counter()
        index = self.index
        q = query.q
        if index.exact_dice:
            query.dc = index.dice_rows(q.mask, q.mask_area)
            query.dc_hi = query.dc
        else:
            query.dc = np.full(index.rows, np.nan)
            query.dc_hi = index.dice_upper(q.mask, q.mask_area)
            empty = (index.mask_areas == 0) | (q.mask_area == 0)
            query.dc[empty] = dice_score(
                np.zeros(int(empty.sum())), index.mask_areas[empty], q.mask_area
            )
        query.stats.add_time("dice", started)

    def _exact_dice(self, query: _Query, rows: np.ndarray) -> None:
        self._dice(query)
        assert query.dc is not None
        rows = np.unique(rows[np.isnan(query.dc[rows])])
        if not len(rows):
            return
        index = self.index
        q = query.q
        if index.masks is not None:  # in memory: nothing to read
            query.dc[rows] = index.dice_rows(q.mask, q.mask_area, rows)
            return
        started = time.perf_counter()
        masks = index.store.mask_rows(rows)
        if self.explain:
            self._read_masks.update(zip(rows.tolist(), masks, strict=True))
        inter = np.bitwise_count(masks & q.mask).sum(axis=1, dtype=np.int64)
        query.dc[rows] = dice_score(inter, index.mask_areas[rows], q.mask_area)
        query.stats.mask_rows_read += len(rows)
        query.stats.bytes_read += len(rows) * index.mask_row_bytes
        query.stats.add_time("mask rows", started)

    # -- component intervals -------------------------------------------------------------
    def _prepare(self, query: _Query, names: Sequence[str]) -> None:
        if "es" in names:
            self.ed_max(query)
        elif "cs" in names:
            self._feature_bounds()
        if "ss" in names:
            self.ls_max(query)
        if "dc" in names:
            self._dice(query)

    def _interval(
        self, query: _Query, name: str, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of a component for ``rows`` (equal where exact)."""
        if name == "es":
            ed = query.ed[rows]
            known = ~np.isnan(ed)
            ed_max = query.ed_max if query.ed_max is not None else 0.0
            assert query.ed_lo is not None
            lo = normalised_score(np.where(known, ed, query.ed_hi[rows]), ed_max)
            hi = normalised_score(np.where(known, ed, query.ed_lo[rows]), ed_max)
            return lo, hi
        if name == "cs":
            cos = query.cos[rows]
            known = ~np.isnan(cos)
            return (
                cosine_score(np.where(known, cos, query.cos_lo[rows])),
                cosine_score(np.where(known, cos, query.cos_hi[rows])),
            )
        if name == "dc":
            assert query.dc is not None
            dc = query.dc[rows]
            known = ~np.isnan(dc)
            return np.where(known, dc, 0.0), np.where(known, dc, query.dc_hi[rows])
        ls_max = query.ls_max if query.ls_max is not None else 0.0
        assert query.ls_lo is not None
        lo = np.maximum(normalised_score(query.ls_hi[rows], ls_max), 0.0)
        return lo, normalised_score(query.ls_lo[rows], ls_max)

    def _bounds(
        self, query: _Query, measure: str, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        parts = {c: self._interval(query, c, rows) for c in MEASURE_COMPONENTS[measure]}
        return (
            measure_score(measure, {c: p[0] for c, p in parts.items()}),
            measure_score(measure, {c: p[1] for c, p in parts.items()}),
        )

    def _loose(self, query: _Query, names: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` still have a component that is neither exact nor tight."""
        out = np.zeros(len(rows), bool)
        if "es" in names or "cs" in names:
            out |= np.isnan(query.ed[rows])
        if "ss" in names:
            out |= ~query.tight[rows] & np.isnan(query.ls[rows])
        if "dc" in names:
            assert query.dc is not None
            out |= np.isnan(query.dc[rows])
        return out

    def _refine(
        self,
        states: Sequence[_Query],
        names: Sequence[str],
        rows: np.ndarray,
        pending_style: np.ndarray,
        hits: int,
    ) -> None:
        """Narrow the intervals of ``rows`` (the most promising of ``pending_style``) for a top
        ``hits``, for every query of ``states`` (one, or a lesion query's images): exact
        features and Dice; style losses exact at once when the rows are few beside the hits
        (most of them will be hits, and a tight interval costs nearly an exact value), else
        tight intervals by reading the rows once for all the states or by one scan (the cost
        model)."""
        for query in states:
            if "es" in names or "cs" in names:
                self._exact_features(query, rows)
            if "dc" in names:
                self._exact_dice(query, rows)
        if "ss" not in names:
            return
        needs = [rows[~q.tight[rows] & np.isnan(q.ls[rows])] for q in states]
        need = np.unique(np.concatenate(needs))
        if not len(need):
            return
        index = self.index
        if index.cost.prefer_scan(len(pending_style), index.rows, index.style_row_bytes):
            self._tighten(None, states[0])  # one scan serves every query of the batch
        elif len(need) <= _EXACT_AT_ONCE * hits:  # most will be hits: score them now
            for query, own in zip(states, needs):
                self._exact_style(query, own)
        else:
            self._tighten(need, states[0], states[1:])

    def exact_components(
        self, query: _Query, rows: np.ndarray, names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Exact component scores of ``rows`` (computing what is missing)."""
        out = {}
        for name in names:
            if name in ("es", "cs"):
                self._exact_features(query, rows)
                out[name] = (
                    normalised_score(query.ed[rows], self.ed_max(query))
                    if name == "es"
                    else cosine_score(query.cos[rows])
                )
            elif name == "dc":
                self._exact_dice(query, rows)
                assert query.dc is not None
                out[name] = query.dc[rows]
            else:
                ls_max = self.ls_max(query)
                self._exact_style(query, rows)
                out[name] = normalised_score(query.ls[rows], ls_max)
        return out

    # -- ranking -------------------------------------------------------------------------
    def top_k(
        self,
        query: _Query | Sequence[_Query],
        measure: str,
        k: int,
        allowed: np.ndarray,
        *,
        grouping: Grouping | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and exact scores of the ``k`` best rows (or groups) under ``measure``.

        Parameters
        ----------
        query : query state, or a sequence of them
            One query, or the images of one lesion query: a row's score is then the mean of
            the measure's scores over the images (each with its own ``ED_max`` / ``LS_max``),
            bounded by the mean of their bounds.
        allowed : np.ndarray
            Boolean ``(N,)``: rows that may be returned (live, not excluded, passing the
            filter). Normalisers are taken over every live row regardless.
        grouping : Grouping, optional
            Return the best row of each of the ``k`` best groups (a group's score is its best
            row's score; ties by row): rows are visited until ``k`` distinct groups are proven.
        """
        states = [query] if isinstance(query, _Query) else list(query)
        started = time.perf_counter()
        names = MEASURE_COMPONENTS[measure]
        for state in states:
            self._prepare(state, names)
        candidates = np.flatnonzero(allowed)
        batch = k + _FIRST_EXTRA
        while len(candidates):
            lo, hi = self._mean_bounds(states, measure, candidates)
            candidates, hi = _prune(candidates, lo, hi, k, grouping)
            loose = np.zeros(len(candidates), bool)
            for state in states:
                loose |= self._loose(state, names, candidates)
            if not loose.any():
                break
            pending = candidates[loose]
            order = pending[np.lexsort((pending, -hi[loose]))]
            self._refine(states, names, order[:batch], order, k)
            batch *= 2
        # the rows that can still be in the top k: their exact scores
        lo, hi = self._mean_bounds(states, measure, candidates)
        candidates, _ = _prune(candidates, lo, hi, k, grouping)
        scores = self._mean_exact(states, measure, candidates)
        if grouping is None:
            best = rank(scores, k, rows=candidates)
        else:
            best = top_groups(scores, candidates, grouping, k)
        stats = states[0].stats
        stats.reranked[measure] = len(candidates)
        stats.add_time(f"rank {measure}", started)
        return candidates[best], scores[best]

    def _mean_bounds(
        self, states: Sequence[_Query], measure: str, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of the mean score over ``states`` (summed in state order, as the exact)."""
        lo, hi = self._bounds(states[0], measure, rows)
        if len(states) == 1:
            return lo, hi
        for state in states[1:]:
            low, high = self._bounds(state, measure, rows)
            lo, hi = lo + low, hi + high
        return lo / len(states), hi / len(states)

    def _mean_exact(self, states: Sequence[_Query], measure: str, rows: np.ndarray) -> np.ndarray:
        names = MEASURE_COMPONENTS[measure]
        total = measure_score(measure, self.exact_components(states[0], rows, names))
        if len(states) == 1:
            return total
        for state in states[1:]:
            total = total + measure_score(measure, self.exact_components(state, rows, names))
        return total / len(states)

    def hit_components(
        self, query: _Query | Sequence[_Query], rows: np.ndarray, names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The exact components ``names`` of the hit rows (their means over a lesion's
        images)."""
        states = [query] if isinstance(query, _Query) else list(query)
        out = self.exact_components(states[0], rows, names)
        if len(states) == 1:
            return out
        for state in states[1:]:
            more = self.exact_components(state, rows, names)
            out = {c: out[c] + more[c] for c in names}
        return {c: v / len(states) for c, v in out.items()}

    def explanation(self, query: _Query, rows: np.ndarray) -> Explanation:
        """Why ``rows`` (hits of ``query``) scored as they did: their style losses by stage and
        their masks, from what the search computed and read."""
        if not self.explain:
            raise ValueError("the batch was not created with explain=True")
        rows = np.unique(np.asarray(rows, np.int64))
        self._exact_style(query, rows)  # a no-op for rows the search scored exactly
        layout = self.index.store.layout
        if self.index.masks is not None:
            masks = {int(r): self.index.masks[r] for r in rows}
        else:
            missing = [int(r) for r in rows if int(r) not in self._read_masks]
            if missing:
                self._read_masks.update(
                    zip(missing, self.index.store.mask_rows(missing), strict=True)
                )
            masks = {int(r): self._read_masks[int(r)] for r in rows}
        return Explanation(
            mask_size=self.index.store.mask_size,
            query_mask=np.asarray(query.q.mask),
            masks=masks,
            stages={int(r): stage_losses(layout, query.stage_losses[int(r)]) for r in rows},
        )


def _prune(
    rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, k: int, grouping: Grouping | None
) -> tuple[np.ndarray, np.ndarray]:
    """Drop the rows that cannot be among the ``k`` best (rows or groups' best rows).

    Ungrouped: a row whose upper bound is below the ``k``-th largest lower bound. Grouped: a
    row whose upper bound is below the ``k``-th largest lower bound of a group (a group's lower
    bound is the largest of its rows'), or below its own group's lower bound (another row of the
    group beats it). Bounds equal to the threshold stay (ties are broken by row).
    """
    if grouping is None:
        if len(rows) <= k:
            return rows, hi
        kth = np.partition(lo, len(lo) - k)[len(lo) - k]
        keep = hi >= kth
    else:
        keep = (hi >= grouping.kth_group_lower(rows, lo, k)) & (
            hi >= grouping.group_lower(rows, lo)
        )
    return rows[keep], hi[keep]
