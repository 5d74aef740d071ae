"""Grouped search (one hit per lesion) and lesion queries (several images, one query), exact
against the independent brute force of ``reference.py`` (:func:`reference.grouped`,
:func:`reference.mean_scores`): ties, null groups, a group larger than k, filters and
exclusions combined with grouping, lesion queries of rows and of rows mixed with vectors, a
single-row store, on every access path (bounds, scans, rows read from disk)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_random_store

from dermris.core.errors import QueryError
from dermris.retriever import (
    CostModel,
    Grouping,
    LesionQuery,
    QueryVectors,
    Retriever,
    SearchOptions,
)

from array_store import write_store
from reference import NAMES, all_scores, grouped, load_store, mean_scores, ranked, row_query

PATHS = {
    "default": {},
    "scan": {"cost_model": CostModel.always_scan(), "exact_dice_bytes": 0},
    "bounds": {
        "cost_model": CostModel.never_scan(),
        "mask_memory_bytes": 0,
        "memory_budget_bytes": 0,
        "exact_dice_bytes": 0,
    },
}


def _lesion_ids(n: int, seed: int) -> list:
    """Group sizes 1..12 (one group of 12: larger than every k used), every 7th row null."""
    rng = np.random.default_rng(seed)
    ids: list = []
    sizes = [12, 1, 5, 2, 3, 7, 1, 4]
    while len(ids) < n:
        size = sizes[len(ids) % len(sizes)]
        ids += [f"IL_{len(ids):04d}"] * size
    ids = ids[:n]
    order = rng.permutation(n)  # groups scattered over the rows
    ids = [ids[i] for i in order]
    return [None if r % 7 == 3 else v for r, v in enumerate(ids)]


@pytest.fixture(scope="module")
def lesion_store(tmp_path_factory):
    n = 48
    lesions = _lesion_ids(n, seed=5)
    sites = ["back" if r % 3 else "face" for r in range(n)]
    path = make_random_store(
        tmp_path_factory.mktemp("grouping") / "store",
        n=n,
        seed=23,
        clusters=3,
        duplicate_rows=6,  # exact ties
        empty_masks=3,
        extra_columns={"lesion_id": lesions, "site": sites},
    )
    return path, load_store(path), lesions, sites


def _check_grouped(result, expected):
    for name in NAMES:
        hits = result[name]
        assert [h.row for h in hits] == [t[0] for t in expected[name]], name
        np.testing.assert_allclose(
            [h.score for h in hits], [t[1] for t in expected[name]], rtol=1e-9, atol=1e-12
        )
        assert [h.group for h in hits] == [t[2] for t in expected[name]], name
        assert [list(h.members) for h in hits] == [t[3] for t in expected[name]], name


def _check_ranked(result, expected):
    for name in NAMES:
        assert [h.row for h in result[name]] == [r for r, _ in expected[name]], name
        np.testing.assert_allclose(
            [h.score for h in result[name]], [s for _, s in expected[name]], rtol=1e-9, atol=1e-12
        )


def test_grouping_from_column_nulls_are_their_own_groups():
    g = Grouping.from_column(pa.chunked_array([["a", None, "b"], ["a", None]]), name="lesion_id")
    assert g.n_groups == 4
    assert g.ids[0] == g.ids[3] and len({g.ids[0], g.ids[1], g.ids[2], g.ids[4]}) == 4
    assert g.value(3) == "a" and g.value(1) is None and g.value(4) is None
    assert list(g.members(0)) == [3] and list(g.members(1)) == []
    assert list(g.rows(int(g.ids[0]))) == [0, 3]
    ints = Grouping.from_column(pa.array([7, 7, None, 8]))
    assert ints.value(1) == 7 and list(ints.members(0)) == [1]


@pytest.mark.parametrize("path_name", PATHS)
def test_grouped_search_is_exact(lesion_store, path_name):
    """Guards against a grouped search stopping at k rows instead of k groups, ranking a group
    by a row other than its best, merging null rows into one group, or listing members
    wrongly: every measure, k = 1, 3, 6, several queries, against the grouped brute force."""
    path, data, lesions, _ = lesion_store
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    for query in (0, 11, 30):
        scores = all_scores(data, *row_query(data, query))
        rows = [r for r in range(data["n"]) if r != query]
        for k in (1, 3, 6):
            got = retriever.search(query, measures="all", k=k, group_by="lesion_id")
            _check_grouped(got, grouped(scores, rows, lesions, k))
            assert got.group_by == "lesion_id"


def test_grouped_hits_are_distinct_groups_and_differ_from_rows(lesion_store):
    """The premise: the ungrouped top k holds several rows of one lesion (so a row-level top k
    is not a group-level one), and the grouped hits are k distinct groups."""
    path, data, lesions, _ = lesion_store
    retriever = Retriever.open(path, device="cpu")
    differs = 0
    for query in range(0, 48, 4):
        plain = retriever.search(query, measures="style", k=6)["style"]
        hits = retriever.search(query, measures="style", k=6, group_by="lesion_id")["style"]
        keys = [h.group if h.group is not None else ("row", h.row) for h in hits]
        assert len(set(keys)) == len(hits) == 6
        differs += [h.row for h in plain] != [h.row for h in hits]
    assert differs > 0


@pytest.mark.parametrize("path_name", ["default", "bounds"])
def test_grouping_with_filters_and_exclusions(lesion_store, path_name):
    """``where`` and ``exclude`` apply first: groups are formed from the rows that may be
    returned (members too), normalisers stay over the whole store."""
    path, data, lesions, sites = lesion_store
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    query = 2
    scores = all_scores(data, *row_query(data, query))
    excluded = (5, 6, 17)
    rows = [r for r in range(data["n"]) if r != query and r not in excluded and sites[r] == "back"]
    for k in (2, 5):
        got = retriever.search(
            query,
            measures="all",
            k=k,
            where="site == 'back'",
            exclude=excluded,
            group_by="lesion_id",
        )
        _check_grouped(got, grouped(scores, rows, lesions, k))


def test_grouped_k_beyond_the_groups(lesion_store):
    """k larger than the number of groups: every group once."""
    path, data, lesions, _ = lesion_store
    retriever = Retriever.open(path, device="cpu")
    scores = all_scores(data, *row_query(data, 1))
    rows = [r for r in range(data["n"]) if r != 1]
    got = retriever.search(1, measures="all", k=100, group_by="lesion_id")
    expected = grouped(scores, rows, lesions, 100)
    _check_grouped(got, expected)
    assert sum(1 + len(h.members) for h in got["style"]) == len(rows)


def _tie_groups_store(path, lesions):
    """The tie store of test_threshold_exactness, with a ``lesion_id`` column."""
    from test_threshold_exactness import FAR, N, _tie_masks

    rng = np.random.default_rng(0)
    features = np.repeat(rng.normal(size=(1, 6)), N, axis=0)
    style = np.repeat(rng.normal(size=(1, 9)), N, axis=0)
    far = np.asarray(FAR)
    features[far] += rng.normal(size=(len(far), 6)) * 5
    style[far] += rng.normal(size=(len(far), 9)) * 5
    return write_store(
        path,
        features=features,
        style=style,
        masks=_tie_masks(),
        sketch_dim=2,
        extra_columns={"lesion_id": lesions},
    )


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("same", [True, False], ids=["tie-in-one-group", "tie-across-groups"])
def test_ties_at_the_kth_group(tmp_path, path_name, same):
    """Rows 1 and 2 tie at the best score, row 2 (loose bound) visited first (the tie store of
    test_threshold_exactness): in one group the group is represented by row 1 with row 2 a
    member; in two groups both groups are returned, row 1's first."""
    lesions = [f"L{r}" for r in range(38)]
    lesions[2] = "L1" if same else "L2"
    lesions[7] = lesions[8] = None
    path = _tie_groups_store(tmp_path / "ties", lesions)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    scores = all_scores(data, *row_query(data, 0))
    rows = list(range(1, 38))
    for k in (1, 2, 3):
        got = retriever.search(0, measures="all", k=k, group_by="lesion_id")
        expected = grouped(scores, rows, lesions, k)
        _check_grouped(got, expected)
        top = got["i1_sd"][0]
        assert top.row == 1 and (2 in top.members) == same


def _vectors(data, row, *, jitter: float = 0.0, seed: int = 0) -> QueryVectors:
    feature, style, mask = row_query(data, row)
    rng = np.random.default_rng(seed)
    f = np.asarray(feature, np.float32) + np.float32(jitter) * rng.normal(size=len(feature)).astype(
        np.float32
    )
    s = (np.asarray(style) * (1 + jitter * rng.normal(size=len(style)))).astype(np.float32)
    return QueryVectors(feature=f, style=s, mask=np.packbits(mask), mask_area=int(mask.sum()))


@pytest.mark.parametrize("path_name", PATHS)
def test_lesion_query_of_rows_is_exact(lesion_store, path_name):
    """Guards against a lesion query that ranks by one image, averages components instead of
    scores, shares one ED_max / LS_max, or returns its own rows: the mean of each measure's
    score over the images (each normalised on its own) against the brute force."""
    path, data, lesions, _ = lesion_store
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    images = (4, 19, 40)
    expected_scores = mean_scores(data, [row_query(data, r) for r in images])
    rows = [r for r in range(data["n"]) if r not in images]
    for k in (1, 4):
        got = retriever.search(LesionQuery(images), measures="all", k=k)
        _check_ranked(got, ranked(expected_scores, rows, k))
        assert got.row is None and got.rows == images
        grouped_got = retriever.search(
            LesionQuery(images), measures="all", k=k, group_by="lesion_id"
        )
        _check_grouped(grouped_got, grouped(expected_scores, rows, lesions, k))
    # the mean differs from every single image's ranking (the premise)
    singles = [retriever.search(r, measures="style", k=4, exclude=images)["style"] for r in images]
    lesion = retriever.search(LesionQuery(images), measures="style", k=4)["style"]
    assert all([h.row for h in s] != [h.row for h in lesion] for s in singles)


def test_lesion_query_mixed_rows_and_vectors(lesion_store):
    """A lesion query of a stored row and two free images (vectors near other rows): free
    images exclude nothing; components are the images' means."""
    path, data, _, _ = lesion_store
    retriever = Retriever.open(path, device="cpu")
    free = [_vectors(data, 9, jitter=0.05, seed=1), _vectors(data, 25, jitter=0.05, seed=2)]
    queries = [row_query(data, 33)] + [
        (q.feature.astype(np.float64), q.style.astype(np.float64), np.unpackbits(q.mask)[: 32 * 32])
        for q in free
    ]
    expected_scores = mean_scores(data, queries)
    rows = [r for r in range(data["n"]) if r != 33]
    got = retriever.search(LesionQuery([33, *free]), measures="all", k=5)
    _check_ranked(got, ranked(expected_scores, rows, 5))
    per_image = [all_scores(data, *q) for q in queries]
    hit = got["i1_se"][0]
    assert hit.score == pytest.approx(np.mean([s["i1_se"][hit.row] for s in per_image]), rel=1e-9)
    # a batch: a lesion query next to a single row gives the same answers as alone
    both = retriever.search([LesionQuery([33, *free]), 33], measures="all", k=5)
    _check_ranked(both[0], ranked(expected_scores, rows, 5))
    single = all_scores(data, *row_query(data, 33))
    _check_ranked(both[1], ranked(single, rows, 5))
    assert "lesion" in both[0].query and both[0].to_dict()["rows"] == [33]


def test_single_row_store(tmp_path):
    """One row: grouped and lesion queries of it return nothing; a free query finds it."""
    path = make_random_store(
        tmp_path / "one", n=1, seed=3, sketch_dim=None, extra_columns={"lesion_id": ["L"]}
    )
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu")
    assert all(not v for v in retriever.search(0, measures="all", group_by="lesion_id").values())
    assert all(not v for v in retriever.search(LesionQuery([0, 0]), measures="all").values())
    got = retriever.search(_vectors(data, 0), measures="all", k=3, group_by="lesion_id")
    for name in NAMES:
        assert [h.row for h in got[name]] == [0]
        assert got[name][0].group == "L" and got[name][0].members == ()
        assert got[name][0].score == pytest.approx(1.0)


def test_grouped_results_serialise(lesion_store):
    path, _, _, _ = lesion_store
    retriever = Retriever.open(path, device="cpu")
    out = retriever.search(0, measures="style", k=3, group_by="lesion_id").to_dict()
    assert out["group_by"] == "lesion_id"
    first = out["results"]["style"][0]
    assert "group" in first and isinstance(first["members"], list)
    plain = retriever.search(0, measures="style", k=3).to_dict()
    assert "group" not in plain["results"]["style"][0] and "group_by" not in plain
    table = retriever.search(0, measures="style", k=3, group_by="lesion_id").to_arrow()
    assert table.column("members").type == pa.list_(pa.int64())


def test_group_rows_and_errors(lesion_store):
    path, _, lesions, _ = lesion_store
    retriever = Retriever.open(path, device="cpu")
    value = lesions[0] if lesions[0] is not None else lesions[1]
    assert retriever.group_rows("lesion_id", value) == [
        r for r, v in enumerate(lesions) if v == value
    ]
    with pytest.raises(QueryError, match="unknown metadata column"):
        retriever.search(0, group_by="no_such_column")
    with pytest.raises(QueryError, match="no row has"):
        retriever.group_rows("lesion_id", "IL_none")
    with pytest.raises(QueryError, match="at least one image"):
        LesionQuery([])
    with pytest.raises(QueryError, match="list of images"):
        LesionQuery("a.jpg")
    with pytest.raises(QueryError, match="explain"):
        retriever.search(LesionQuery([1, 2]), explain=True)
    with pytest.raises(QueryError, match="out of range"):
        retriever.search(LesionQuery([1, 10_000]))
