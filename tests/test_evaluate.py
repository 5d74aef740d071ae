"""Table 1 by labels (evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dermris.app.cli import main
from dermris.app.evaluate import EvaluationError, evaluate, query_metrics
from dermris.retriever import MEASURES, Retriever

from reference import brute_force, load_store, row_query


def slow_metrics(labels, groups, ranking, query, k):
    """Independent precision@k, AP@k, majority vote for one query from a full ranking."""
    excluded = {
        r
        for r in range(len(labels))
        if r == query or (groups[query] is not None and groups[r] == groups[query])
    }
    kept = [r for r in ranking if r not in excluded][:k]
    rel = [labels[r] == labels[query] for r in kept]
    precision = sum(rel) / k
    relevant = sum(
        1 for r in range(len(labels)) if r not in excluded and labels[r] == labels[query]
    )
    ap = sum(sum(rel[: i + 1]) / (i + 1) for i in range(len(rel)) if rel[i])
    ap = ap / min(k, relevant) if min(k, relevant) else 0.0
    votes = {}
    for r in kept:
        votes[labels[r]] = votes.get(labels[r], 0) + 1
    top = max(votes.values()) if votes else 0
    winner = next((labels[r] for r in kept if votes[labels[r]] == top), None)
    return precision, ap, float(winner == labels[query])


def test_query_metrics_by_hand():
    assert query_metrics(
        "a", ["a", "b", "a", "b", "b"], relevant_available=4, k=5
    ) == pytest.approx((0.4, (1 + 2 / 3) / 4, 0.0))
    assert query_metrics("a", ["b", "a", "a"], relevant_available=2, k=5) == pytest.approx(
        (0.4, (1 / 2 + 2 / 3) / 2, 1.0)
    )
    # a tied vote goes to the label ranked first
    assert query_metrics("b", ["b", "a", "a", "b"], relevant_available=9, k=4)[2] == 1.0
    assert query_metrics("a", [], relevant_available=0, k=5) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("use_groups", [False, True])
def test_evaluate_matches_slow_reference(random_store, use_groups):
    rng = np.random.default_rng(3)
    n = 40
    labels = rng.choice(["nevus", "melanoma", "bkl"], size=n).tolist()
    labels[5] = None  # unlabelled rows are never queries
    groups = [f"P{g}" for g in rng.integers(0, 9, size=n)]
    path = random_store(
        n=n,
        seed=61,
        clusters=3,
        sketch_dim=5,
        duplicate_rows=3,
        extra_columns={"diagnosis": labels, "patient_id": groups},
    )
    retriever = Retriever.open(path, device="cpu")
    report = evaluate(
        retriever,
        "diagnosis",
        group_column="patient_id" if use_groups else None,
        k=5,
        queries=15,
        seed=4,
        bootstrap=200,
    )
    assert len(report.queries) == 15 and 5 not in report.queries
    data = load_store(path)
    grp = groups if use_groups else [None] * n
    for m in MEASURES:
        expected = {"precision": [], "map": [], "majority_vote": []}
        for q in report.queries:
            ranking = [r for r, _ in brute_force(data, *row_query(data, q), exclude_row=q, k=n)[m]]
            p, ap, mv = slow_metrics(labels, grp, ranking, q, 5)
            expected["precision"].append(p)
            expected["map"].append(ap)
            expected["majority_vote"].append(mv)
        for name in expected:
            np.testing.assert_allclose(
                report.per_query[m][name], expected[name], err_msg=f"{m} {name}"
            )
            s = report.metrics[m][name]
            assert s.low <= s.mean <= s.high
            if np.std(expected[name]) > 0:  # a real interval, not [mean, mean]
                assert s.low < s.mean < s.high and s.high - s.low > 0.01, (m, name, s)
            assert s.mean == pytest.approx(np.mean(expected[name]))


def test_group_exclusion_removes_same_patient_results(random_store):
    n = 30
    labels = ["a"] * 15 + ["b"] * 15
    groups = [f"P{i // 3}" for i in range(n)]  # triplets of near-identical images per patient
    path = random_store(n=n, seed=62, extra_columns={"label": labels, "patient_id": groups})
    retriever = Retriever.open(path, device="cpu")
    data = load_store(path)
    report = evaluate(retriever, "label", group_column="patient_id", k=4, queries=None, bootstrap=0)
    assert report.queries == list(range(n))
    for i, q in enumerate(report.queries):
        mates = {r for r in range(n) if groups[r] == groups[q]}
        expected = brute_force(data, *row_query(data, q), k=4, allowed=set(range(n)) - mates)
        relevant = sum(1 for r in range(n) if labels[r] == labels[q] and r not in mates)
        for m in MEASURES:
            rows = [r for r, _ in expected[m]]
            assert not set(rows) & mates
            p, ap, mv = query_metrics(labels[q], [labels[r] for r in rows], relevant, 4)
            assert report.per_query[m]["precision"][i] == pytest.approx(p), (q, m)
            assert report.per_query[m]["map"][i] == pytest.approx(ap), (q, m)
            assert report.per_query[m]["majority_vote"][i] == pytest.approx(mv), (q, m)
    with pytest.raises(EvaluationError, match="no metadata column 'lesion_id'"):
        evaluate(retriever, "label", group_column="lesion_id")


def test_evaluate_cli_table_json_plot(indexed_store, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "eval.png"
    result = runner.invoke(
        main,
        [
            "evaluate",
            str(indexed_store),
            "--label-column",
            "texture",
            "--queries",
            "12",
            "--plot",
            str(plot),
            "--bootstrap",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[2:11]] == list(MEASURES)  # Table 1 order
    assert plot.stat().st_size > 10_000
    payload = json.loads(
        runner.invoke(
            main,
            [
                "evaluate",
                str(indexed_store),
                "--label-column",
                "texture",
                "--all",
                "--json",
                "--bootstrap",
                "50",
            ],
        ).stdout
    )
    assert payload["queries"] == 32 and set(payload["metrics"]) == set(MEASURES)
    bad = runner.invoke(main, ["evaluate", str(indexed_store), "--label-column", "nope"])
    assert bad.exit_code == 1 and "no metadata column 'nope'" in bad.output


# -- stratified evaluation ----------------------------------------------------------------


def _isic_like(n: int, seed: int) -> dict:
    """ISIC-like metadata: a three-level diagnosis hierarchy (deeper levels sparser), lesions
    of 1-4 images, a skin type with missing values, a confirmation type set on most rows."""
    rng = np.random.default_rng(seed)
    leaf = rng.choice(["nevus", "melanoma", "bcc", "seb_k"], size=n)
    d1 = ["Malignant" if v in ("melanoma", "bcc") else "Benign" for v in leaf]
    d2 = [
        {"nevus": "Melanocytic", "melanoma": "Melanocytic", "bcc": "Keratinocytic"}.get(v)
        for v in leaf
    ]  # seb_k: no level 2
    d3 = [v if rng.random() < 0.7 else None for v in leaf]
    lesions, i = [], 0
    while len(lesions) < n:
        lesions += [f"IL_{i:03d}"] * int(rng.integers(1, 5))
        i += 1
    skin = [None if rng.random() < 0.2 else f"{rng.integers(1, 4)}" for _ in range(n)]
    confirm = [None if rng.random() < 0.3 else "histopathology" for _ in range(n)]
    return {
        "diagnosis_1": d1,
        "diagnosis_2": d2,
        "diagnosis_3": d3,
        "lesion_id": lesions[:n],
        "fitzpatrick_skin_type": skin,
        "diagnosis_confirm_type": confirm,
    }


@pytest.fixture(scope="module")
def isic_store(tmp_path_factory):
    from conftest import make_random_store

    n = 36
    meta = _isic_like(n, seed=8)
    path = make_random_store(
        tmp_path_factory.mktemp("isic") / "store",
        n=n,
        seed=64,
        clusters=4,
        sketch_dim=5,
        extra_columns=meta,
    )
    return path, meta, load_store(path)


def _rankings(data, queries, measures):
    n = data["n"]
    return {
        q: {
            m: [r for r, _ in ranks]
            for m, ranks in brute_force(data, *row_query(data, q), exclude_row=q, k=n).items()
            if m in measures
        }
        for q in queries
    }


def test_stratified_and_hierarchical_match_slow_reference(isic_store):
    """Guards against strata mixing queries, levels judged by the top label, or the lesion
    not left out by default: every stratum's and level's means against the slow reference
    (leave-one-lesion-out, relevance at the level), with real bootstrap intervals."""
    path, meta, data = isic_store
    n = data["n"]
    retriever = Retriever.open(path, device="cpu")
    measures = ("style", "i1_sd", "euclidean")
    report = evaluate(
        retriever,
        "diagnosis_1",
        k=4,
        queries=None,
        measures=measures,
        bootstrap=300,
        by=("fitzpatrick_skin_type",),
        hierarchy=("diagnosis_1", "diagnosis_2", "diagnosis_3"),
    )
    assert report.group_column == "lesion_id"  # auto: leave one lesion out
    assert report.queries == list(range(n))
    rankings = _rankings(data, report.queries, measures)
    lesions = meta["lesion_id"]

    def expected_means(labels, queries):
        out = {m: np.zeros(3) for m in measures}
        for q in queries:
            for m in measures:
                out[m] += slow_metrics(labels, lesions, rankings[q][m], q, 4)
        return {m: v / len(queries) for m, v in out.items()}

    skin = meta["fitzpatrick_skin_type"]
    values = [s.value for s in report.strata]
    assert values == sorted({v for v in skin if v is not None}) + [None]
    for stratum in report.strata:
        queries = [q for q in range(n) if skin[q] == stratum.value]
        assert stratum.queries == len(queries) and stratum.column == "fitzpatrick_skin_type"
        want = expected_means(meta["diagnosis_1"], queries)
        for m in measures:
            got = [stratum.metrics[m][name].mean for name in ("precision", "map", "majority_vote")]
            np.testing.assert_allclose(got, want[m], err_msg=f"{stratum.value} {m}")
    assert [lv.column for lv in report.levels] == ["diagnosis_1", "diagnosis_2", "diagnosis_3"]
    for level in report.levels:
        labels = meta[level.column]
        queries = [q for q in range(n) if labels[q] is not None]
        assert level.queries == len(queries)
        want = expected_means(labels, queries)
        for m in measures:
            got = [level.metrics[m][name].mean for name in ("precision", "map", "majority_vote")]
            np.testing.assert_allclose(got, want[m], err_msg=f"{level.column} {m}")
            s = level.metrics[m]["precision"]
            assert s.low <= s.mean <= s.high
    # the levels differ: finer labels are harder (the premise of judging at each level)
    p1 = report.levels[0].metrics["style"]["precision"].mean
    p3 = report.levels[2].metrics["style"]["precision"].mean
    assert p3 < p1
    top = report.levels[0].metrics["style"]["precision"]
    assert top.high - top.low > 0.01
    payload = report.to_dict()
    assert [e["value"] for e in payload["strata"]["fitzpatrick_skin_type"]] == values
    assert payload["hierarchy"][1]["level"] == "diagnosis_2"
    assert payload["hierarchy"][1]["queries"] == sum(v is not None for v in meta["diagnosis_2"])
    # group_column=None: the lesion's other images count again
    loose = evaluate(retriever, "diagnosis_1", group_column=None, k=4, queries=None, bootstrap=0)
    assert loose.group_column is None
    assert loose.metrics["style"]["precision"].mean != report.metrics["style"]["precision"].mean


def test_confirmed_only_queries_and_results(isic_store):
    """Only confirmed rows are queries and results; relevance counts only confirmed rows."""
    path, meta, data = isic_store
    n = data["n"]
    retriever = Retriever.open(path, device="cpu")
    report = evaluate(
        retriever, "diagnosis_1", k=3, queries=None, measures=("style",), confirmed_only=True
    )
    confirmed = {r for r in range(n) if meta["diagnosis_confirm_type"][r] is not None}
    assert report.confirmed_only and set(report.queries) == confirmed
    labels, lesions = meta["diagnosis_1"], meta["lesion_id"]
    for i, q in enumerate(report.queries):
        mates = {r for r in range(n) if lesions[r] == lesions[q]}
        allowed = confirmed - mates
        rows = [r for r, _ in brute_force(data, *row_query(data, q), k=3, allowed=allowed)["style"]]
        relevant = sum(1 for r in allowed if labels[r] == labels[q])
        want = query_metrics(labels[q], [labels[r] for r in rows], relevant, 3)
        got = [report.per_query["style"][name][i] for name in ("precision", "map", "majority_vote")]
        assert got == pytest.approx(want), q
    retriever_no = Retriever.open(path, device="cpu")
    with pytest.raises(EvaluationError, match="no metadata column 'nope'"):
        evaluate(retriever_no, "diagnosis_1", by=("nope",))


def test_evaluate_cli_strata_hierarchy_json_and_chart(isic_store, tmp_path):
    path, meta, _ = isic_store
    runner = CliRunner()
    plot = tmp_path / "eval.png"
    args = ["evaluate", str(path), "--hierarchy", "--by", "fitzpatrick_skin_type", "--all"]
    args += ["--measures", "style", "--measures", "i1_sd", "-k", "3", "--bootstrap", "50"]
    result = runner.invoke(main, [*args, "--json", "--plot", str(plot), "--confirmed-only"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["label_column"] == "diagnosis_1"  # the hierarchy's first level
    assert payload["group_column"] == "lesion_id" and payload["confirmed_only"]
    assert [e["level"] for e in payload["hierarchy"]] == [
        "diagnosis_1",
        "diagnosis_2",
        "diagnosis_3",
    ]
    assert set(payload["strata"]["fitzpatrick_skin_type"][0]["metrics"]) == {"style", "i1_sd"}
    strata_png = tmp_path / "eval-strata.png"
    assert payload["strata_plot"] == str(strata_png) and strata_png.stat().st_size > 10_000
    text = runner.invoke(main, [*args, "--group-column", "none"])
    assert text.exit_code == 0, text.output
    assert "fitzpatrick_skin_type = (missing)" in text.output
    assert "level diagnosis_3" in text.output and "same 'lesion_id'" not in text.output
    bad = runner.invoke(main, ["evaluate", str(path)])
    assert bad.exit_code == 2 and "--label-column" in bad.output
