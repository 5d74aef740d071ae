"""The nine similarity measures of the paper, as pure functions on numpy arrays.

Scores are "higher = more similar" and lie in [0, 1]:

============  =================================================================
``es``        ``1 - ED / ED_max`` (eq. 2); ``ED_max`` over all committed rows
``cs``        ``(cos + 1) / 2`` (eq. 4); ``cos = 0`` when a vector is all zeros
``ss``        ``1 - LS / LS_max`` (eq. 7); ``LS_max`` over all committed rows
``dc``        ``2 |X & Y| / (|X| + |Y|)`` (eq. 8); both masks empty -> 1
============  =================================================================

A normaliser of 0 (every row at distance 0) makes that score 1 for every row. The I1 scores
are harmonic means ``n / sum(1 / s_i)`` of their components (eqs. 9-14), 0 when any component
is 0. Ranking: score descending, ties by row ascending.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dermris.core.errors import UnknownMeasureError

__all__ = [
    "MEASURES",
    "COMPONENTS",
    "DICE_MEASURES",
    "MEASURE_COMPONENTS",
    "UnknownMeasureError",
    "check_measure",
    "check_measures",
    "normalised_score",
    "cosine_score",
    "dice_score",
    "harmonic_mean",
    "measure_score",
    "rank",
]

MEASURES: tuple[str, ...] = (
    "euclidean",
    "cosine",
    "style",
    "i1_ed",
    "i1_cd",
    "i1_ecd",
    "i1_se",
    "i1_sc",
    "i1_sd",
)
"""The nine measures, in the order of the paper's Table 1."""

COMPONENTS: tuple[str, ...] = ("es", "cs", "ss", "dc")
"""Component scores: Euclidean, cosine, style, Dice."""

MEASURE_COMPONENTS: Mapping[str, tuple[str, ...]] = {
    "euclidean": ("es",),
    "cosine": ("cs",),
    "style": ("ss",),
    "i1_ed": ("es", "dc"),
    "i1_cd": ("cs", "dc"),
    "i1_ecd": ("es", "cs", "dc"),
    "i1_se": ("ss", "es"),
    "i1_sc": ("ss", "cs"),
    "i1_sd": ("ss", "dc"),
}
"""The components each measure combines."""

DICE_MEASURES: tuple[str, ...] = tuple(m for m in MEASURES if "dc" in MEASURE_COMPONENTS[m])
"""The measures with a Dice component (meaningless while the segmenter is untrained)."""


def check_measure(name: str) -> str:
    """Return ``name`` if it is a measure, else raise :class:`UnknownMeasureError`."""
    if not isinstance(name, str) or name not in MEASURE_COMPONENTS:
        raise UnknownMeasureError(
            f"unknown measure {name!r}; expected one of {', '.join(MEASURES)}"
        )
    return name


def check_measures(names) -> tuple[str, ...]:
    """Validate measure names: one name, ``"all"``, or a sequence of names (duplicates dropped)."""
    if isinstance(names, str):
        names = MEASURES if names == "all" else (names,)
    try:
        out = tuple(dict.fromkeys(check_measure(n) for n in names))
    except TypeError:
        raise UnknownMeasureError(
            f"measures must be a name or a sequence of names, not {names!r}"
        ) from None
    if not out:
        raise UnknownMeasureError("no measure given")
    return out


def normalised_score(distance: np.ndarray, maximum: float) -> np.ndarray:
    """``1 - distance / maximum``; all ones when ``maximum`` is 0."""
    distance = np.asarray(distance, np.float64)
    if not maximum > 0:
        return np.ones_like(distance)
    return 1.0 - distance / maximum


def cosine_score(cosine: np.ndarray) -> np.ndarray:
    """Map a cosine similarity in [-1, 1] to [0, 1] (paper eq. 4)."""
    return (np.clip(np.asarray(cosine, np.float64), -1.0, 1.0) + 1.0) / 2.0


def dice_score(intersection: np.ndarray, area_x: np.ndarray, area_y) -> np.ndarray:
    """Sørensen-Dice from pixel counts; 1 when both masks are empty."""
    intersection = np.asarray(intersection, np.float64)
    total = np.asarray(area_x, np.float64) + np.asarray(area_y, np.float64)
    out = np.ones(np.broadcast(intersection, total).shape, np.float64)
    nonempty = total > 0
    np.divide(2.0 * intersection, total, out=out, where=nonempty)
    return out


def harmonic_mean(*components: np.ndarray) -> np.ndarray:
    """``n / sum(1 / s_i)``, and 0 wherever any component is 0."""
    stack = np.stack([np.asarray(c, np.float64) for c in components])
    zero = np.any(stack <= 0.0, axis=0)
    safe = np.where(stack <= 0.0, 1.0, stack)
    out = len(components) / np.sum(1.0 / safe, axis=0)
    return np.where(zero, 0.0, out)


def measure_score(measure: str, components: Mapping[str, np.ndarray]) -> np.ndarray:
    """The score of ``measure`` from its component scores."""
    names = MEASURE_COMPONENTS[check_measure(measure)]
    if len(names) == 1:
        return np.asarray(components[names[0]], np.float64)
    return harmonic_mean(*(components[n] for n in names))


def rank(scores: np.ndarray, k: int, *, rows: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``k`` best scores: score descending, ties by row ascending.

    Parameters
    ----------
    scores : np.ndarray
        Scores of the candidate rows.
    k : int
        How many to return (fewer when there are fewer candidates).
    rows : np.ndarray, optional
        Row numbers of the candidates (default: their positions).

    Returns
    -------
    np.ndarray
        Indices into ``scores``.
    """
    scores = np.asarray(scores, np.float64)
    n = scores.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows)
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros(0, np.int64)
    if k < n:
        # Everything strictly better than the k-th best score, plus all ties with it.
        kth = np.partition(-scores, k - 1)[k - 1]
        keep = np.flatnonzero(-scores <= kth)
    else:
        keep = np.arange(n)
    order = np.lexsort((rows[keep], -scores[keep]))
    return keep[order[:k]]
