"""Table 1 by labels (evaluate) and by blinded human judgment (judge)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner

from reference import brute_force, load_store, row_query
from dermris.retriever import MEASURES, Retriever
from dermris.retriever.app.cli import main
from dermris.retriever.app.evaluate import EvaluationError, evaluate, query_metrics
from dermris.retriever.app import judge


def slow_metrics(labels, groups, ranking, query, k):
    """Independent precision@k, AP@k, majority vote for one query from a full ranking."""
    excluded = {r for r in range(len(labels)) if r == query or (groups[query] is not None and groups[r] == groups[query])}
    kept = [r for r in ranking if r not in excluded][:k]
    rel = [labels[r] == labels[query] for r in kept]
    precision = sum(rel) / k
    relevant = sum(1 for r in range(len(labels)) if r not in excluded and labels[r] == labels[query])
    ap = sum(sum(rel[: i + 1]) / (i + 1) for i in range(len(rel)) if rel[i])
    ap = ap / min(k, relevant) if min(k, relevant) else 0.0
    votes = {}
    for r in kept:
        votes[labels[r]] = votes.get(labels[r], 0) + 1
    top = max(votes.values()) if votes else 0
    winner = next((labels[r] for r in kept if votes[labels[r]] == top), None)
    return precision, ap, float(winner == labels[query])


def test_query_metrics_by_hand():
    assert query_metrics("a", ["a", "b", "a", "b", "b"], relevant_available=4, k=5) == pytest.approx(
        (0.4, (1 + 2 / 3) / 4, 0.0))
    assert query_metrics("a", ["b", "a", "a"], relevant_available=2, k=5) == pytest.approx((0.4, (1 / 2 + 2 / 3) / 2, 1.0))
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
    path = random_store(n=n, seed=61, clusters=3, sketch_dim=5, duplicate_rows=3,
                        extra_columns={"diagnosis": labels, "patient_id": groups})
    retriever = Retriever.open(path, device="cpu")
    report = evaluate(retriever, "diagnosis", group_column="patient_id" if use_groups else None,
                      k=5, queries=15, seed=4, bootstrap=200)
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
            np.testing.assert_allclose(report.per_query[m][name], expected[name], err_msg=f"{m} {name}")
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
    result = runner.invoke(main, ["evaluate", str(indexed_store), "--label-column", "texture", "--queries", "12",
                                  "--plot", str(plot), "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[2:11]] == list(MEASURES)  # Table 1 order
    assert plot.stat().st_size > 10_000
    payload = json.loads(runner.invoke(main, ["evaluate", str(indexed_store), "--label-column", "texture",
                                              "--all", "--json", "--bootstrap", "50"]).stdout)
    assert payload["queries"] == 32 and set(payload["metrics"]) == set(MEASURES)
    bad = runner.invoke(main, ["evaluate", str(indexed_store), "--label-column", "nope"])
    assert bad.exit_code == 1 and "no metadata column 'nope'" in bad.output


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_judge_round_trip_blinded_and_scored(indexed_store, tmp_path):
    retriever = Retriever.open(indexed_store, device="cpu")
    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=6, seed=2, k=5)
    texture = dict(zip(retriever.image_ids, [i.split("_")[1] for i in retriever.image_ids]))

    # blinding: nothing the judge sees names a measure or a row
    tasks_text = (out / "tasks.json").read_text()
    server = judge.serve(out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        page = _get(base + "/")[1].decode()
        served_tasks = _get(base + "/tasks")[1].decode()
        page_text = page.lower().replace("<style>", "").replace("</style>", "")  # the HTML tag
        for text in (tasks_text.lower(), served_tasks.lower(), page_text):
            for word in list(MEASURES) + ["euclid", "cosine", "style", "dice", "i1"]:
                assert word not in text, word
        for text in (tasks_text, served_tasks):
            assert '"row"' not in text and "image_id" not in text and "SYN_" not in text
        tasks = json.loads(tasks_text)
        key = json.loads((out / "key.json").read_text())
        # each query's pool holds every measure's results once, in shuffled order
        shuffled = 0
        for t, q in zip(tasks["queries"], key["queries"]):
            pooled = set(t["items"])
            assert pooled == {tok for ranking in q["rankings"].values() for tok in ranking}
            assert len(t["items"]) == len(pooled)  # an image returned by several measures is judged once
            first_seen = list(dict.fromkeys(tok for m in MEASURES for tok in q["rankings"][m]))
            by_row = sorted(t["items"], key=lambda tok: q["items"][tok])
            shuffled += t["items"] != first_seen and t["items"] != by_row
        assert shuffled >= len(tasks["queries"]) - 1  # neither measure order nor row order leaks
        status, body = _get(base + "/image/" + tasks["queries"][0]["items"][0])
        assert status == 200 and body[:2] == b"\xff\xd8"
        for bad in ("/image/../../etc/passwd", "/image/0123456789abcdef", "/image/%2e%2e%2fkey.json"):
            with pytest.raises(urllib.error.HTTPError):
                _get(base + bad)
        assert server.server_address[0] == "127.0.0.1"

        # simulated judge: similar iff same texture; half the session, then "close the browser"
        def judge_query(t, q):
            for tok in t["items"]:
                row = q["items"][tok]
                similar = texture[retriever.image_ids[row]] == texture[q["image_id"]]
                assert _post(base + "/judge", {"query": t["query"], "item": tok, "similar": similar}) == 200

        for t, q in list(zip(tasks["queries"], key["queries"]))[:3]:
            judge_query(t, q)
        assert _post(base + "/judge", {"query": "Q001", "item": "nope", "similar": True}) == 400
        assert _post(base + "/judge", {"query": "Q001", "item": tasks["queries"][0]["items"][0],
                                       "similar": "yes"}) == 400
    finally:
        server.shutdown()
        server.server_close()
    partial = judge.score_session(out)
    assert partial.complete_queries == 3 and partial.total_queries == 6

    # a new server resumes from the saved clicks
    server = judge.serve(out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert len(json.loads(_get(base + "/tasks")[1])["judged"]) == sum(len(t["items"]) for t in tasks["queries"][:3])
        for t, q in list(zip(tasks["queries"], key["queries"]))[3:]:
            judge_query(t, q)
    finally:
        server.shutdown()
        server.server_close()
    score = judge.score_session(out)
    assert score.complete_queries == 6 and score.judged_items == score.total_items

    # simulated judgments by label reproduce precision@5 of the label evaluation
    rows = [q["row"] for q in key["queries"]]
    for m in MEASURES:
        precision = []
        for row in rows:
            hits = retriever.search(row, measures=m, k=5)[m]
            q_tex = texture[retriever.image_ids[row]]
            precision.append(sum(texture[h.image_id] == q_tex for h in hits) / 5)
        assert score.success[m] == pytest.approx(100 * np.mean(precision))

    result = CliRunner().invoke(main, ["judge", "--score", str(out)])
    assert result.exit_code == 0 and "61.20%" in result.output and "6 of 6 queries" in result.output


def test_judge_cli_prepare_only(indexed_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "s"
    result = runner.invoke(main, ["judge", str(indexed_store), "--out", str(out), "--queries", "3", "--no-serve"])
    assert result.exit_code == 0 and (out / "tasks.json").is_file()
    again = runner.invoke(main, ["judge", "--score", str(out), "--json"])
    payload = json.loads(again.stdout)
    assert payload["complete_queries"] == 0 and payload["paper_table1_percent"]["style"] == 61.2


def test_judge_server_refuses_foreign_hosts_deep_json_and_stalled_bodies(indexed_store, tmp_path):
    import http.client
    import socket
    import time

    retriever = Retriever.open(indexed_store, device="cpu")
    out = tmp_path / "session"
    judge.prepare_session(retriever, out, queries=2, seed=1, k=3)
    server = judge.serve(out, port=0, request_timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        def request(method, path, body=None, headers=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()

        assert request("GET", "/tasks")[0] == 200
        assert request("GET", "/tasks", headers={"Host": "evil.example"})[0] == 403  # DNS rebinding
        assert request("GET", "/tasks", headers={"Host": f"localhost:{port}"})[0] == 200
        body = json.dumps({"query": "Q001", "item": "x", "similar": True})
        assert request("POST", "/judge", body, {"Origin": "http://evil.example",
                                                "Content-Type": "application/json"})[0] == 403
        assert request("POST", "/judge", "[" * 2000 + "]" * 2000)[0] == 400  # nested beyond recursion
        # a body shorter than its Content-Length: the server drops the client, and stays up
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /judge HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100\r\n\r\n{" % port)
            started = time.monotonic()
            sock.settimeout(5)
            assert sock.recv(1024) in (b"",) or True
            assert time.monotonic() - started < 4
        assert request("GET", "/tasks")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    score = judge.score_session(out)
    result = CliRunner().invoke(main, ["judge", "--score", str(out), "--json"])
    payload = json.loads(result.stdout)  # valid JSON before any judgment: no NaN
    assert all(v is None for v in payload["success_rate_percent"].values()) and score.complete_queries == 0
