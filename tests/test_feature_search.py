"""FAISS in the query path: certified exact top-k and ED_max against a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest

from dermris.retriever.feature_search import FeatureSearch


def _exact(features, q, k, allowed, by):
    f = features.astype(np.float64)
    q = np.asarray(q, np.float64)
    rows = np.flatnonzero(allowed) if allowed is not None else np.arange(len(f))
    if by == "euclidean":
        d = np.sqrt(((f[rows] - q) ** 2).sum(1))
        order = np.lexsort((rows, d))
    else:
        denom = np.linalg.norm(f[rows], axis=1) * np.linalg.norm(q)
        d = np.where(denom > 0, f[rows] @ q / np.where(denom > 0, denom, 1), 0.0)
        order = np.lexsort((rows, -d))
    return rows[order[:k]], d[order[:k]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("by", ["euclidean", "cosine"])
def test_nearest_is_certified_exact(seed, by):
    rng = np.random.default_rng(seed)
    n, dim = 500, 64
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[rng.choice(n, 60)] = features[rng.choice(n, 60)]  # exact ties
    features[:20] = features[0] + rng.normal(size=(20, dim)).astype(np.float32) * 1e-4  # near-ties
    search = FeatureSearch(features)
    allowed = rng.random(n) < 0.6 if seed % 2 else None
    for q in (features[0], features[7] * 1.5, rng.normal(size=dim).astype(np.float32)):
        for k in (1, 5, 37):
            got = search.nearest(q, k, allowed, by=by)
            rows, values = _exact(features, q, k, allowed, by)
            assert got is not None
            np.testing.assert_array_equal(got[0], rows)
            np.testing.assert_allclose(got[1], values, rtol=1e-12)


def test_max_distance_is_exact_and_respects_deletions():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(800, 32)).astype(np.float32)
    features[5] *= 20  # a far outlier
    search = FeatureSearch(features)
    live = np.ones(800, bool)
    for q in (features[1], rng.normal(size=32).astype(np.float32)):
        exact = np.sqrt(((features.astype(np.float64) - q.astype(np.float64)) ** 2).sum(1))
        assert search.max_distance(q, live) == pytest.approx(exact.max(), rel=1e-12)
        live[5] = False
        assert search.max_distance(q, live) == pytest.approx(exact[live].max(), rel=1e-12)
        live[5] = True
    assert search.max_distance(features[0], np.zeros(800, bool)) == 0.0


def test_fewer_allowed_rows_than_k():
    features = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    allowed = np.zeros(30, bool)
    allowed[[3, 9]] = True
    rows, _ = FeatureSearch(features).nearest(features[0], 5, allowed)
    assert sorted(rows.tolist()) == [3, 9]
