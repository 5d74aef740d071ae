"""The retriever's public value types: a query's vectors, search options, what a search cost.

All are plain (frozen where they configure) dataclasses without torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermris.core.errors import QueryError

__all__ = [
    "CostModel",
    "LesionQuery",
    "QueryVectors",
    "SearchOptions",
    "SearchStats",
    "MASK_MEMORY_BYTES",
    "EXACT_DICE_BYTES",
]

MASK_MEMORY_BYTES = 1 << 30
"""Masks are kept in memory (no mask is read from disk during a search) up to this many bytes."""

EXACT_DICE_BYTES = 1 << 30
"""Up to this many bytes of masks (all that are kept in memory, by default), Dice is computed
exactly for every row at once (one popcount pass on every core, as a brute force's mask pass);
above it, Dice is bounded from block counts first and computed exactly only for the rows the
threshold algorithm visits. (Block counts bound the Dice of noisy masks, an untrained
segmenter's, so loosely that every row stays in contention for the Dice-based measures: on
20,000 rows of real pixels ``i1_sd`` then scanned every style row.)"""


@dataclass(frozen=True)
class CostModel:
    """Seconds to read rows one request per run versus a sequential scan.

    A retriever measures its own when it opens a store (:meth:`StoreIndex.measure_cost`:
    a few row reads and a scan of one shard, on this disk); these defaults are figures of the
    2-core machine the benchmarks ran on (page cache).

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
        return to_read > 0 and self.scan_seconds(to_scan, row_bytes) < self.rows_seconds(
            to_read, row_bytes
        )


@dataclass(frozen=True)
class SearchOptions:
    """How a :class:`~dermris.retriever.Retriever` searches (never what it answers: every
    option gives the same, exact results).

    Attributes
    ----------
    mask_memory_bytes : int
        Keep the masks in memory up to this size (Dice exact for every row at no read cost);
        larger stores bound Dice from block counts and read masks as needed.
    exact_dice_bytes : int
        Up to this size of masks, Dice is computed for every row at once; above it, Dice is
        bounded (block counts or areas) and computed only for the rows visited.
    memory_budget_bytes : int or None
        Memory-map the style rows when they take at most this much (default: half the
        machine's memory): row reads are then memory reads, shared by every process that maps
        the same store. Larger stores read rows from disk as needed.
    cost_model : CostModel or None
        When reading rows one by one loses to a sequential scan; default: measured on this
        store's disk when it is opened.
    """

    mask_memory_bytes: int = MASK_MEMORY_BYTES
    exact_dice_bytes: int = EXACT_DICE_BYTES
    memory_budget_bytes: int | None = None
    cost_model: CostModel | None = None

    def memory_budget(self) -> int:
        """:attr:`memory_budget_bytes`, or half the physical memory."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
        except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
            return 4 << 30


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


@dataclass(frozen=True, init=False)
class LesionQuery:
    """Several images of one lesion asked as one query.

    Each measure's score of a stored row is the mean, over the query's images, of that
    measure's score for the image (every image with its own ``ED_max`` and ``LS_max`` over the
    whole store); the hit's components are the means of the images' components. The ranking
    is exact (the mean of the images' upper bounds bounds the mean). Stored rows among the
    images are not returned (with ``exclude_self``, the default).

    Parameters
    ----------
    images : iterable
        At least one image: paths, PIL images, uint8 arrays, stored rows (int) or
        :class:`QueryVectors`, mixed as needed.

    Examples
    --------
    >>> LesionQuery([12, 13, "new_view.jpg"])                       # doctest: +SKIP
    """

    images: tuple[Any, ...]

    def __init__(self, images: Iterable[Any]) -> None:
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or not isinstance(
            images, Iterable
        ):
            raise QueryError("a LesionQuery takes a list of images (paths, rows, arrays, ...)")
        items = tuple(images)
        if not items:
            raise QueryError("a LesionQuery needs at least one image")
        if any(isinstance(i, (LesionQuery, list, tuple)) for i in items):
            raise QueryError("the images of a LesionQuery cannot be lists or lesion queries")
        object.__setattr__(self, "images", items)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"LesionQuery({len(self.images)} images)"


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
    seconds : float
        Wall time of the whole search for this query (shared work of a batch included).
    stage_seconds : dict of str to float
        Wall time per stage (``bounds``, ``features``, ``style rows``, ``rank <measure>``, ...).
    """

    rows: int = 0
    style_rows_read: int = 0
    mask_rows_read: int = 0
    bytes_read: int = 0
    scans: int = 0
    reranked: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, stage: str, started: float) -> None:
        """Add the time since ``started`` (``time.perf_counter()``) to ``stage``."""
        self.stage_seconds[stage] = (
            self.stage_seconds.get(stage, 0.0) + time.perf_counter() - started
        )

    @classmethod
    def combined(cls, parts: "Iterable[SearchStats]") -> "SearchStats":
        """One query's cost from the costs of its images (a lesion query): counts and stage
        times summed, re-ranked rows from the first image (where ranking records them)."""
        parts = list(parts)
        out = cls(rows=parts[0].rows if parts else 0)
        for part in parts:
            out.style_rows_read += part.style_rows_read
            out.mask_rows_read += part.mask_rows_read
            out.bytes_read += part.bytes_read
            out.scans += part.scans
            for stage, seconds in part.stage_seconds.items():
                out.stage_seconds[stage] = out.stage_seconds.get(stage, 0.0) + seconds
        if parts:
            out.reranked = dict(parts[0].reranked)
        return out

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "rows": self.rows,
            "style_rows_read": self.style_rows_read,
            "mask_rows_read": self.mask_rows_read,
            "bytes_read": self.bytes_read,
            "scans": self.scans,
            "reranked": dict(self.reranked),
            "seconds": round(self.seconds, 6),
            "stage_seconds": {k: round(v, 6) for k, v in self.stage_seconds.items()},
        }
