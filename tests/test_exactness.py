"""The retriever's nine measures equal an independent brute force over the whole store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dermris.retriever import MEASURES, CostModel, QueryVectors, Retriever, SearchOptions

from reference import NAMES, brute_force, load_store, row_query

# Every path the cost model can take gives the same answers: the default (scans chosen by
# cost), scans always, the bound path alone with Dice bounded from block counts (masks not in
# memory).
PATHS = {
    "default": {},
    "scan": {"cost_model": CostModel.always_scan()},
    "bounds": {
        "cost_model": CostModel.never_scan(),
        "mask_memory_bytes": 0,
        "memory_budget_bytes": 0,
    },
    "memory-bounds": {"cost_model": CostModel.never_scan(), "exact_dice_bytes": 0},
}


def assert_same(hits, expected, *, rtol=1e-9):
    assert [h.row for h in hits] == [r for r, _ in expected]
    np.testing.assert_allclose(
        [h.score for h in hits], [s for _, s in expected], rtol=rtol, atol=1e-12
    )


def test_measure_order_matches_paper_table():
    assert MEASURES == NAMES


CASES = [
    dict(n=1, seed=1),
    dict(n=2, seed=2),
    dict(n=17, seed=3, duplicate_rows=5),
    dict(n=25, seed=4, empty_masks=6, sketch_dim=0),
    dict(n=12, seed=5, identical=True),
    dict(n=30, seed=6, duplicate_rows=8, empty_masks=10, mask_density=0.05, sketch_dim=8),
    dict(n=40, seed=7, commit_sizes=[7, 1, 20, 12], sketch_after=2),
    dict(n=9, seed=8, empty_masks=9, sketch_dim=None),
    dict(n=20, seed=9, mask_density=0.0015),
    dict(n=60, seed=10, clusters=4, sketch_dim=12, duplicate_rows=6),
    dict(n=45, seed=13, clusters=3, sketch_dim=30, commit_sizes=[10, 35], sketch_after=1),
]


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("k", [1, 5, 100])
def test_search_row_equals_brute_force(random_store, case, k, path_name):
    path = random_store(**case)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    rows = sorted({0, data["n"] // 2, data["n"] - 1})
    for row in rows:
        for exclude in (True, False):
            expected = brute_force(
                data, *row_query(data, row), exclude_row=row if exclude else None, k=k
            )
            got = retriever.search(row, k=k, exclude_self=exclude, measures="all")
            assert got.measures == MEASURES and got.row == row
            for name in NAMES:
                assert_same(got[name], expected[name])
                single = retriever.search(row, measures=name, k=k, exclude_self=exclude)
                assert list(single) == [name]
                assert [h.row for h in single[name]] == [h.row for h in got[name]]
            assert len(got["style"]) == min(k, data["n"] - (1 if exclude else 0))


FILTER_CASES = [
    dict(n=30, seed=61, duplicate_rows=6, empty_masks=5),
    dict(n=45, seed=62, clusters=3, sketch_dim=8, mask_density=0.05),
    dict(n=1, seed=63),
    dict(n=12, seed=64, identical=True),
    dict(n=40, seed=65, commit_sizes=[10, 30], sketch_after=1, empty_masks=40),
]


def _labels(n, seed):
    rng = np.random.default_rng(seed)
    groups = [
        None if rng.random() < 0.15 else str(rng.choice(["mel", "nev", "bcc"])) for _ in range(n)
    ]
    ages = rng.integers(20, 90, n).tolist()
    return {"diagnosis": groups, "age": ages}


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: f"n{c['n']}-seed{c['seed']}")
def test_filtered_search_equals_brute_force(random_store, case, path_name):
    """``where=`` keeps the top k among passing rows exact.

    The normalisers are taken over the whole store.
    """
    labels = _labels(case["n"], case["seed"])
    path = random_store(**case, extra_columns=labels)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    filters = [
        (
            pc.field("diagnosis") == "mel",
            {r for r, g in enumerate(labels["diagnosis"]) if g == "mel"},
        ),
        (
            "diagnosis in ('nev', 'bcc') and age >= 50",
            {
                r
                for r, (g, a) in enumerate(zip(labels["diagnosis"], labels["age"]))
                if g in ("nev", "bcc") and a >= 50
            },
        ),
        (
            "is_null(diagnosis) or age < 30",
            {
                r
                for r, (g, a) in enumerate(zip(labels["diagnosis"], labels["age"]))
                if g is None or a < 30
            },
        ),
        ("diagnosis == 'none of these'", set()),
    ]
    for row in sorted({0, case["n"] // 2, case["n"] - 1}):
        for where, passing in filters:
            for k in (1, 4, 50):
                expected = brute_force(
                    data, *row_query(data, row), exclude_row=row, k=k, allowed=passing
                )
                got = retriever.search(
                    row, measures="all", k=k, where=where, columns=("diagnosis", "age")
                )
                for name in NAMES:
                    assert_same(got[name], expected[name])
                    for hit in got[name]:
                        assert hit.row in passing
                        assert hit.metadata == {
                            "diagnosis": labels["diagnosis"][hit.row],
                            "age": labels["age"][hit.row],
                        }


def test_exclude_rows_equals_brute_force(random_store):
    path = random_store(n=40, seed=66, clusters=2, sketch_dim=5, duplicate_rows=6)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu")
    excluded = {1, 2, 3, 17, 39}
    for row in (0, 17, 25):
        expected = brute_force(
            data, *row_query(data, row), exclude_row=row, k=6, allowed=set(range(40)) - excluded
        )
        got = retriever.search(row, measures="all", k=6, exclude=excluded)
        for name in NAMES:
            assert_same(got[name], expected[name])


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("seed", range(6))
def test_free_query_equals_brute_force(random_store, seed, path_name):
    """Queries that are not stored rows (as image queries are), with ties and empty masks."""
    path = random_store(n=23, seed=100 + seed, duplicate_rows=4, empty_masks=5)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    rng = np.random.default_rng(seed)
    feature = rng.normal(size=data["features"].shape[1]).astype(np.float32)
    style_raw = (rng.normal(size=data["style"].shape[1]) * data["style"].std(axis=0)).astype(
        np.float32
    )
    style = retriever.store.codec.round_trip(style_raw[None])[0]
    mask = rng.random(32 * 32) < (0.3 if seed % 3 else 0.0)
    q = QueryVectors(
        feature=feature, style=style, mask=np.packbits(mask), mask_area=int(mask.sum())
    )
    expected = brute_force(data, feature, style, mask, k=7)
    got = retriever.search(q, k=7, measures="all")
    assert got.row is None
    for name in NAMES:
        assert_same(got[name], expected[name], rtol=1e-7)
        for hit in got[name]:
            for comp, value in hit.components.items():
                assert value == pytest.approx(
                    expected["_components"][comp][hit.row], rel=1e-7, abs=1e-12
                )


def test_zero_maxima_give_score_one(random_store):
    path = random_store(n=6, seed=11, identical=True)
    retriever = Retriever.open(path, device="cpu")
    hits = retriever.search(2, k=6, exclude_self=False, measures="all")
    for name in ("euclidean", "style", "i1_se"):
        assert [h.row for h in hits[name]] == list(range(6))  # all tied: row order
        assert all(h.score == 1.0 for h in hits[name])


def test_single_row_store(random_store):
    path = random_store(n=1, seed=12)
    retriever = Retriever.open(path, device="cpu")
    assert retriever.search(0, measures="style", k=5)["style"] == []
    assert (
        retriever.search(0, measures="all", k=5, where="image_id == 'nothing'", exclude_self=False)[
            "i1_se"
        ]
        == []
    )
    hits = retriever.search(0, measures="i1_sd", k=5, exclude_self=False)["i1_sd"]
    assert [h.row for h in hits] == [0] and hits[0].score == 1.0


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("seed", range(8))
def test_many_random_stores_all_rows(random_store, seed, path_name):
    """Every row of random stores of several shapes, against the reference."""
    rng = np.random.default_rng(seed)
    case = dict(
        n=int(rng.integers(3, 50)),
        seed=200 + seed,
        duplicate_rows=int(rng.integers(0, 5)),
        empty_masks=int(rng.integers(0, 6)),
        clusters=int(rng.integers(0, 4)),
        sketch_dim=[None, 0, 2, 6, 64][seed % 5],
        mask_density=float(rng.choice([0.002, 0.05, 0.4])),
    )
    path = random_store(**case)
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    k = int(rng.integers(1, 8))
    for row in range(data["n"]):
        expected = brute_force(data, *row_query(data, row), exclude_row=row, k=k)
        got = retriever.search(row, k=k, measures="all")
        for name in NAMES:
            assert_same(got[name], expected[name])


def test_batch_equals_single_queries(random_store):
    labels = _labels(50, 31)
    path = random_store(
        n=50, seed=31, clusters=3, sketch_dim=6, duplicate_rows=4, extra_columns=labels
    )
    retriever = Retriever.open(path, device="cpu")
    rows = [0, 7, 7, 19, 49]
    for kwargs in ({}, {"where": "diagnosis != 'mel'", "exclude": [3, 4, 19], "columns": ["age"]}):
        batch = retriever.search(rows, k=4, measures="all", **kwargs)
        assert isinstance(batch, list) and len(batch) == len(rows)
        for row, result in zip(rows, batch):
            single = retriever.search(row, k=4, measures="all", **kwargs)
            assert result.stats.rows == 50
            for name in NAMES:
                assert [(h.row, h.score, dict(h.metadata)) for h in result[name]] == [
                    (h.row, h.score, dict(h.metadata)) for h in single[name]
                ]
    # a batch reads each row once for all its queries
    style_only = retriever.search([0, 7, 19], measures="style", k=2)
    assert sum(r.stats.style_rows_read for r in style_only) <= 50


def test_bounds_skip_most_style_rows(random_store):
    """On clustered style data the sketch bounds leave few rows to read (statistics are real)."""
    path = random_store(n=400, seed=41, clusters=8, sketch_dim=16, channels=(4, 6, 8))
    retriever = Retriever.open(
        path, device="cpu", options=SearchOptions(cost_model=CostModel.never_scan())
    )
    data = load_store(path)
    expected = brute_force(data, *row_query(data, 3), exclude_row=3, k=5)
    result = retriever.search(3, measures="style", k=5)
    assert_same(result["style"], expected["style"])
    stats = result.stats
    assert stats.rows == 400
    assert 5 <= stats.reranked["style"] < 0.25 * 400
    assert stats.style_rows_read < 0.25 * 400
    assert (
        stats.bytes_read
        == stats.style_rows_read * retriever.store.style_row_bytes
        + stats.mask_rows_read * retriever.store.mask_row_bytes
    )
    assert set(stats.stage_seconds) >= {"bounds", "rank style"}
    assert stats.seconds >= sum(stats.stage_seconds.values()) * 0.5 > 0


def test_one_pass_projection_equals_the_explicit_residual(random_store):
    """r_q from ||z||^2 - ||y||^2 + y^T (P P^T - I) y equals the explicit ||z - P^T y||.

    Both in float64.
    """
    path = random_store(n=60, seed=53, clusters=3, sketch_dim=12, channels=(5, 9, 14))
    retriever = Retriever.open(path, device="cpu")
    index = retriever._index
    rng = np.random.default_rng(0)
    styles = retriever.store.style_rows([0, 7, 33]) + rng.normal(
        size=(3, retriever.store.style_dim)
    ).astype(np.float32)
    _, r, sq = index.project(styles)
    p = index.components
    z = styles.astype(np.float64) - index.mean
    y = z @ p.T
    np.testing.assert_allclose(r, np.linalg.norm(z - y @ p, axis=1), rtol=1e-9)
    np.testing.assert_allclose(sq, (z * z).sum(1), rtol=1e-12)


def test_scores_do_not_depend_on_the_path_taken(random_store):
    """Bit for bit: a row scored in a scan block, read alone, or certified by FAISS gets the same
    score (a per-row order of summation that depends on the batch would break ties)."""
    path = random_store(
        n=90,
        seed=71,
        channels=(48, 96),
        feature_dim=700,
        clusters=3,
        sketch_dim=6,
        duplicate_rows=6,
    )
    results = []
    for options in (
        {},
        PATHS["scan"],
        PATHS["bounds"],
        PATHS["memory-bounds"],
        {"memory_budget_bytes": 0},
    ):
        retriever = Retriever.open(path, device="cpu", options=SearchOptions(**options))
        results.append(
            [
                {
                    m: [(h.row, h.score, dict(h.components)) for h in hits]
                    for m, hits in retriever.search(row, measures="all", k=7).items()
                }
                for row in (0, 45, 89)
            ]
        )
    assert all(r == results[0] for r in results[1:])


def _near_tie_store(path, seed):
    """60 near-duplicates of row 0 (a few components one float32 ulp apart: LS ~ 1e-14) and a far
    cluster that puts the mean far away: the bounds' float64 rounding (~1e-9 here) dwarfs the
    true losses, and every near-duplicate ties at SS = 1.0."""
    from dermris.core import StyleLayout
    from dermris.indexer.store import StoreWriter
    from dermris.models import get_preset

    rng = np.random.default_rng(seed)
    layout = StyleLayout.from_channels((128,), (1.0,))
    config = get_preset("tiny").replace(feature_dim=4, image_size=32)
    writer = StoreWriter.create(
        path, model_config=config, style_layout=layout, style_dtype="float32"
    )
    x = rng.normal(size=layout.dim).astype(np.float32)
    far = rng.normal(size=layout.dim).astype(np.float32) * 30
    rows = [x]
    for _ in range(60):
        y = x.copy()
        for j in rng.integers(0, layout.dim, 3):
            y[j] = np.nextafter(
                y[j], np.float32(np.inf) if rng.random() < 0.5 else np.float32(-np.inf)
            )
        rows.append(y)
    rows += [(x + far + rng.normal(size=layout.dim) * 0.01).astype(np.float32) for _ in range(60)]
    n = len(rows)
    records = pa.table(
        {
            "image_id": [f"r{i}" for i in range(n)],
            "path": ["x"] * n,
            "sha256": [f"{i:064x}" for i in range(n)],
            "width": pa.array([1] * n, pa.int32()),
            "height": pa.array([1] * n, pa.int32()),
        }
    )
    writer.append(
        features=rng.normal(size=(n, 4)).astype(np.float32),
        style=np.array(rows),
        masks=rng.random((n, 32, 32)) < 0.3,
        records=records,
    )
    writer.update_sketch(dim=4)
    writer.close()
    return path


@pytest.mark.parametrize("seed", range(5))
def test_near_ties_need_the_rounding_slack(tmp_path, seed):
    """Bounds contain every row's exact loss, and the search equals brute force, on a store where
    the float64 rounding of the bounds is a million times the losses (without the slack the
    lower bounds exceed the true losses and a near-tie row is lost)."""
    from dermris.retriever.store_index import squared_distances
    from dermris.retriever.threshold import QueryBatch

    path = _near_tie_store(tmp_path / "s", seed)
    retriever = Retriever.open(
        path, device="cpu", options=SearchOptions(cost_model=CostModel.never_scan())
    )
    batch = QueryBatch(retriever._index, [retriever.vectors(0)])
    query = batch.queries[0]
    styles = retriever.store.style_rows(np.arange(retriever.store.rows)).astype(np.float64)
    exact = squared_distances(styles, styles[0])
    batch._style_bounds()  # the sketch's bounds
    assert (query.ls_lo <= exact).all() and (exact <= query.ls_hi).all()
    batch._tighten(None, query)  # the scan's tight intervals
    assert query.tight.all()
    assert (query.ls_lo <= exact).all() and (exact <= query.ls_hi).all()
    data = load_store(path)
    expected = brute_force(data, *row_query(data, 0), exclude_row=0, k=5)
    got = retriever.search(0, measures=("style", "i1_se", "i1_sd"), k=5)
    for name in ("style", "i1_se", "i1_sd"):
        assert_same(got[name], expected[name])
