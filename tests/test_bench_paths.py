"""``benchmarks/bench_retrieval.py --check-paths``: the benchmark's check that the cost model
honours forced choices notices a cost model that does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dermris.retriever import CostModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.fixture
def bench():
    import bench_retrieval

    return bench_retrieval


def test_check_paths_passes_and_records_every_query(bench, random_store):
    """The forced choices are honoured; every query's path and cost are recorded."""
    path = random_store(n=40, seed=7, clusters=3, sketch_dim=4)
    report = bench.check_paths(path, queries=2, k=3)
    assert report["problems"] == []
    for records in report["runs"].values():
        assert len(records) == 2
        for record in records:
            for stats in (record["style"], record["all_nine"]):
                assert {"path", "scans", "style_rows_read", "mask_rows_read", "bytes_read"} <= set(
                    stats
                )
                assert {"reranked", "stage_seconds", "modelled_read_seconds"} <= set(stats)
    assert all(r["style"]["path"] == "scan" for r in report["runs"]["always_scan"])
    assert all(r["all_nine"]["scans"] == 0 for r in report["runs"]["never_scan"])


@pytest.mark.parametrize("choice", [False, True], ids=["never-scans", "always-scans"])
def test_check_paths_notices_a_cost_model_that_ignores_forcing(
    bench, random_store, monkeypatch, choice
):
    """A cost model whose ``prefer_scan`` ignores its parameters (always or never a scan) is
    reported as a problem (``--check-paths`` then exits with status 1)."""
    path = random_store(n=40, seed=8, clusters=3, sketch_dim=4)
    monkeypatch.setattr(CostModel, "prefer_scan", lambda self, *args: choice)
    problems = bench.check_paths(path, queries=2, k=3)["problems"]
    forced = "never_scan" if choice else "always_scan"
    assert problems and all(p.startswith(forced) for p in problems), problems
