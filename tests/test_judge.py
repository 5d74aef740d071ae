"""Blinded human judgment: judging page on FastAPI, rater ids, timestamps, scoring, agreement."""

from __future__ import annotations

import http.client
import io
import json
import socket
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dermris.app import judge  # noqa: E402
from dermris.app.cli import main  # noqa: E402
from dermris.retriever import MEASURES, Retriever  # noqa: E402

from live_server import live_server  # noqa: E402

BASE = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def retriever(indexed_store):
    return Retriever.open(indexed_store, device="cpu")


def _client(out, **kwargs):
    return TestClient(judge.create_judge_app(out, **kwargs), base_url=BASE)


def _texture(retriever):
    return dict(zip(retriever.image_ids, [i.split("_")[1] for i in retriever.image_ids]))


def _judge_queries(client, tasks, key, retriever, rater, queries, flip=lambda q, tok: False):
    """A simulated rater: similar iff same texture (optionally flipped for some items)."""
    texture = _texture(retriever)
    for t, q in queries:
        for tok in t["items"]:
            similar = texture[retriever.image_ids[q["items"][tok]]] == texture[q["image_id"]]
            similar ^= flip(q, tok)
            response = client.post(
                "/judge/api/judgments",
                json={"query": t["query"], "item": tok, "similar": similar, "rater": rater},
            )
            assert response.status_code == 200, response.text


def test_judge_round_trip_blinded_resumed_and_scored(retriever, tmp_path):
    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=6, seed=2, k=5)
    tasks_text = (out / "tasks.json").read_text()
    client = _client(out)
    assert client.get("/", follow_redirects=False).headers["location"] == "/judge/"
    page = client.get("/judge/")
    assert page.status_code == 200 and "api/judgments" in page.text and "rater" in page.text
    served = client.get("/judge/api/tasks", params={"rater": "alice"}).text

    # blinding: nothing the judge sees names a measure or a row
    page_text = page.text.lower().replace("<style>", "").replace("</style>", "")
    for text in (tasks_text.lower(), served.lower(), page_text):
        for word in list(MEASURES) + ["euclid", "cosine", "style", "dice", "i1"]:
            assert word not in text, word
    for text in (tasks_text, served):
        assert '"row"' not in text and "image_id" not in text and "SYN_" not in text
    tasks = json.loads(tasks_text)
    key = json.loads((out / "key.json").read_text())
    shuffled = 0
    for t, q in zip(tasks["queries"], key["queries"]):
        pooled = set(t["items"])
        assert pooled == {tok for ranking in q["rankings"].values() for tok in ranking}
        assert len(t["items"]) == len(
            pooled
        )  # an image returned by several measures is judged once
        first_seen = list(dict.fromkeys(tok for m in MEASURES for tok in q["rankings"][m]))
        by_row = sorted(t["items"], key=lambda tok: q["items"][tok])
        shuffled += t["items"] != first_seen and t["items"] != by_row
    assert shuffled >= len(tasks["queries"]) - 1  # neither measure order nor row order leaks

    # images by token only: a thumbnail, or the full resolution for zooming
    tok = tasks["queries"][0]["items"][0]
    thumb = client.get(f"/judge/image/{tok}")
    full = client.get(f"/judge/image/{tok}", params={"full": "true"})
    assert thumb.status_code == full.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    original = Image.open(key["images"][tok]).size
    assert Image.open(io.BytesIO(full.content)).size == original
    for bad in (
        "/judge/image/..%2F..%2Fetc%2Fpasswd",
        "/judge/image/0123456789abcdef",
        "/judge/image/key.json",
    ):
        assert client.get(bad).status_code == 404, bad

    pairs = list(zip(tasks["queries"], key["queries"]))
    _judge_queries(client, tasks, key, retriever, "alice", pairs[:3])
    lines = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(lines) == sum(len(t["items"]) for t, _ in pairs[:3])
    assert all(r["rater"] == "alice" and r["time"].endswith("+00:00") for r in lines)
    assert lines == sorted(lines, key=lambda r: r["time"])  # timestamps in click order
    partial = judge.score_session(out)
    assert partial.complete_queries == 3 and partial.total_queries == 6

    # a new server resumes from the saved clicks, per rater
    client = _client(out)
    judged = client.get("/judge/api/tasks", params={"rater": "alice"}).json()["judged"]
    assert len(judged) == len(lines)
    assert client.get("/judge/api/tasks", params={"rater": "bob"}).json()["judged"] == {}
    _judge_queries(client, tasks, key, retriever, "alice", pairs[3:])
    score = judge.score_session(out)
    assert score.complete_queries == 6 and score.judged_items == score.total_items
    assert list(score.per_rater) == ["alice"] and score.agreement == []

    # judgments by label reproduce precision@5 of the label evaluation
    texture = _texture(retriever)
    for m in MEASURES:
        precision = []
        for q in key["queries"]:
            hits = retriever.search(q["row"], measures=m, k=5)[m]
            precision.append(sum(texture[h.image_id] == texture[q["image_id"]] for h in hits) / 5)
        assert score.success[m] == pytest.approx(100 * np.mean(precision))

    result = CliRunner().invoke(main, ["judge", "--score", str(out)])
    assert result.exit_code == 0 and "61.20%" in result.output and "6 of 6 queries" in result.output


def test_two_raters_agreement_and_per_rater_scores(retriever, tmp_path):
    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=3, seed=5, k=3)
    tasks = json.loads((out / "tasks.json").read_text())
    key = json.loads((out / "key.json").read_text())
    pairs = list(zip(tasks["queries"], key["queries"]))
    client = _client(out)
    _judge_queries(client, tasks, key, retriever, "alice", pairs)
    flipped = {t["items"][0] for t, _ in pairs}  # bob disagrees on the first image of each query
    _judge_queries(
        client, tasks, key, retriever, "bob@clinic", pairs[:2], flip=lambda q, tok: tok in flipped
    )
    score = judge.score_session(out)
    assert set(score.per_rater) == {"alice", "bob@clinic"}
    assert (
        score.per_rater["alice"]["complete_queries"] == 3
        and score.per_rater["bob@clinic"]["complete_queries"] == 2
    )
    (pair,) = score.agreement
    common = sum(len(t["items"]) for t, _ in pairs[:2])
    assert pair.raters == ("alice", "bob@clinic") and pair.items == common
    assert pair.percent == pytest.approx(100 * (common - 2) / common)
    only_bob = judge.score_session(out, rater="bob@clinic")
    assert only_bob.complete_queries == 2 and list(only_bob.per_rater) == ["bob@clinic"]
    # pooled success: the mean over every complete (rater, query)
    for m in MEASURES:
        a = score.per_rater["alice"]["success_rate_percent"][m]
        b = only_bob.success[m]
        assert score.success[m] == pytest.approx((3 * a + 2 * b) / 5)
    with pytest.raises(judge.JudgeError, match="no judgments by rater 'carol'"):
        judge.score_session(out, rater="carol")
    result = CliRunner().invoke(main, ["judge", "--score", str(out)])
    assert (
        result.exit_code == 0
        and "agreement alice / bob@clinic" in result.output
        and "kappa" in result.output
    )


def test_cohens_kappa_by_hand(tmp_path, retriever):
    """A hand-worked example: A = [T,T,F,F], B = [T,F,F,F].

    Agreement 75 %, chance 50 %, kappa 0.5.
    """
    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=1, seed=0, k=5)
    items = json.loads((out / "tasks.json").read_text())["queries"][0]["items"][:4]
    lines = [
        {"rater": r, "query": "Q001", "item": i, "similar": v}
        for r, values in (("a", [True, True, False, False]), ("b", [True, False, False, False]))
        for i, v in zip(items, values)
    ]
    # a judgment recorded before rater ids (no "rater") and a torn last line
    lines.append({"query": "Q001", "item": items[0], "similar": True})
    (out / "judgments.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines) + '\n{"query": "Q0'
    )
    score = judge.score_session(out)
    agreement = {p.raters: p for p in score.agreement}
    assert agreement[("a", "b")].percent == pytest.approx(75.0) and agreement[
        ("a", "b")
    ].kappa == pytest.approx(0.5)
    assert (
        agreement[("", "a")].items == 1 and agreement[("", "a")].kappa is None
    )  # one answer each: undefined
    assert set(score.per_rater) == {"", "a", "b"} and score.judged_items == 4


def test_judge_refuses_bad_input_foreign_hosts_and_tokens(retriever, tmp_path):
    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=2, seed=1, k=3)
    tasks = json.loads((out / "tasks.json").read_text())
    item = tasks["queries"][0]["items"][0]
    client = _client(out)
    good = {"query": "Q001", "item": item, "similar": True, "rater": "r1"}
    for body, status in [
        ({**good, "item": "nope"}, 400),
        ({**good, "similar": "yes"}, 400),
        ({**good, "rater": ""}, 400),
        ({**good, "rater": "<script>"}, 400),
        ({**good, "rater": "x" * 65}, 400),
        ([good], 400),
    ]:
        assert client.post("/judge/api/judgments", json=body).status_code == status, body
    assert client.post("/judge/api/judgments", content="[" * 2000 + "]" * 2000).status_code == 400
    assert client.post("/judge/api/judgments", content="{" + " " * 5000 + "}").status_code == 413
    assert client.get("/judge/api/tasks", params={"rater": "a b"}).status_code == 400
    assert (
        client.get(
            "/judge/api/tasks", params={"rater": "r1"}, headers={"host": "evil.example"}
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/judge/api/judgments", json=good, headers={"origin": "http://evil.example"}
        ).status_code
        == 403
    )
    assert (out / "judgments.jsonl").read_text() == ""  # nothing refused was recorded
    assert client.post("/judge/api/judgments", json=good).status_code == 200

    locked = _client(out, token="s3cret")
    assert locked.get("/judge/").status_code == 401
    assert (
        locked.get("/", params={"token": "s3cret"}, follow_redirects=False).headers["location"]
        == "/judge/?token=s3cret"
    )
    assert locked.get("/judge/", params={"token": "s3cret"}).status_code == 200
    assert (
        locked.get(
            "/judge/api/tasks", params={"rater": "r1"}, headers={"authorization": "Bearer s3cret"}
        ).status_code
        == 200
    )
    with pytest.raises(judge.JudgeError, match="holds no judgment session"):
        judge.create_judge_app(tmp_path / "nothing")


def test_judge_on_the_search_server_and_a_stalled_client(indexed_store, retriever, tmp_path):
    """On a real socket: the judging page beside the search page; a client that stops mid-body
    holds no worker, the others are answered."""
    from dermris.app.server import create_app

    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=2, seed=1, k=3)
    with live_server(
        lambda port: create_app(indexed_store, port=port, device="cpu", judge_session=out)
    ) as base:
        port = int(base.rsplit(":", 1)[1])

        def request(method, path, body=None, headers=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()

        assert request("GET", "/api/health")[0] == 200
        assert request("GET", "/judge/api/tasks?rater=r1")[0] == 200
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /judge/api/judgments HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Length: 100\r\n\r\n{" % port
            )
            started = time.monotonic()
            for _ in range(3):
                assert request("GET", "/judge/api/tasks?rater=r1")[0] == 200
            assert time.monotonic() - started < 5
    assert judge.score_session(out).judged_items == 0


def test_judge_cli_prepare_only_and_score_json(indexed_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "s"
    result = runner.invoke(
        main, ["judge", str(indexed_store), "--out", str(out), "--queries", "3", "--no-serve"]
    )
    assert result.exit_code == 0 and (out / "tasks.json").is_file()
    again = runner.invoke(main, ["judge", "--score", str(out), "--json"])
    payload = json.loads(again.stdout)  # valid JSON before any judgment: no NaN
    assert payload["complete_queries"] == 0 and payload["paper_table1_percent"]["style"] == 61.2
    assert (
        all(v is None for v in payload["success_rate_percent"].values())
        and payload["agreement"] == []
    )
    refused = runner.invoke(main, ["judge", "--out", str(out), "--host", "0.0.0.0"])
    assert refused.exit_code == 1 and "needs --token" in refused.output


def test_judgments_beside_the_search_page_keep_their_own_limit(indexed_store, retriever, tmp_path):
    """Mounted in the search app, a judgment still stops at 4 KB.

    (The search app's body limit is the 32 MiB upload.)
    """
    from dermris.app.server import create_app

    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=1, seed=1, k=2)
    client = TestClient(
        create_app(indexed_store, device="cpu", judge_session=out), base_url="http://127.0.0.1:8000"
    )
    response = client.post("/judge/api/judgments", content=b"{" + b" " * 100_000 + b"}")
    assert response.status_code == 413 and (out / "judgments.jsonl").read_text() == ""
    item = json.loads((out / "tasks.json").read_text())["queries"][0]["items"][0]
    ok = client.post(
        "/judge/api/judgments", json={"query": "Q001", "item": item, "similar": False, "rater": "x"}
    )
    assert (
        ok.status_code == 200 and json.loads((out / "judgments.jsonl").read_text())["rater"] == "x"
    )


@pytest.mark.parametrize(
    ("rater", "says"),
    [
        ("alice\n", "contains whitespace"),
        ("alice\r\n", "contains whitespace"),
        (" alice", "contains whitespace"),
        ("al ice", "contains whitespace"),
        ("alice\x00", "control characters"),
        ("alice\x1b[2J", "control characters"),
        ("ali\u200bce", "control characters"),
        ("x" * 65, "65 characters long"),
        ("x" * 1000, "1000 characters long"),
        ("ålice", "is not allowed"),
        ("", "is required"),
    ],
)
def test_rater_ids_with_newlines_controls_or_too_long_are_refused(retriever, tmp_path, rater, says):
    """Guards against ``RATER_PATTERN.match`` with a ``$`` anchor accepting ``"alice\\n"`` (a
    second rater that prints as ``alice``): refused with 400 and a message saying why, both
    when judging and when asking for tasks, and nothing is recorded."""
    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=1, seed=2, k=2)
    tasks = json.loads((out / "tasks.json").read_text())
    item = tasks["queries"][0]["items"][0]
    client = _client(out)
    body = {"query": "Q001", "item": item, "similar": True, "rater": rater}
    refused = client.post("/judge/api/judgments", json=body)
    assert refused.status_code == 400 and says in refused.json()["detail"], refused.text
    listed = client.get("/judge/api/tasks", params={"rater": rater})
    assert listed.status_code == 400 and says in listed.json()["detail"], listed.text
    assert (out / "judgments.jsonl").read_text() == ""
    assert judge.rater_problem(rater) is not None
    assert client.post("/judge/api/judgments", json={**body, "rater": "alice"}).status_code == 200
    assert judge.rater_problem("bob@clinic.org") is None
