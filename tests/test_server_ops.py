"""Operations: /metrics in the Prometheus text format and the audit log of searches."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dermris.app._ops import AuditLog, Metrics  # noqa: E402
from dermris.app.server import create_app  # noqa: E402

BASE = "http://127.0.0.1:8000"


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_latencies_per_measure_and_the_store(random_store, tmp_path):
    store = random_store(n=30, seed=11)
    app = create_app(store, device="cpu", poll_seconds=0, metrics_dir=tmp_path / "m")
    (tmp_path / "m").mkdir()
    client = TestClient(app, base_url=BASE)
    for row in (1, 2, 3):
        ok = client.post("/api/search", data={"row": row, "measures": ["style", "i1_sd"], "k": 3})
        assert ok.status_code == 200
    assert client.get("/api/explain", params={"a": 1, "b": 99}).status_code == 404
    generation = client.get("/api/health").json()["generation"]
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(response.text)
    assert samples['dermris_requests_total{method="POST",route="/api/search",status="200"}'] == 3
    assert samples['dermris_requests_total{method="GET",route="/api/explain",status="404"}'] == 1
    assert samples['dermris_searches_total{kind="row"}'] == 3
    for m in ("style", "i1_sd"):
        assert samples[f'dermris_search_measure_seconds_count{{measure="{m}"}}'] == 3
        assert samples[f'dermris_search_measure_seconds_bucket{{measure="{m}",le="+Inf"}}'] == 3
        assert samples[f'dermris_search_measure_seconds_sum{{measure="{m}"}}'] > 0
    assert 'dermris_search_measure_seconds_count{measure="euclidean"}' not in samples
    assert samples['dermris_request_seconds_count{route="/api/search"}'] == 3
    assert samples["dermris_store_rows"] == 30 and samples["dermris_store_live_rows"] == 30
    assert samples[f'dermris_store_generation{{generation="{generation}"}}'] == 1
    assert "# TYPE dermris_request_seconds histogram" in response.text


def test_metrics_of_workers_are_summed(tmp_path):
    one, two = Metrics(tmp_path), Metrics(tmp_path)
    two._mine = tmp_path / "worker-other.json"  # another process
    one.count("dermris_requests_total", {"route": "/x"}, 2)
    two.count("dermris_requests_total", {"route": "/x"}, 3)
    two.render({})
    assert _samples(one.render({}))['dermris_requests_total{route="/x"}'] == 5


def test_audit_log_of_searches(random_store, tmp_path):
    store = random_store(n=12, seed=12)
    log = tmp_path / "audit.jsonl"
    app = create_app(store, device="cpu", poll_seconds=0, token="s3cret", audit_log=log)
    client = TestClient(app, base_url=BASE)
    auth = {"Authorization": "Bearer s3cret"}
    r = client.post(
        "/api/search",
        data={"row": 2, "measures": ["style"], "k": 2, "where": "width == 32"},
        headers=auth,
    )
    assert r.status_code == 200
    assert client.post("/api/search", data={"row": 99}, headers=auth).status_code == 400
    data = b"not an image"
    bad = client.post("/api/search", files={"file": ("q.png", data, "image/png")}, headers=auth)
    assert bad.status_code == 400
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["status"] == 200 and first["row"] == 2 and first["measures"] == ["style"]
    assert first["where"] == "width == 32" and first["k"] == 2 and first["client"]
    assert first["generation"] == client.get("/api/health", headers=auth).json()["generation"]
    assert first["token_id"] == hashlib.sha256(b"s3cret").hexdigest()[:16]
    assert "s3cret" not in log.read_text()
    assert lines[1]["status"] == 400 and lines[1]["row"] == 99
    assert lines[2]["upload_sha256"] == hashlib.sha256(data).hexdigest()
    assert lines[2]["row"] is None and lines[2]["status"] == 400
    assert "T" in first["time"] and first["time"].endswith("+00:00")


def test_audit_log_rotates_by_size(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", max_bytes=300, keep=2)
    for i in range(20):
        log.write({"i": i, "pad": "x" * 40})
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    kept = []
    for name in ("a.jsonl.2", "a.jsonl.1", "a.jsonl"):
        kept += [json.loads(x)["i"] for x in (tmp_path / name).read_text().splitlines()]
    assert kept == list(range(20 - len(kept), 20))  # the newest lines, in order
    assert all((tmp_path / n).stat().st_size <= 300 for n in names)
    assert oct((tmp_path / "a.jsonl").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_serve_with_two_workers_answers_and_sums_metrics(random_store):
    import subprocess
    import sys
    import time

    import httpx

    from live_server import free_port

    store = random_store(n=40, seed=13)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from dermris.app.cli import main; main()", "serve", str(store)]
        + ["--port", str(port), "--device", "cpu", "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server exited"
            try:
                httpx.get(base + "/api/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        for row in range(12):
            r = httpx.post(base + "/api/search", data={"row": row, "k": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["generation"]
        time.sleep(2.5)  # every worker publishes its figures each second
        samples = _samples(httpx.get(base + "/metrics").text)
        assert samples['dermris_searches_total{kind="row"}'] == 12
    finally:
        server.terminate()
        server.wait(30)
