"""The feature measures' certificates: stores on which float32 rounding reorders any float32 answer.

The feature measures are ranked from one float32 pass (``||x||^2 + ||q||^2 - 2 q.x``, as FAISS's
flat indexes compute it). On features with a huge common offset that arithmetic cancels
catastrophically: the distances (about 0.05) are far below the float32 resolution of the terms
(about 64), so the float32 order is noise. Rows whose distances are equal to a few float32 ulps
scramble it too. Only the certificate (every row not scored exactly is provably worse than the
k-th, by the worst-case rounding margin of a length-F float32 dot product) keeps the answers
exact; without it, or with a zero margin, the nearest rows and ``ED_max`` come from noise.

The main assertions are at the Retriever level, against the independent brute force of
``tests/reference.py``: they hold whatever computes the feature measures. The offset features
lie on a grid of 2**-9, so their float64 distances, dot products and norms are exact sums and
the reference and the retriever agree bit for bit (exact ties are true ties, broken by row).
"""

from __future__ import annotations

import numpy as np
import pytest

from dermris.retriever import QueryVectors, Retriever

from array_store import write_store
from reference import brute_force, load_store, row_query

FEATURE_MEASURES = ("euclidean", "cosine", "i1_ed", "i1_cd")
OFFSET = 8192.0


def _offset_features(n: int, dim: int, seed: int) -> np.ndarray:
    """``OFFSET`` plus small multiples of 2**-9: float32-exact, float64 arithmetic exact."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(-6, 7, size=(n, dim)).astype(np.float64)
    return (OFFSET + steps * 2.0**-9).astype(np.float32)


def _sphere_features(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A centre of norm ~200 and ``n`` rows at distance 1 from it. Stored in float32 their
    distances to the centre spread by ~1e-5, while FAISS's terms (~5e4) have a float32
    resolution of ~4e-3: FAISS's order among the rows is arbitrary, nearest and farthest."""
    rng = np.random.default_rng(seed)
    centre = (rng.normal(size=dim) * 50).astype(np.float32)
    u = rng.normal(size=(n, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return (centre.astype(np.float64) + u).astype(np.float32), centre


def _store(path, features: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    n = len(features)
    return write_store(
        path,
        features=features,
        style=rng.normal(size=(n, 9)),
        masks=rng.random((n, 32, 32)) < 0.3,
        channels=(2, 3),
    )


def _assert_same(hits, expected):
    assert [h.row for h in hits] == [r for r, _ in expected]
    np.testing.assert_allclose(
        [h.score for h in hits], [s for _, s in expected], rtol=1e-9, atol=1e-12
    )


def _exact_nearest(features, q, k, allowed, by):
    """Float64 brute force: the ``k`` best allowed rows, ties by row."""
    f = features.astype(np.float64)
    q = np.asarray(q, np.float32).astype(np.float64)
    rows = np.arange(len(f)) if allowed is None else np.flatnonzero(allowed)
    if by == "euclidean":
        values = np.sqrt(((f[rows] - q) ** 2).sum(axis=1))
        order = np.lexsort((rows, values))
    else:
        values = f[rows] @ q / (np.linalg.norm(f[rows], axis=1) * np.linalg.norm(q))
        order = np.lexsort((rows, -values))
    return rows[order[:k]], values[order[:k]]


@pytest.mark.parametrize("seed", [0, 1])
def test_retriever_exact_on_catastrophically_cancelling_features(tmp_path, seed):
    """Guards against the FAISS certificate margins (``err``) set to 0, ``nearest()`` accepting
    its first round uncertified and ``max_distance()`` accepting its first 16 candidates
    uncertified: on features with a huge common offset FAISS's float32 order is noise, so each
    of them returns wrong nearest rows or a wrong ``ED_max`` (every ES score off)."""
    path = _store(tmp_path / "offset", _offset_features(160, 8, seed), seed)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu")
    for row in range(0, 160, 16):
        for k in (1, 5):
            expected = brute_force(data, *row_query(data, row), exclude_row=row, k=k)
            got = retriever.search(row, measures=FEATURE_MEASURES, k=k)
            for name in FEATURE_MEASURES:
                _assert_same(got[name], expected[name])
            for name in FEATURE_MEASURES:  # alone: no other measure's work makes rows exact
                _assert_same(retriever.search(row, measures=name, k=k)[name], expected[name])


def test_retriever_exact_on_near_equal_distances(tmp_path):
    """Guards against the same three certificate bugs through rows whose distances to a free
    query are equal to ~1e-5, far below FAISS's float32 resolution there (a sphere around the
    query): FAISS's order among them, nearest and farthest, is arbitrary."""
    features, centre = _sphere_features(150, 16, seed=3)
    path = _store(tmp_path / "sphere", features, 3)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu")
    rng = np.random.default_rng(5)
    style = retriever.store.codec.round_trip(rng.normal(size=(1, 9)).astype(np.float32))[0]
    mask = rng.random(32 * 32) < 0.3
    for feature in (centre, centre + np.float32(1e-3)):
        query = QueryVectors(
            feature=feature, style=style, mask=np.packbits(mask), mask_area=int(mask.sum())
        )
        expected = brute_force(data, feature, style, mask, k=7)
        got = retriever.search(query, measures=FEATURE_MEASURES, k=7)
        for name in FEATURE_MEASURES:
            _assert_same(got[name], expected[name])


def test_retriever_exact_on_cancelling_features_with_filter(tmp_path):
    """The certificate bugs with a filter (FAISS searches a subset, ``ED_max`` stays over the
    whole store): the first round's candidates are then even fewer of the allowed rows."""
    features = _offset_features(120, 8, seed=7)
    rng = np.random.default_rng(7)
    group = rng.choice(["a", "b", "c"], size=120).tolist()
    path = write_store(
        tmp_path / "filtered",
        features=features,
        style=rng.normal(size=(120, 9)),
        masks=rng.random((120, 32, 32)) < 0.3,
        extra_columns={"group": group},
    )
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu")
    allowed = {r for r, g in enumerate(group) if g != "a"}
    for row in range(0, 120, 20):
        expected = brute_force(data, *row_query(data, row), exclude_row=row, k=3, allowed=allowed)
        got = retriever.search(row, measures=FEATURE_MEASURES, k=3, where="group != 'a'")
        for name in FEATURE_MEASURES:
            _assert_same(got[name], expected[name])


def _bounds_contain_exact(features: np.ndarray, queries: np.ndarray) -> None:
    """The float32 pass's bounds contain every row's exact float64 distance and cosine."""
    from dermris.retriever.store_index import cosine_of, distance_and_dot

    index = type("Index", (), {})()  # only the arrays feature_bounds reads
    index.features = features
    wide = features.astype(np.float64)
    index.feature_sq = np.sum(wide * wide, axis=1)
    from dermris.retriever.store_index import StoreIndex

    ed_lo, ed_hi, cos_lo, cos_hi = StoreIndex.feature_bounds(index, queries)
    for i, q in enumerate(np.asarray(queries, np.float32).astype(np.float64)):
        ed, dots = distance_and_dot(wide, q)
        cos = np.clip(cosine_of(dots, np.sqrt(index.feature_sq), q), -1, 1)  # as scores clip it
        assert (ed_lo[i] <= ed).all() and (ed <= ed_hi[i]).all()
        assert (cos_lo[i] <= cos).all() and (cos <= cos_hi[i]).all()


def test_feature_bounds_contain_exact_values_on_cancelling_features():
    """The float32 feature pass's bounds (the feature measures' certificate: every row not
    scored exactly is provably beyond the k-th) contain the exact float64 values where float32's
    own arithmetic is noise: they fail without the rounding margin."""
    features = _offset_features(200, 8, seed=11)
    _bounds_contain_exact(features, features[::20])


def test_feature_bounds_contain_exact_values_on_near_equal_distances():
    """Rows at distances equal far below float32's resolution: the bounds still hold."""
    features, centre = _sphere_features(300, 16, seed=17)
    _bounds_contain_exact(features, np.stack([centre, centre + np.float32(1e-3), features[0]]))
