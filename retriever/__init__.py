"""dermris retriever: rank a store's images by the paper's nine similarity measures.

>>> from dermris.retriever import Retriever, MEASURES
>>> r = Retriever.open("STORE")                                  # doctest: +SKIP
>>> res = r.search("lesion.jpg", measures=MEASURES, k=5)         # doctest: +SKIP
>>> res["style"][0].image_id, res.stats.style_rows_read          # doctest: +SKIP

Names are imported lazily; nothing here imports torch until an image query needs the model.
The errors of the whole package are re-exported here from :mod:`dermris.core.errors`. The
command line, the server, the judging page, evaluation, contact sheets and the demo are the
application layer on top, :mod:`dermris.app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dermris.core._lazy import lazy_exports
from dermris.core.errors import (
    ConfigError,
    DermrisError,
    EvaluationError,
    ImageDecodeError,
    JudgeError,
    MetadataError,
    ModelUnavailableError,
    QueryError,
    StoreChangedError,
    StoreError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreReadOnlyError,
    UnknownMeasureError,
    WeightsError,
)

from .measures import COMPONENTS, MEASURE_COMPONENTS, MEASURES

try:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    __version__ = _version("dermris")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

_EXPORTS = {
    "Retriever": ".search",
    "Hit": ".results",
    "SearchResult": ".results",
    "Explanation": ".explain",
    "StageLoss": ".explain",
    "QueryVectors": ".types",
    "LesionQuery": ".types",
    "Grouping": ".grouping",
    "CostModel": ".types",
    "SearchOptions": ".types",
    "SearchStats": ".types",
    "cosine_score": ".measures",
    "dice_score": ".measures",
    "harmonic_mean": ".measures",
    "measure_score": ".measures",
    "normalised_score": ".measures",
    "rank": ".measures",
    "parse_where": ".filters",
    "estimate_memory": ".store_index",
}

_ERRORS = [
    "ConfigError",
    "DermrisError",
    "EvaluationError",
    "ImageDecodeError",
    "JudgeError",
    "MetadataError",
    "ModelUnavailableError",
    "QueryError",
    "StoreChangedError",
    "StoreError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "UnknownMeasureError",
    "WeightsError",
]

__all__ = sorted(
    [*_EXPORTS, *_ERRORS, "COMPONENTS", "MEASURES", "MEASURE_COMPONENTS", "__version__"]
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .explain import Explanation, StageLoss
    from .filters import parse_where
    from .grouping import Grouping
    from .measures import (
        cosine_score,
        dice_score,
        harmonic_mean,
        measure_score,
        normalised_score,
        rank,
    )
    from .results import Hit, SearchResult
    from .search import Retriever
    from .store_index import estimate_memory
    from .types import CostModel, LesionQuery, QueryVectors, SearchOptions, SearchStats
