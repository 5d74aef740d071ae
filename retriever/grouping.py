"""Groups of rows (one lesion, one patient): a group id per row, and the exact top k groups.

A :class:`Grouping` is built from one metadata column (:meth:`Grouping.from_column`): rows with
the same value share a group; a row whose value is null is a group of its own. The threshold
ranking (:meth:`dermris.retriever.threshold.QueryBatch.top_k` with ``grouping=``) then keeps
visiting rows until ``k`` distinct groups are proven: a group's score is its best row's score
(ties by row), and a row stays in contention while its upper bound reaches the ``k``-th
largest lower bound of a group (and its own group's lower bound).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dermris.core.errors import QueryError

from .measures import rank

__all__ = ["Grouping", "top_groups"]


class Grouping:
    """A group id for every row of a store.

    Parameters
    ----------
    ids : np.ndarray
        ``(N,)`` int64 group id of every row, in ``[0, n_groups)``.
    values : list
        The column value of each group (None for the groups of null rows).
    column : str
        The column the groups come from.
    """

    def __init__(self, ids: np.ndarray, values: list[Any], *, column: str = "") -> None:
        self.ids = np.asarray(ids, np.int64)
        self.values = values
        self.column = column
        self.n_groups = len(values)
        order = np.argsort(self.ids, kind="stable")  # rows of a group, ascending
        self._order = order
        self._starts = np.searchsorted(self.ids[order], np.arange(self.n_groups + 1))

    @classmethod
    def from_column(cls, column: pa.Array | pa.ChunkedArray, *, name: str = "") -> "Grouping":
        """Groups of equal values of ``column`` (row order); each null is a group of its own.

        Parameters
        ----------
        column : pyarrow.Array or pyarrow.ChunkedArray
            One value per row.
        name : str
            The column's name (for messages and :attr:`column`).
        """
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        try:
            encoded = pc.dictionary_encode(column, null_encoding="mask")
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
            raise QueryError(f"cannot group by column {name!r} of type {column.type}") from exc
        values: list[Any] = encoded.dictionary.to_pylist()
        out = np.array(encoded.indices.fill_null(0).to_numpy(zero_copy_only=False), np.int64)
        null = np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool)
        out[null] = len(values) + np.arange(int(null.sum()))
        return cls(out, values + [None] * int(null.sum()), column=name)

    def __len__(self) -> int:
        return len(self.ids)

    def value(self, row: int) -> Any:
        """The column value of ``row``'s group (None for a null)."""
        return self.values[int(self.ids[row])]

    def rows(self, group: int) -> np.ndarray:
        """The rows of group ``group``, ascending."""
        return self._order[self._starts[group] : self._starts[group + 1]]

    def members(self, row: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """The other rows of ``row``'s group (those ``allowed``, when given), ascending."""
        rows = self.rows(int(self.ids[row]))
        keep = rows != row
        if allowed is not None:
            keep &= allowed[rows]
        return rows[keep]

    def group_lower(self, rows: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """For each of ``rows``, the largest ``lo`` among the ``rows`` of its group."""
        ids = self.ids[rows]
        best = np.full(self.n_groups, -np.inf)
        np.maximum.at(best, ids, lo)
        return best[ids]

    def kth_group_lower(self, rows: np.ndarray, lo: np.ndarray, k: int) -> float:
        """The ``k``-th largest group lower bound among ``rows`` (-inf with fewer groups)."""
        ids = self.ids[rows]
        best = np.full(self.n_groups, -np.inf)
        np.maximum.at(best, ids, lo)
        present = best[np.unique(ids)]
        if len(present) < k:
            return -np.inf
        return float(np.partition(present, len(present) - k)[len(present) - k])


def top_groups(scores: np.ndarray, rows: np.ndarray, grouping: Grouping, k: int) -> np.ndarray:
    """Positions (into ``rows``) of the best row of each of the ``k`` best groups.

    Rows are ranked by score descending, ties by row ascending (:func:`~.measures.rank`); a
    group is represented by its first row in that order, and groups are ranked by their
    representative.
    """
    order = rank(scores, len(scores), rows=rows)
    ids = grouping.ids[rows[order]]
    _, first = np.unique(ids, return_index=True)
    return order[np.sort(first)[:k]]
