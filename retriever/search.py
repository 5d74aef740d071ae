"""The :class:`Retriever`: query -> vectors -> bounds -> exact re-ranking of candidates.

Every measure is exact: scores equal brute force over all committed rows, with ``ED_max`` and
``LS_max`` taken over the whole store. Features live in memory; style rows and masks are read
from disk only for rows whose bounds leave them in contention (:mod:`retriever.bounds`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from indexer import Embedder, Store, decode_image, resolve_device, to_rgb
from indexer.errors import StoreFormatError
from models import file_sha256, load_model
from models.errors import DermrisError

from .bounds import QueryBatch, QueryVectors, SearchStats, StoreIndex
from .measures import COMPONENTS, MEASURES, check_measures

__all__ = ["Hit", "QueryVectors", "QueryError", "ModelUnavailableError", "Retriever", "SearchStats"]

class QueryError(DermrisError, ValueError):
    """A query that is not an image, an image path, an array image or a stored row."""


class ModelUnavailableError(DermrisError, RuntimeError):
    """The store carries no model, so image queries cannot be embedded."""


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
    components : dict of str to float
        All four component scores: ``es``, ``cs``, ``ss`` and ``dc``.
    """

    row: int
    image_id: str
    path: str
    score: float
    components: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"row": self.row, "image_id": self.image_id, "path": self.path,
                "score": self.score, "components": dict(self.components)}


class Retriever:
    """Ranks a store's images against a query by the nine measures.

    Use :meth:`open`. The retriever serves a snapshot of the committed rows taken when it was
    opened; :meth:`refresh` picks up later commits.

    Parameters
    ----------
    store : indexer.Store
        The opened store.
    device : str
        Where the model runs for image queries: ``auto``, ``cpu`` or ``cuda``.
    """

    def __init__(self, store: Store, *, device: str = "auto") -> None:
        self.store = store
        self.device = resolve_device(device)
        self._embedder: Embedder | None = None
        meta = store.metadata(columns=["image_id", "path"])
        self._image_ids: list[str] = meta.column("image_id").to_pylist()
        self._paths: list[str] = meta.column("path").to_pylist()
        self._index = StoreIndex(store, device=self.device)
        self.last_stats: SearchStats | None = None
        self._batch_stats: list[SearchStats] = []
        self._manifest_stamp: tuple[int, int] | None = None

    def _sync_deletions(self) -> None:
        """Pick up deletions committed since the last search (rows stay a snapshot)."""
        try:
            info = (self.store.root / "manifest.json").stat()
        except OSError:
            return
        stamp = (info.st_ino, info.st_mtime_ns)  # every commit renames a new file into place
        if stamp != self._manifest_stamp:
            self._manifest_stamp = stamp
            self._index.set_deleted(self.store.deleted_since())

    @classmethod
    def open(cls, path: str | os.PathLike, *, device: str = "auto") -> "Retriever":
        """Open the store at ``path`` (the model is loaded on the first image query)."""
        return cls(Store.open(path), device=device)

    def refresh(self) -> "Retriever":
        """Re-open the store to see rows committed since this retriever was opened."""
        fresh = Retriever(Store.open(self.store.root), device=str(self.device))
        fresh._embedder = self._embedder
        self.__dict__.update(fresh.__dict__)
        return self

    def __len__(self) -> int:
        return self.store.rows

    @property
    def image_ids(self) -> Sequence[str]:
        """Image id of every row."""
        return self._image_ids

    @property
    def paths(self) -> Sequence[str]:
        """Indexed file path of every row."""
        return self._paths

    # -- queries -----------------------------------------------------------------------
    def _model(self) -> Embedder:
        if self._embedder is None:
            model_file = self.store.model_file
            if model_file is None or not model_file.is_file():
                raise ModelUnavailableError(
                    f"{self.store.root} holds no model file, so image queries cannot be embedded; "
                    "query stored rows with search_row"
                )
            expected = self.store.manifest["model"].get("weights_sha256")
            if expected and file_sha256(model_file) != expected:
                raise StoreFormatError(f"{model_file} does not match the sha256 in the manifest")
            self._embedder = Embedder(load_model(model_file), device=self.device, batch_size=1)
        return self._embedder

    def _as_image(self, query) -> Image.Image:
        if isinstance(query, (str, os.PathLike)):
            path = Path(query)
            if not path.is_file():
                raise QueryError(f"query image not found: {path}")
            # decoded exactly as the indexer decodes files (same JPEG draft size)
            return decode_image(path, draft_size=2 * self.store.model_config.image_size)[0]
        if isinstance(query, Image.Image):
            return to_rgb(query)
        if isinstance(query, np.ndarray):
            if query.dtype != np.uint8:
                raise QueryError(f"array queries must be uint8, got {query.dtype}")
            if query.ndim == 2:
                return Image.fromarray(query).convert("RGB")
            if query.ndim == 3 and query.shape[2] in (3, 4) and min(query.shape[:2]) > 0:
                return Image.fromarray(np.ascontiguousarray(query[:, :, :3]), "RGB")
            raise QueryError(f"array queries must be HxW or HxWx3 uint8, got shape {query.shape}")
        if isinstance(query, (int, np.integer)):
            raise QueryError("to query with a stored row use search_row(row, ...)")
        raise QueryError(f"unsupported query type {type(query).__name__}")

    def embed(self, query) -> QueryVectors:
        """Turn an image (path, PIL image or uint8 array) into the store's representation."""
        image = self._as_image(query)
        out = self._model().embed([image])
        mask = out.masks[0].reshape(-1)
        return QueryVectors(
            feature=out.features[0],
            style=self.store.codec.round_trip(out.style[:1])[0],
            mask=np.packbits(mask),
            mask_area=int(mask.sum()),
        )

    def row_vectors(self, row: int) -> QueryVectors:
        """The stored vectors of ``row``."""
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
            raise QueryError(f"row must be an integer, got {type(row).__name__}")
        row = int(row)
        if not 0 <= row < self.store.rows:
            raise QueryError(f"row {row} is out of range (the store has {self.store.rows} rows)")
        self._sync_deletions()
        if not self._index.live[row]:
            raise QueryError(f"row {row} ({self._image_ids[row]}) was deleted")
        return QueryVectors(
            feature=self._index.features[row],
            style=self.store.style_rows([row])[0],
            mask=self.store.mask_rows([row])[0],
            mask_area=int(self._index.mask_areas[row]),
            row=row,
        )

    # -- scoring -----------------------------------------------------------------------
    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        return int(k)

    def _rank_batch(
        self, queries: Sequence[QueryVectors], measures: Sequence[str], k: int, exclude_rows: Sequence[int | None]
    ) -> list[dict[str, list[Hit]]]:
        k = self._check_k(k)
        self._sync_deletions()
        batch = QueryBatch(self._index, queries)
        results = []
        for state, exclude in zip(batch.queries, exclude_rows):
            per_measure = {}
            for measure in measures:
                rows, scores = batch.top_k(state, measure, k, exclude)
                comps = batch.hit_components(state, rows)
                per_measure[measure] = [
                    Hit(row=int(r), image_id=self._image_ids[r], path=self._paths[r], score=float(sc),
                        components={c: float(comps[c][i]) for c in COMPONENTS})
                    for i, (r, sc) in enumerate(zip(rows, scores))
                ]
            results.append(per_measure)
        self.last_stats = batch.queries[-1].stats if batch.queries else None
        self._batch_stats = [q.stats for q in batch.queries]
        return results

    def _rank(self, q: QueryVectors, measures: Sequence[str], k: int, exclude_row: int | None) -> dict[str, list[Hit]]:
        return self._rank_batch([q], measures, k, [exclude_row])[0]

    # -- public search -----------------------------------------------------------------
    def search(self, query, measure: str = "style", k: int = 5) -> list[Hit]:
        """The ``k`` stored images most similar to an image under ``measure``.

        Parameters
        ----------
        query : str, os.PathLike, PIL.Image.Image or np.ndarray
            An image file, a PIL image, or an ``H x W x 3`` uint8 array.
        measure : str
            One of :data:`retriever.MEASURES`.
        k : int
            Number of hits (fewer if the store is smaller).
        """
        (measure,) = check_measures(measure)
        return self._rank(self.embed(query), (measure,), k, None)[measure]

    def search_row(self, row: int, measure: str = "style", k: int = 5, *, exclude_self: bool = True) -> list[Hit]:
        """Like :meth:`search`, with a stored row as the query (``exclude_self`` drops it)."""
        (measure,) = check_measures(measure)
        q = self.row_vectors(row)
        return self._rank(q, (measure,), k, q.row if exclude_self else None)[measure]

    def search_all(self, query, k: int = 5, *, measures: Sequence[str] = MEASURES) -> dict[str, list[Hit]]:
        """``{measure: hits}`` for every measure, embedding the query once."""
        return self._rank(self.embed(query), check_measures(measures), k, None)

    def search_row_all(
        self, row: int, k: int = 5, *, measures: Sequence[str] = MEASURES, exclude_self: bool = True
    ) -> dict[str, list[Hit]]:
        """:meth:`search_all` with a stored row as the query."""
        q = self.row_vectors(row)
        return self._rank(q, check_measures(measures), k, q.row if exclude_self else None)

    def search_vectors(
        self, vectors: QueryVectors, k: int = 5, *, measures: Sequence[str] = MEASURES,
        exclude_row: int | None = None,
    ) -> dict[str, list[Hit]]:
        """Rank by already computed query vectors (see :meth:`embed`, :meth:`row_vectors`)."""
        return self._rank(vectors, check_measures(measures), k, exclude_row)

    def search_batch(
        self, queries: Sequence, k: int = 5, *, measures: Sequence[str] = MEASURES
    ) -> list[dict[str, list[Hit]]]:
        """:meth:`search_all` for many queries at once; every row read from disk serves them all.

        Parameters
        ----------
        queries : sequence
            Images (path, PIL image, uint8 array) or stored rows (``int``; excluded from their
            own results).
        """
        measures = check_measures(measures)
        vectors, excludes = [], []
        for query in queries:
            if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
                vectors.append(self.row_vectors(query))
                excludes.append(int(query))
            else:
                vectors.append(self.embed(query))
                excludes.append(None)
        return self._rank_batch(vectors, measures, k, excludes)

    @property
    def batch_stats(self) -> list[SearchStats]:
        """Per-query statistics of the last search call (one entry per query)."""
        return list(self._batch_stats)
