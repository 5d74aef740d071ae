"""The crossover reader study: preparation, per-rater schedules, readings, scoring (McNemar)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from dermris.app import reader_study as rs
from dermris.app.cli import main
from dermris.core.errors import JudgeError
from dermris.retriever import Retriever

BASE = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from conftest import make_random_store

    n = 30
    labels = ["nevus", "melanoma", "bcc"] * 10
    lesions = [f"IL_{i // 3}" for i in range(n)]
    lesions[4] = None
    root = tmp_path_factory.mktemp("reader")
    store = make_random_store(
        root / "store",
        n=n,
        seed=71,
        clusters=3,
        extra_columns={"diagnosis": labels, "lesion_id": lesions},
    )
    out = rs.prepare_reader_study(
        Retriever.open(store, device="cpu"), root / "study", label_column="diagnosis", cases=8, k=3
    )
    return store, out, labels, lesions


def test_prepare_blinds_cases_and_leaves_the_lesion_out(study):
    store, out, labels, lesions = study
    public = json.loads((out / rs.READER_STUDY_FILE).read_text())
    key = json.loads((out / rs.READER_KEY_FILE).read_text())
    assert public["choices"] == ["bcc", "melanoma", "nevus"] and len(public["cases"]) == 8
    text = (out / rs.READER_STUDY_FILE).read_text()
    assert '"row"' not in text and "IMG_" not in text  # no rows, no image ids
    retriever = Retriever.open(store, device="cpu")
    for case in public["cases"]:
        secret = key["cases"][case["case"]]
        row = secret["row"]
        assert secret["diagnosis"] == labels[row]
        mates = [r for r in range(30) if lesions[row] is not None and lesions[r] == lesions[row]]
        expected = retriever.search(row, measures="style", k=3, exclude=mates)["style"]
        assert secret["retrieved_rows"] == [h.row for h in expected]
        assert not set(secret["retrieved_rows"]) & set(mates)
        assert [r["diagnosis"] for r in case["retrieved"]] == [labels[h.row] for h in expected]
    with pytest.raises(JudgeError, match="already holds"):
        rs.prepare_reader_study(retriever, out, label_column="diagnosis")


def test_schedule_is_a_crossover_randomised_per_rater(study):
    _, out, _, _ = study
    plans = {r: rs.schedule(out, r) for r in ("ann", "bob", "cy", "dee")}
    for plan in plans.values():
        assert len(plan) == 16
        first = [p for p in plan if p["period"] == 1]
        second = [p for p in plan if p["period"] == 2]
        assert plan == first + second
        assert sorted(p["case"] for p in first) == sorted(p["case"] for p in second)
        arms = {(p["case"], p["arm"]) for p in plan}
        assert len(arms) == 16  # every case in both arms
        assert {p["arm"] for p in first} == {"with", "without"}  # both orders occur
    assert plans["ann"] == rs.schedule(out, "ann")  # the same on every call
    assert len({json.dumps(p) for p in plans.values()}) == 4  # randomised per rater


def test_mcnemar_exact_by_hand():
    assert rs.mcnemar_exact(0, 0) == 1.0
    assert rs.mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    assert rs.mcnemar_exact(3, 5) == pytest.approx(2 * 93 / 256)
    assert rs.mcnemar_exact(5, 3) == rs.mcnemar_exact(3, 5)
    assert rs.mcnemar_exact(4, 4) == 1.0
    total = sum(math.comb(12, i) for i in range(3)) / 2**12
    assert rs.mcnemar_exact(2, 10) == pytest.approx(2 * total)


def test_readings_validated_and_scored(study, tmp_path):
    _, out, _, _ = study
    import shutil

    study_dir = tmp_path / "copy"
    shutil.copytree(out, study_dir)
    key = json.loads((study_dir / rs.READER_KEY_FILE).read_text())
    cases = sorted(key["cases"])
    truth = {c: key["cases"][c]["diagnosis"] for c in cases}
    wrong = {c: next(d for d in ("bcc", "melanoma", "nevus") if d != truth[c]) for c in cases}
    # ann: right with retrieval on all 8, right without on 2 -> b = 6, c = 0
    for i, c in enumerate(cases):
        rs.record_reading(
            study_dir, rater="ann", case=c, arm="with", diagnosis=truth[c], confidence=4, seconds=10
        )
        rs.record_reading(
            study_dir,
            rater="ann",
            case=c,
            arm="without",
            diagnosis=truth[c] if i < 2 else wrong[c],
            confidence=2,
            seconds=20.5,
        )
    # bob: only three cases in both arms; a later reading replaces an earlier one
    for c in cases[:3]:
        rs.record_reading(
            study_dir, rater="bob", case=c, arm="with", diagnosis=wrong[c], confidence=1, seconds=3
        )
        rs.record_reading(
            study_dir,
            rater="bob",
            case=c,
            arm="without",
            diagnosis=truth[c],
            confidence=5,
            seconds=1,
        )
    rs.record_reading(
        study_dir,
        rater="bob",
        case=cases[0],
        arm="with",
        diagnosis=truth[cases[0]],
        confidence=3,
        seconds=2,
    )
    rs.record_reading(
        study_dir,
        rater="bob",
        case=cases[5],
        arm="with",
        diagnosis=truth[cases[5]],
        confidence=3,
        seconds=2,
    )  # unpaired: not counted
    with open(study_dir / rs.READINGS_FILE, "a") as fh:
        fh.write('{"rater": "ann", "case"')  # a torn last line is ignored
    score = rs.score_reader_study(study_dir)
    ann, bob = score.per_rater["ann"], score.per_rater["bob"]
    assert (ann.paired, ann.accuracy_with, ann.accuracy_without) == (8, 1.0, 0.25)
    assert (ann.only_with, ann.only_without) == (6, 0)
    assert ann.p_value == pytest.approx(2 / 64)
    assert (ann.confidence_with, ann.seconds_without) == (4.0, 20.5)
    assert (bob.paired, bob.only_with, bob.only_without) == (3, 0, 2)
    assert bob.accuracy_with == pytest.approx(1 / 3) and bob.accuracy_without == 1.0
    assert score.pooled.paired == 11 and score.pooled.only_with == 6
    assert score.pooled.p_value == pytest.approx(rs.mcnemar_exact(6, 2))
    assert list(rs.score_reader_study(study_dir, rater="bob").per_rater) == ["bob"]
    bad = dict(rater="ann", case=cases[0], arm="with", diagnosis=truth[cases[0]])
    for change, message in [
        ({"rater": "a b"}, "rater id"),
        ({"case": "C999"}, "unknown case"),
        ({"arm": "both"}, "arm must be"),
        ({"diagnosis": "other"}, "diagnosis must be"),
    ]:
        with pytest.raises(JudgeError, match=message):
            rs.record_reading(study_dir, **{**bad, **change}, confidence=3, seconds=1)
    for confidence, seconds in [(0, 1), (6, 1), (True, 1), (3, -1), (3, float("nan"))]:
        with pytest.raises(JudgeError):
            rs.record_reading(study_dir, **bad, confidence=confidence, seconds=seconds)
    # the CLI: --score detects a reader study
    runner = CliRunner()
    text = runner.invoke(main, ["judge", "--score", str(study_dir)])
    assert text.exit_code == 0, text.output
    assert "accuracy with vs without" in text.output and "(pooled)" in text.output
    assert "0.0312" in text.output
    payload = json.loads(runner.invoke(main, ["judge", "--score", str(study_dir), "--json"]).stdout)
    assert payload["per_rater"]["ann"]["only_with"] == 6


def test_reader_api_and_cli_prepare(study, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    store, _, _, _ = study
    runner = CliRunner()
    out = tmp_path / "cli-study"
    result = runner.invoke(
        main,
        ["judge", str(store), "--out", str(out), "--reader-study", "--label-column", "diagnosis"]
        + ["--queries", "4", "-k", "2", "--no-serve"],
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / rs.READER_STUDY_FILE).read_text())["cases"]) == 4
    missing = runner.invoke(
        main, ["judge", str(store), "--out", str(tmp_path / "x"), "--reader-study"]
    )
    assert missing.exit_code == 2 and "--label-column" in missing.output

    client = TestClient(rs.create_reader_app(out), base_url=BASE)
    assert "Reader study" in client.get("/reader/").text
    plan = client.get("/reader/api/schedule", params={"rater": "ann"}).json()
    assert len(plan["schedule"]) == 8 and plan["done"] == []
    step = plan["schedule"][0]
    view = client.get(f"/reader/api/case/{step['case']}", params={"arm": "with"}).json()
    assert len(view["retrieved"]) == 2
    blind = client.get(f"/reader/api/case/{step['case']}", params={"arm": "without"}).json()
    assert "retrieved" not in blind
    reading = {
        "rater": "ann",
        "case": step["case"],
        "arm": step["arm"],
        "diagnosis": plan["choices"][0],
        "confidence": 3,
        "seconds": 4.2,
    }
    answer = client.post("/reader/api/readings", json=reading)
    assert answer.status_code == 200 and answer.json()["ok"], answer.text
    again = client.get("/reader/api/schedule", params={"rater": "ann"}).json()
    assert again["done"] == [f"{step['case']}/{step['arm']}"]
    bad = client.post("/reader/api/readings", json={**reading, "confidence": 9})
    assert bad.status_code == 400 and "confidence" in bad.json()["detail"]
    assert client.get("/reader/image/nope").status_code == 404
