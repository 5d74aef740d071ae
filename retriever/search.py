"""The :class:`Retriever`: one search call over the nine measures.

``Retriever.search(query, *, measures, k, exclude, where, columns)`` gathers each query's
vectors, bounds every row, and re-ranks exactly (:mod:`dermris.retriever.threshold`). Every
measure is exact: scores equal brute force over all committed rows, with ``ED_max`` and
``LS_max`` taken over the whole store, also when a filter narrows the rows that may be
returned (the paper's definition). Features live in memory; style rows and masks are read
from disk only for rows whose bounds leave them in contention.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from dermris.core.errors import QueryError
from dermris.core.imageio import decode_image, to_rgb
from dermris.indexer.store import Store

from .filters import rows_matching
from .grouping import Grouping
from .measures import COMPONENTS, MEASURE_COMPONENTS, check_measures
from .results import Hit, SearchResult
from .store_index import StoreIndex
from .threshold import QueryBatch
from .types import LesionQuery, QueryVectors, SearchOptions, SearchStats

if TYPE_CHECKING:
    from dermris.indexer.embed import Embedder

__all__ = ["Hit", "SearchResult", "Retriever", "QueryVectors", "SearchOptions", "LesionQuery"]

_WHERE_CACHE = 32  # filters whose matching rows are kept (N booleans each)

Query = Any
"""A path (str or os.PathLike), a PIL image, an H x W (x 3) uint8 array, a stored row (int),
:class:`QueryVectors`, or a :class:`LesionQuery` of several of these."""


class _TextColumn(Sequence[str]):
    """A string column kept as Arrow data (a few bytes a row), read as ``str`` per item."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._array[index].to_pylist()
        value = self._array[int(index)].as_py()
        return "" if value is None else value

    def to_list(self) -> list[str]:
        """Every value, as a list."""
        return [v or "" for v in self._array.to_pylist()]


def _is_row(query: Any) -> bool:
    return isinstance(query, (int, np.integer)) and not isinstance(query, (bool, np.bool_))


class Retriever:
    """Ranks a store's images against queries by the nine measures.

    Use :meth:`open`. The retriever serves a snapshot of the committed rows taken when it was
    opened (deletions committed later are honoured at once); :meth:`refresh` picks up new rows.

    Parameters
    ----------
    store : Store
        The opened store.
    device : str
        Where the model and the bound arithmetic run: ``auto``, ``cpu`` or ``cuda``.
    """

    def __init__(
        self, store: Store, *, device: str = "auto", options: SearchOptions | None = None
    ) -> None:
        self.store = store
        self._device_name = device
        self._device = None
        self.options = options if options is not None else SearchOptions()
        self._embedder: Embedder | None = None
        meta = store.metadata(columns=["image_id", "path"])
        self._image_ids = _TextColumn(meta.column("image_id"))
        self._paths = _TextColumn(meta.column("path"))
        self._metadata: pa.Table | None = None
        self._groupings: dict[str, Grouping] = {}
        self._where_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._where_lock = threading.Lock()
        self._index = StoreIndex(store, options=self.options)

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, device: str = "auto", options: SearchOptions | None = None
    ) -> "Retriever":
        """Open the store at ``path`` (the model is loaded on the first image query).

        Parameters
        ----------
        path : path-like
            The store.
        device : str
            ``auto``, ``cpu`` or ``cuda``: where image queries are embedded (resolved, and torch
            imported, only when the first image query needs the model).
        options : SearchOptions, optional
            How to search (memory limits, cost model, FAISS); every option answers the same.
        """
        return cls(Store.open(path), device=device, options=options)

    def refresh(self) -> "Retriever":
        """Re-open the store to see rows committed (or compaction done) since it was opened."""
        fresh = Retriever(
            Store.open(self.store.root), device=self._device_name, options=self.options
        )
        fresh._embedder = self._embedder
        fresh._device = self._device
        self.__dict__.update(fresh.__dict__)
        return self

    def reopened(self) -> "Retriever":
        """A new retriever over the store as it is now (new rows, a new generation), sharing this
        one's loaded model; this one is left as it was."""
        fresh = Retriever(
            Store.open(self.store.root), device=self._device_name, options=self.options
        )
        fresh._embedder = self._embedder
        fresh._device = self._device
        return fresh

    @property
    def generation(self) -> str | None:
        """The generation of the arrays this retriever reads (a compaction makes a new one)."""
        return self.store.manifest.generation

    def sync(self) -> None:
        """Pick up deletions committed since the last call (or search).

        Raises
        ------
        StoreChangedError
            The store was compacted since this retriever was opened (reopen it).
        """
        self._sync()

    @property
    def device(self):
        """The torch device image queries are embedded on (resolving it imports torch)."""
        if self._device is None:
            from dermris.indexer.embed import resolve_device

            self._device = resolve_device(self._device_name)
        return self._device

    def __len__(self) -> int:
        return self.store.rows

    def __repr__(self) -> str:
        return (
            f"Retriever({str(self.store.root)!r}, rows={self.store.rows}, "
            f"device={self._device_name!r})"
        )

    @property
    def image_ids(self) -> Sequence[str]:
        """Image id of every row."""
        return self._image_ids

    @property
    def paths(self) -> Sequence[str]:
        """Indexed file path of every row."""
        return self._paths

    @property
    def segmenter_trained(self) -> bool:
        """Whether the store's masks come from a trained segmenter (else the Dice component,
        and so the Dice-based measures :data:`DICE_MEASURES`, rank by noise)."""
        return self.store.segmenter_trained

    @property
    def metadata_columns(self) -> list[str]:
        """The metadata columns ``where=`` and ``columns=`` can use."""
        return self.store.metadata_schema().names

    @property
    def live(self) -> np.ndarray:
        """Boolean ``(N,)``: rows not deleted (as of the last search)."""
        return self._index.live.copy()

    @property
    def resident_bytes(self) -> int:
        """Approximate bytes the retriever keeps in memory for the bounds."""
        return self._index.nbytes()

    @property
    def image_root(self) -> str:
        """The deepest folder holding every indexed file (as indexed)."""
        if not hasattr(self, "_image_root"):
            paths = [p for p in self._paths.to_list() if p]
            self._image_root = os.path.commonpath(paths) if paths else ""
            if len(paths) == 1:
                self._image_root = os.path.dirname(paths[0])
        return self._image_root

    def locate(self, path: str, image_root: str | os.PathLike | None = None) -> str:
        """Where an indexed file is now: ``path`` if it exists, else the same file under
        ``image_root`` (the indexed folder's new place), else ``path``."""
        if image_root is None or os.path.isfile(path) or not self.image_root:
            return path
        try:
            moved = Path(image_root) / os.path.relpath(path, self.image_root)
        except ValueError:
            return path
        return str(moved) if moved.is_file() else path

    def metadata(self) -> pa.Table:
        """The store's metadata table (row order), read once and kept."""
        if self._metadata is None:
            self._metadata = self.store.metadata()
        return self._metadata

    def grouping(self, column: str) -> Grouping:
        """The groups of rows of equal ``column`` values (nulls alone), built once."""
        if not isinstance(column, str) or not column:
            raise QueryError(f"group_by must be a metadata column name, not {column!r}")
        if column not in self._groupings:
            self._check_columns((column,), frozenset())
            self._groupings[column] = Grouping.from_column(
                self.metadata().column(column), name=column
            )
        return self._groupings[column]

    def group_rows(self, column: str, value: Any) -> list[int]:
        """The live rows whose ``column`` equals ``value`` (e.g. one lesion's images)."""
        grouping = self.grouping(column)
        self._sync()
        try:
            group = grouping.values.index(value)
        except ValueError:
            raise QueryError(f"no row has {column} == {value!r}") from None
        rows = grouping.rows(group)
        return [int(r) for r in rows[self._index.live[rows]]]

    # -- query vectors -------------------------------------------------------------------
    def _model(self) -> "Embedder":
        if self._embedder is None:
            from dermris.indexer.embed import Embedder

            self._embedder = Embedder(self.store.load_model(), device=self.device, batch_size=8)
        return self._embedder

    def _as_image(self, query: Any) -> Image.Image:
        if isinstance(query, (str, os.PathLike)):
            path = Path(query)
            if not path.is_file():
                raise QueryError(f"query image not found: {path}")
            # decoded exactly as the indexer decodes files (same JPEG draft size)
            return decode_image(path, draft_size=2 * self.store.model_config.image_size)[0]
        if isinstance(query, Image.Image):
            if query.width < 1 or query.height < 1:
                raise QueryError("query image has no pixels")
            return to_rgb(query)
        if isinstance(query, np.ndarray):
            if query.dtype != np.uint8:
                raise QueryError(f"array queries must be uint8, got {query.dtype}")
            if (
                query.ndim not in (2, 3)
                or min(query.shape[:2]) < 1
                or (query.ndim == 3 and query.shape[2] not in (3, 4))
            ):
                raise QueryError(
                    f"array queries must be HxW or HxWx3 uint8 with pixels, got shape {query.shape}"
                )
            if query.ndim == 2:
                return Image.fromarray(query).convert("RGB")
            return Image.fromarray(np.ascontiguousarray(query[:, :, :3]), "RGB")
        raise QueryError(f"unsupported query type {type(query).__name__}")

    @overload
    def embed(self, images: list[Any] | tuple[Any, ...]) -> list[QueryVectors]: ...

    @overload
    def embed(self, images: Any) -> QueryVectors: ...

    def embed(self, images: Any) -> QueryVectors | list[QueryVectors]:
        """Turn images (path, PIL image or uint8 array; or a list of them) into the store's
        representation, in one batch."""
        single = not isinstance(images, (list, tuple))
        batch = [self._as_image(q) for q in ([images] if single else images)]
        vectors = []
        if batch:
            out = self._model().embed(batch)
            for i in range(len(batch)):
                mask = out.masks[i].reshape(-1)
                vectors.append(
                    QueryVectors(
                        feature=out.features[i],
                        style=self.store.codec.round_trip(out.style[i : i + 1])[0],
                        mask=np.packbits(mask),
                        mask_area=int(mask.sum()),
                    )
                )
        return vectors[0] if single else vectors

    def vectors(self, row: int) -> QueryVectors:
        """The stored vectors of ``row``."""
        if not _is_row(row):
            raise QueryError(f"row must be an integer, got {type(row).__name__}")
        row = int(row)
        if not 0 <= row < self.store.rows:
            raise QueryError(f"row {row} is out of range (the store has {self.store.rows} rows)")
        self._sync()
        if not self._index.live[row]:
            raise QueryError(f"row {row} ({self._image_ids[row]}) was deleted")
        return QueryVectors(
            feature=self._index.features[row],
            style=self.store.codec.decode(self._index.style.rows_stored(np.array([row])))[0],
            mask=self.store.mask_rows([row])[0],
            mask_area=int(self._index.mask_areas[row]),
            row=row,
        )

    def _sync(self) -> None:
        """Pick up deletions committed since the last search; fail if the store was compacted."""
        deleted = self.store.poll_deletions()
        if deleted is not None:
            self._index.set_deleted(deleted)

    # -- arguments -----------------------------------------------------------------------
    def _allowed(self, exclude: Iterable[int], where, hidden: frozenset[str]) -> np.ndarray:
        allowed = self._index.live.copy()
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
            raise QueryError(f"exclude must be a collection of rows, not {type(exclude).__name__}")
        if isinstance(exclude, np.ndarray) and exclude.dtype.kind in "iu":
            rows: list = exclude.reshape(-1).tolist()
        else:
            rows = list(exclude)
        if rows:
            if not all(_is_row(r) for r in rows):
                raise QueryError("exclude must hold stored row numbers (integers)")
            # range-checked as Python integers: beyond int64 is out of range, not OverflowError
            bad = [int(r) for r in rows if not 0 <= int(r) < self.store.rows]
            if bad:
                raise QueryError(
                    f"exclude: row {bad[0]} is out of range (the store has {self.store.rows} rows)"
                )
            allowed[np.asarray(rows, np.int64)] = False
        if where is not None:
            if not isinstance(where, (str, pc.Expression)):
                raise QueryError(
                    "where must be a pyarrow compute expression or a string, "
                    f"not {type(where).__name__}"
                )
            allowed &= self._where_mask(where, hidden)
        return allowed

    def _where_mask(self, where: "pc.Expression | str", hidden: frozenset[str]) -> np.ndarray:
        """The rows passing ``where`` (evaluated once per filter and kept: the metadata of a
        retriever's snapshot never change)."""
        try:
            text = where if isinstance(where, str) else where.__reduce__()[1][0].to_pybytes()
        except (AttributeError, IndexError, TypeError):  # pragma: no cover - pyarrow internals
            return rows_matching(self.metadata(), where, hidden=hidden)
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        # a digest, not the text: an ``isin`` over many values would be kept 32 times over
        key = (isinstance(where, str), hashlib.sha256(data).digest(), hidden)
        with self._where_lock:
            mask = self._where_cache.get(key)
            if mask is not None and len(mask) == self.store.rows:
                self._where_cache.move_to_end(key)
                return mask
        mask = rows_matching(self.metadata(), where, hidden=hidden)
        mask.flags.writeable = False
        with self._where_lock:
            self._where_cache[key] = mask
            while len(self._where_cache) > _WHERE_CACHE:
                self._where_cache.popitem(last=False)
        return mask

    def _check_columns(self, columns: Sequence[str], hidden: frozenset[str]) -> tuple[str, ...]:
        if isinstance(columns, str):
            columns = (columns,)
        columns = tuple(columns)
        if columns:
            private = [c for c in columns if c in hidden]
            if private:
                raise QueryError(f"column {private[0]!r} is not served (images are served by row)")
            known = set(self.metadata_columns) - hidden
            missing = [c for c in columns if c not in known]
            if missing:
                raise QueryError(
                    f"unknown metadata column {missing[0]!r}; the store has "
                    f"{', '.join(sorted(known))}"
                )
        return columns

    @staticmethod
    def _check_k(k: Any) -> int:
        if not _is_row(k) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        return int(k)

    # -- the search call -----------------------------------------------------------------
    @overload
    def search(
        self,
        query: list[Query] | tuple[Query, ...],
        *,
        measures: str | Sequence[str] = ...,
        k: int = ...,
        exclude: Iterable[int] = ...,
        where: pc.Expression | str | None = ...,
        columns: Sequence[str] = ...,
        exclude_self: bool = ...,
        explain: bool = ...,
        group_by: str | None = ...,
        hidden_columns: Collection[str] = ...,
    ) -> list[SearchResult]: ...

    @overload
    def search(
        self,
        query: Query,
        *,
        measures: str | Sequence[str] = ...,
        k: int = ...,
        exclude: Iterable[int] = ...,
        where: pc.Expression | str | None = ...,
        columns: Sequence[str] = ...,
        exclude_self: bool = ...,
        explain: bool = ...,
        group_by: str | None = ...,
        hidden_columns: Collection[str] = ...,
    ) -> SearchResult: ...

    def search(
        self,
        query: Query | Sequence[Query],
        *,
        measures: str | Sequence[str] = "style",
        k: int = 5,
        exclude: Iterable[int] = (),
        where: "pc.Expression | str | None" = None,
        columns: Sequence[str] = (),
        exclude_self: bool = True,
        explain: bool = False,
        group_by: str | None = None,
        hidden_columns: Collection[str] = (),
    ) -> SearchResult | list[SearchResult]:
        """The ``k`` stored images most similar to ``query``, under each measure.

        Parameters
        ----------
        query : path, PIL.Image.Image, np.ndarray, int, QueryVectors, LesionQuery, or a list
            An image file, a PIL image, an ``H x W (x 3)`` uint8 array, a stored row, already
            computed vectors, or a :class:`LesionQuery` (several images of one lesion: each
            measure's score is the mean over its images). A list (or tuple) is a batch: images
            are embedded together and every style or mask row read from disk serves all
            queries.
        measures : str or sequence of str
            One of :data:`~dermris.retriever.MEASURES`, several, or ``"all"``.
        k : int
            Hits per measure (fewer if fewer rows qualify).
        exclude : collection of int
            Rows never returned (e.g. the query's patient in leave-one-out evaluation).
        where : pyarrow.compute.Expression or str, optional
            Only rows whose metadata pass the filter are returned, e.g.
            ``pc.field("diagnosis") == "melanoma"`` or ``"diagnosis == 'melanoma'"``.
            ``ED_max`` and ``LS_max`` stay maxima over the whole store.
        columns : sequence of str
            Metadata columns to put on every hit (``Hit.metadata``).
        exclude_self : bool
            A stored row used as the query is not returned (default).
        explain : bool
            Attach an :class:`~dermris.retriever.explain.Explanation` to every result
            (``result.explanation``): each hit's style loss split by block stage and its lesion
            mask, from the rows the search itself read (not for lesion queries).
        group_by : str, optional
            A metadata column (e.g. ``"lesion_id"``): return the exact ``k`` best groups of rows
            sharing a value, each as its best row under the measure (ties by row), the group's
            other allowed rows in ``Hit.members`` and its value in ``Hit.group``. A row whose
            value is null is a group of its own.
        hidden_columns : collection of str
            Metadata columns this caller may neither filter on nor return (the server passes
            ``{"path"}``): naming one in ``where``, ``columns`` or ``group_by`` is a
            :class:`QueryError`.

        Returns
        -------
        SearchResult or list of SearchResult
            ``{measure: [Hit, ...]}`` with ``.stats``; a list for a list of queries.
        """
        started = time.perf_counter()
        measures = check_measures(measures)
        k = self._check_k(k)
        hidden = frozenset(hidden_columns)
        columns = self._check_columns(columns, hidden)
        if group_by is not None and group_by in hidden:
            raise QueryError(f"group_by: column {group_by!r} is not available here")
        grouping = self.grouping(group_by) if group_by is not None else None
        batch = isinstance(query, (list, tuple))
        queries = list(query) if batch else [query]
        if explain and any(isinstance(q, LesionQuery) for q in queries):
            raise QueryError("explain is not available for lesion queries")
        self._sync()
        allowed = self._allowed(exclude, where, hidden)
        vectors, labels, spans = self._prepare(queries)
        results = self._rank(
            vectors, labels, spans, measures, k, allowed, columns, exclude_self, explain, grouping
        )
        self._sync()  # a compaction during the search would have renumbered rows: fail loudly
        seconds = time.perf_counter() - started
        for result in results:
            result.stats.seconds = seconds
        return results if batch else results[0]

    def _prepare(
        self, queries: list
    ) -> tuple[list[QueryVectors], list[str], list[tuple[int, int]]]:
        """Vectors of every image of every query (a lesion query's images in a row), a label
        per query, and each query's span of vectors."""
        flat: list[Any] = []
        spans: list[tuple[int, int]] = []
        for q in queries:
            items = list(q.images) if isinstance(q, LesionQuery) else [q]
            spans.append((len(flat), len(flat) + len(items)))
            flat.extend(items)
        vectors: list[QueryVectors | None] = [None] * len(flat)
        names = [""] * len(flat)
        images, positions = [], []
        for i, q in enumerate(flat):
            if isinstance(q, QueryVectors):
                vectors[i], names[i] = q, f"row {q.row}" if q.row is not None else "vectors"
            elif _is_row(q):
                vectors[i], names[i] = self.vectors(q), f"row {int(q)}"
            else:
                images.append(q)
                positions.append(i)
                names[i] = (
                    str(q) if isinstance(q, (str, os.PathLike)) else f"{type(q).__name__} image"
                )
        if images:
            for i, v in zip(positions, self.embed(images)):
                vectors[i] = v
        labels = [
            names[a] if not isinstance(q, LesionQuery) else "lesion: " + ", ".join(names[a:b])
            for q, (a, b) in zip(queries, spans)
        ]
        return cast("list[QueryVectors]", vectors), labels, spans

    def _rank(
        self,
        vectors: list[QueryVectors],
        labels: list[str],
        spans: list[tuple[int, int]],
        measures: tuple[str, ...],
        k: int,
        allowed: np.ndarray,
        columns: tuple[str, ...],
        exclude_self: bool,
        explain: bool,
        grouping: Grouping | None = None,
    ) -> list[SearchResult]:
        batch = QueryBatch(self._index, vectors, explain=explain)
        table = self.metadata().select(list(columns)) if columns else None
        results = []
        for (a, b), label in zip(spans, labels):
            states = batch.queries[a:b]
            own = [q.row for q in vectors[a:b] if q.row is not None and 0 <= q.row < len(allowed)]
            mask = allowed
            if exclude_self and own:
                mask = allowed.copy()
                mask[own] = False
            per_measure = {}
            hit_rows = []
            # the components of the measures asked for (all four for all nine): a cheap measure
            # alone pays for nothing else
            names = tuple(
                c for c in COMPONENTS if any(c in MEASURE_COMPONENTS[m] for m in measures)
            )
            ranked = {
                measure: batch.top_k(states, measure, k, mask, grouping=grouping)
                for measure in measures
            }
            # every hit's components, computed together (one parallel pass over their rows)
            every = np.unique(np.concatenate([rows for rows, _ in ranked.values()]))
            every_comps = batch.hit_components(states, every, names)
            for measure, (rows, scores) in ranked.items():
                hit_rows.append(rows)
                where = np.searchsorted(every, rows)
                comps = {c: v[where] for c, v in every_comps.items()}
                meta = (
                    table.take(pa.array(rows, pa.int64())).to_pylist()
                    if table is not None
                    else [{}] * len(rows)
                )
                per_measure[measure] = [
                    Hit(
                        row=int(r),
                        image_id=self._image_ids[r],
                        path=self._paths[r],
                        score=float(sc),
                        components={c: float(comps[c][i]) for c in names},
                        metadata=meta[i],
                        **(
                            {
                                "group": grouping.value(r),
                                "members": tuple(int(m) for m in grouping.members(r, mask)),
                            }
                            if grouping is not None
                            else {}
                        ),
                    )
                    for i, (r, sc) in enumerate(zip(rows, scores))
                ]
            why = batch.explanation(states[0], np.concatenate(hit_rows)) if explain else None
            lesion = b - a > 1
            row = vectors[a].row if not lesion else None
            results.append(
                SearchResult(
                    per_measure,
                    stats=SearchStats.combined(s.stats for s in states)
                    if lesion
                    else states[0].stats,
                    query=label,
                    row=row,
                    explanation=why,
                    group_by=grouping.column if grouping is not None else None,
                    rows=tuple(int(r) for r in own) if lesion else (),
                )
            )
        return results
