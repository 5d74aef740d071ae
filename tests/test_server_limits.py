"""Slow and hostile clients on a real socket: head and body deadlines, idle keep-alive, and a
connection cap that leaves room for the health check."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from dermris.app._limits import ServerLimits  # noqa: E402
from dermris.app.server import create_app  # noqa: E402

from live_server import free_port, live_server  # noqa: E402


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes | None = None) -> tuple:
    """Wait (trickling ``trickle`` every 0.2 s) until the server closes ``sock``; returns
    (seconds it took or None, what the server sent)."""
    started = time.monotonic()
    received = b""
    sock.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            chunk = sock.recv(4096)
            if not chunk:
                return time.monotonic() - started, received
            received += chunk
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started, received
        if trickle is not None:
            try:
                sock.sendall(trickle)
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - started, received
    return None, received


@pytest.fixture
def limited(random_store):
    store = random_store(n=20, seed=5)
    limits = ServerLimits(header_timeout=1.0, body_timeout=1.0, keep_alive=1.0)

    def make(port):
        return create_app(store, port=port, device="cpu", poll_seconds=0)

    with live_server(make, limits=limits) as base:
        yield base, int(base.rsplit(":", 1)[1])


def test_a_trickled_head_is_cut_off(limited):
    _, port = limited
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        took, sent = _closed_within(sock, 6.0, trickle=b"X-Slow: 1\r\n")
    assert took is not None and took < 3.0, "a trickling head held its connection"
    assert sent.startswith(b"HTTP/1.1 408")


def test_a_silent_connection_is_cut_off(limited):
    _, port = limited
    with socket.create_connection(("127.0.0.1", port)) as sock:
        took, _ = _closed_within(sock, 6.0)
    assert took is not None and took < 3.0


def test_a_body_that_never_arrives_is_cut_off(limited):
    _, port = limited
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 5000\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n--xyz\r\n".encode()
        )
        took, _ = _closed_within(sock, 6.0)
    assert took is not None and took < 3.0, "a POST without its body held its connection"


def test_idle_keep_alive_is_closed_and_requests_still_work(limited):
    base, port = limited
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        took, sent = _closed_within(sock, 6.0)
    assert b"200 OK" in sent and took is not None and took < 3.0
    # a slow but honest client (head in pieces within the deadline) is answered
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for part in (b"GET /api/health HTTP/1.1\r\n", f"Host: 127.0.0.1:{port}\r\n\r\n".encode()):
            sock.sendall(part)
            time.sleep(0.3)
        assert b'"status":"ok"' in sock.recv(4096)
    assert httpx.get(f"{base}/api/health").json()["status"] == "ok"


SERVER = """
import sys
from dermris.app._limits import ServerLimits
from dermris.app.server import serve
serve(sys.argv[1], port=int(sys.argv[2]), device="cpu",
      limits=ServerLimits(header_timeout=120, max_connections=1000))
"""


def _file_limit(n: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return limit


@pytest.mark.slow
def test_health_answers_beside_hundreds_of_stalled_connections(random_store):
    """The server process may open 320 files; 600 clients trickle their heads: the oldest
    stalled connections are dropped to let the health check in."""
    store = random_store(n=20, seed=6)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(store), str(port)],
        preexec_fn=_file_limit(320),
        stderr=subprocess.DEVNULL,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    stalled = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server exited"
            try:
                httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        for _ in range(600):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /api/health HTTP/1.1\r\nX-Slow: 1\r\n")
            stalled.append(sock)
        time.sleep(1.0)
        started = time.monotonic()
        answer = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=20)
        assert answer.status_code == 200 and time.monotonic() - started < 15
    finally:
        for sock in stalled:
            sock.close()
        server.kill()
        server.wait(20)


def test_requests_beyond_the_cap_get_503_but_health_answers(random_store):
    import threading

    from fastapi.testclient import TestClient

    store = random_store(n=10, seed=7)
    app = create_app(store, device="cpu", poll_seconds=0, max_requests=2)
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    answers = []

    def explain():
        answers.append(client.get("/api/explain", params={"a": 1, "b": 2}).status_code)

    with app.state.follow.lock:  # two searches wait for the lock: the cap is reached
        waiting = [threading.Thread(target=explain) for _ in range(2)]
        for t in waiting:
            t.start()
        time.sleep(2.0)  # both are in progress, waiting for the lock
        assert client.get("/api/explain", params={"a": 1, "b": 2}).status_code == 503
        busy = client.get("/api/info")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert client.get("/api/health").json()["status"] == "ok"
        assert client.get("/metrics").status_code == 200
    for t in waiting:
        t.join(20)
    assert answers == [200, 200]
    assert client.get("/api/explain", params={"a": 1, "b": 2}).status_code == 200
