"""The pure formulas: edge cases fixed by DESIGN.md."""

from __future__ import annotations

import numpy as np
import pytest

from dermris.retriever import (
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
from dermris.retriever.measures import check_measure


def test_nine_measures_and_their_components():
    assert len(MEASURES) == 9
    assert MEASURE_COMPONENTS["i1_ecd"] == ("es", "cs", "dc")
    assert set(MEASURE_COMPONENTS) == set(MEASURES)


def test_normalised_score_and_zero_maximum():
    np.testing.assert_allclose(normalised_score(np.array([0.0, 1.0, 4.0]), 4.0), [1.0, 0.75, 0.0])
    np.testing.assert_array_equal(normalised_score(np.zeros(3), 0.0), np.ones(3))


def test_cosine_score_is_eq4():
    np.testing.assert_allclose(
        cosine_score(np.array([-1.0, 0.0, 1.0, 1.0 + 1e-12])), [0.0, 0.5, 1.0, 1.0]
    )


def test_dice_edge_cases():
    # both empty -> 1, exactly one empty -> 0, otherwise 2|X&Y| / (|X|+|Y|)
    np.testing.assert_allclose(
        dice_score(np.array([0, 0, 0, 3]), np.array([0, 5, 0, 4]), np.array([0, 0, 5, 6])),
        [1.0, 0.0, 0.0, 0.6],
    )


def test_harmonic_mean_and_zero_component():
    np.testing.assert_allclose(
        harmonic_mean(np.array([0.5, 1.0, 0.0]), np.array([0.25, 1.0, 0.9])),
        [2 / (2 + 4), 1.0, 0.0],
    )
    assert harmonic_mean(np.array([0.3]), np.array([0.6]), np.array([0.9]))[0] == pytest.approx(
        3 / (1 / 0.3 + 1 / 0.6 + 1 / 0.9)
    )


def test_measure_score_uses_the_named_components():
    comps = {
        "es": np.array([0.2]),
        "cs": np.array([0.4]),
        "ss": np.array([0.8]),
        "dc": np.array([1.0]),
    }
    assert measure_score("style", comps)[0] == 0.8
    assert measure_score("i1_sd", comps)[0] == pytest.approx(2 / (1 / 0.8 + 1))
    assert measure_score("i1_ecd", comps)[0] == pytest.approx(3 / (5 + 2.5 + 1))


def test_unknown_measure_is_a_clear_value_error():
    with pytest.raises(UnknownMeasureError, match="unknown measure 'syle'"):
        check_measure("syle")
    with pytest.raises(ValueError):
        check_measure("Style")


def test_rank_breaks_ties_by_row_and_handles_k():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert rank(scores, 3).tolist() == [1, 3, 0]
    assert rank(scores, 4).tolist() == [1, 3, 0, 2]
    assert rank(scores, 100).tolist() == [1, 3, 0, 2, 5, 4]
    assert rank(scores, 0).tolist() == []
    rows = np.array([10, 8, 6, 4, 2, 0])  # candidates named by row numbers
    assert rows[rank(scores, 3, rows=rows)].tolist() == [4, 8, 0]


def test_rank_matches_full_sort_on_random_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 4, size=rng.integers(1, 40)).astype(float)
        k = int(rng.integers(1, 45))
        expected = sorted(range(len(scores)), key=lambda r: (-scores[r], r))[:k]
        assert rank(scores, k).tolist() == expected
