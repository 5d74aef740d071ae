"""dermris retriever: rank a store's images by the paper's nine similarity measures.

>>> from retriever import Retriever, MEASURES
>>> r = Retriever.open("STORE")                       # doctest: +SKIP
>>> hits = r.search("lesion.jpg", measure="style", k=5)  # doctest: +SKIP
"""

from .measures import (
    COMPONENTS,
    MEASURE_COMPONENTS,
    MEASURES,
    UnknownMeasureError,
    cosine_score,
    dice_score,
    harmonic_mean,
    measure_score,
    normalised_score,
    rank,
)
from .search import Hit, ModelUnavailableError, QueryError, QueryVectors, Retriever, SearchStats

__all__ = [
    "COMPONENTS",
    "MEASURES",
    "MEASURE_COMPONENTS",
    "Hit",
    "ModelUnavailableError",
    "QueryError",
    "QueryVectors",
    "Retriever",
    "SearchStats",
    "UnknownMeasureError",
    "cosine_score",
    "dice_score",
    "harmonic_mean",
    "measure_score",
    "normalised_score",
    "rank",
]
