"""The retriever's nine measures equal an independent brute force over the whole store."""

from __future__ import annotations

import numpy as np
import pytest

from reference import NAMES, brute_force, load_store, row_query
from retriever import MEASURES, QueryVectors, Retriever


def assert_same(hits, expected, *, rtol=1e-9):
    assert [h.row for h in hits] == [r for r, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=rtol, atol=1e-12)


def test_measure_order_matches_paper_table():
    assert MEASURES == NAMES


CASES = [
    dict(n=1, seed=1),
    dict(n=2, seed=2),
    dict(n=17, seed=3, duplicate_rows=5),
    dict(n=25, seed=4, empty_masks=6),
    dict(n=12, seed=5, identical=True),
    dict(n=30, seed=6, duplicate_rows=8, empty_masks=10, mask_density=0.05),
    dict(n=40, seed=7, commit_sizes=[7, 1, 20, 12]),
    dict(n=9, seed=8, empty_masks=9),
    dict(n=20, seed=9, mask_density=0.0015),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("k", [1, 5, 100])
def test_search_row_equals_brute_force(random_store, case, k):
    path = random_store(**case)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu")
    rows = sorted({0, data["n"] // 2, data["n"] - 1})
    for row in rows:
        for exclude in (True, False):
            expected = brute_force(data, *row_query(data, row), exclude_row=row if exclude else None, k=k)
            got = retriever.search_row_all(row, k=k, exclude_self=exclude)
            for name in NAMES:
                assert_same(got[name], expected[name])
                single = retriever.search_row(row, measure=name, k=k, exclude_self=exclude)
                assert [h.row for h in single] == [h.row for h in got[name]]
            assert len(got["style"]) == min(k, data["n"] - (1 if exclude else 0))


@pytest.mark.parametrize("seed", range(6))
def test_free_query_equals_brute_force(random_store, seed):
    """Queries that are not stored rows (as image queries are), with ties and empty masks."""
    path = random_store(n=23, seed=100 + seed, duplicate_rows=4, empty_masks=5)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu")
    rng = np.random.default_rng(seed)
    feature = rng.normal(size=data["features"].shape[1]).astype(np.float32)
    style_raw = (rng.normal(size=data["style"].shape[1]) * data["style"].std(axis=0)).astype(np.float32)
    style = retriever.store.codec.round_trip(style_raw[None])[0]
    mask = rng.random(32 * 32) < (0.3 if seed % 3 else 0.0)
    q = QueryVectors(feature=feature, style=style, mask=np.packbits(mask), mask_area=int(mask.sum()))
    expected = brute_force(data, feature, style, mask, k=7)
    got = retriever.search_vectors(q, k=7)
    for name in NAMES:
        assert_same(got[name], expected[name], rtol=1e-7)
        for hit in got[name]:
            for comp, value in hit.components.items():
                assert value == pytest.approx(expected["_components"][comp][hit.row], rel=1e-7, abs=1e-12)


def test_zero_maxima_give_score_one(random_store):
    path = random_store(n=6, seed=11, identical=True)
    retriever = Retriever.open(path, device="cpu")
    hits = retriever.search_row_all(2, k=6, exclude_self=False)
    for name in ("euclidean", "style", "i1_se"):
        assert [h.row for h in hits[name]] == list(range(6))  # all tied: row order
        assert all(h.score == 1.0 for h in hits[name])


def test_single_row_store(random_store):
    path = random_store(n=1, seed=12)
    retriever = Retriever.open(path, device="cpu")
    assert retriever.search_row(0, measure="style", k=5) == []
    hits = retriever.search_row(0, measure="i1_sd", k=5, exclude_self=False)
    assert [h.row for h in hits] == [0] and hits[0].score == 1.0
