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
