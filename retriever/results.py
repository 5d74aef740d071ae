"""Search results (:class:`Hit`, :class:`SearchResult`) and their one JSON, Arrow and pandas form.

Every caller that turns results into something else (the command line's ``--json``, the HTTP
API, the demo) goes through :meth:`SearchResult.to_dict`, :meth:`SearchResult.to_arrow` or
:meth:`SearchResult.to_pandas`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dermris.core.errors import OptionalDependencyError

from .measures import COMPONENTS
from .types import SearchStats

if TYPE_CHECKING:
    import pandas
    import pyarrow as pa

    from .explain import Explanation

__all__ = ["Hit", "SearchResult", "json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities: not JSON) turned into None, and
    NumPy scalars into Python numbers (``np.float32`` is no ``float``)."""
    if isinstance(value, np.generic) and isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes
    ----------
    row : int
        Row number in the store (= FAISS id).
    image_id : str
        The image id (file stem).
    path : str
        The indexed file's path.
    score : float
        The measure's score, higher is more similar, in [0, 1].
    components : mapping of str to float
        All four component scores: ``es``, ``cs``, ``ss`` and ``dc``.
    metadata : mapping of str to object
        The metadata columns asked for with ``columns=``.
    group : object
        In a grouped search (``group_by=``), the group's value in that column (None for a row
        whose value is null: a group of its own); None otherwise.
    members : tuple of int
        In a grouped search, the other rows of the group that may be returned (passing
        ``where`` and ``exclude``), ascending; the hit is the group's best row.
    """

    row: int
    image_id: str
    path: str
    score: float
    components: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    group: Any = None
    members: tuple[int, ...] = ()

    def to_dict(self, *, paths: bool = True, grouped: bool = False) -> dict:
        """JSON-ready form (``paths=False`` leaves out the indexed file's path; ``grouped``
        adds ``group`` and ``members``)."""
        out: dict[str, Any] = {"row": self.row, "image_id": self.image_id}
        if paths:
            out["path"] = self.path
        out["score"] = self.score
        out["components"] = dict(self.components)
        if self.metadata:
            out["metadata"] = json_safe(dict(self.metadata))
        if grouped:
            out["group"] = json_safe(self.group)
            out["members"] = [int(m) for m in self.members]
        return out


class SearchResult(Mapping):
    """The hits of one query, per measure (in the order the measures were asked for).

    ``result["style"]`` is a list of :class:`Hit`, best first; :attr:`stats` says what the
    search cost (rows read, bytes, seconds); :attr:`explanation` holds the style-stage
    breakdown and the lesion masks of every hit when the search was asked to ``explain``.
    :attr:`group_by` is the column of a grouped search (None otherwise); :attr:`rows` the
    stored rows the query was made of (several for a lesion query).
    """

    def __init__(
        self,
        hits: dict[str, list[Hit]],
        *,
        stats: SearchStats,
        query: str,
        row: int | None,
        explanation: "Explanation | None" = None,
        group_by: str | None = None,
        rows: tuple[int, ...] = (),
    ) -> None:
        self._hits = hits
        self.stats = stats
        self.query = query
        self.row = row
        self.explanation = explanation
        self.group_by = group_by
        self.rows = rows if rows else ((row,) if row is not None else ())

    def __getitem__(self, measure: str) -> list[Hit]:
        return self._hits[measure]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hits)

    def __len__(self) -> int:
        return len(self._hits)

    def __repr__(self) -> str:
        shown = ", ".join(f"{m}: {len(h)} hits" for m, h in self._hits.items())
        return f"SearchResult(query={self.query!r}, {shown})"

    @property
    def measures(self) -> tuple[str, ...]:
        """The measures of this result."""
        return tuple(self._hits)

    def to_dict(self, *, paths: bool = True, stats: bool = True) -> dict:
        """JSON-ready form: query, hits per measure (with ``style_stages`` when explained),
        statistics.

        Parameters
        ----------
        paths : bool
            Include every hit's indexed file path (the HTTP API leaves them out).
        stats : bool
            Include :attr:`stats`.
        """
        results = {}
        for measure, hits in self._hits.items():
            entries = []
            for hit in hits:
                entry = hit.to_dict(paths=paths, grouped=self.group_by is not None)
                if self.explanation is not None:
                    entry["style_stages"] = [s.to_dict() for s in self.explanation.stages[hit.row]]
                entries.append(entry)
            results[measure] = entries
        out: dict[str, Any] = {"query": self.query, "row": self.row, "results": results}
        if len(self.rows) > 1 or (self.rows and self.row is None):
            out["rows"] = list(self.rows)
        if self.group_by is not None:
            out["group_by"] = self.group_by
        if stats:
            out["stats"] = self.stats.to_dict()
        return out

    def to_arrow(self) -> "pa.Table":
        """One table row per hit: ``measure``, ``rank`` (1 = best), ``row``, ``image_id``,
        ``path``, ``score``, the four components (``group`` and ``members`` when grouped) and
        the metadata columns asked for."""
        import pyarrow as pa

        rows: dict[str, list] = {
            name: []
            for name in ("measure", "rank", "row", "image_id", "path", "score", *COMPONENTS)
        }
        meta_columns = list(
            dict.fromkeys(c for hits in self._hits.values() for h in hits for c in h.metadata)
        )
        meta: dict[str, list] = {c: [] for c in meta_columns}
        for measure, hits in self._hits.items():
            for rank, hit in enumerate(hits, start=1):
                rows["measure"].append(measure)
                rows["rank"].append(rank)
                rows["row"].append(hit.row)
                rows["image_id"].append(hit.image_id)
                rows["path"].append(hit.path)
                rows["score"].append(hit.score)
                for c in COMPONENTS:
                    rows[c].append(hit.components.get(c))
                for c in meta_columns:
                    meta[c].append(hit.metadata.get(c))
        types = {
            "measure": pa.string(),
            "rank": pa.int32(),
            "row": pa.int64(),
            "image_id": pa.string(),
            "path": pa.string(),
            "score": pa.float64(),
            **{c: pa.float64() for c in COMPONENTS},
        }
        columns = {name: pa.array(values, types[name]) for name, values in rows.items()}
        if self.group_by is not None:
            hits = [h for hs in self._hits.values() for h in hs]
            columns["group"] = pa.array([h.group for h in hits])
            columns["members"] = pa.array([list(h.members) for h in hits], pa.list_(pa.int64()))
        for c in meta_columns:
            if c in columns:
                continue
            columns[c] = pa.array(meta[c])
        return pa.table(columns)

    def to_pandas(self) -> "pandas.DataFrame":
        """:meth:`to_arrow` as a pandas DataFrame (needs pandas)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise OptionalDependencyError("to_pandas needs pandas: pip install pandas") from None
        return self.to_arrow().to_pandas()
