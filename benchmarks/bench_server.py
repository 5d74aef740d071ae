"""Load test of ``dermris serve`` on the loopback address: requests per second and latency.

Starts ``dermris serve`` in its own process over a store built from real pixels (scikit-image
photographs, lite0 ImageNet weights), then for each kind of request runs ``--clients``
concurrent clients for ``--seconds``: row queries (all nine measures, k=5, a random stored row)
and image queries (an uploaded JPEG of the photo set, all nine measures, k=5, embedded by the
server). Every answer must be 200 with nine result lists; any error is counted and reported.
Writes JSON and prints a table. Binds 127.0.0.1 only.

With ``--workers 1,2`` it compares the row-query throughput of ``dermris serve --workers N``
over a random store of ``--rows`` rows instead (``results/server-workers.json``).

Examples
--------
::

    python benchmarks/bench_server.py --rows 3000 --clients 8 --seconds 30
    python benchmarks/bench_server.py --workers 1,2 --rows 20000 --clients 8 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stores import photo_store  # noqa: E402

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(store: Path, port: int, workers: int = 1) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from dermris.app.cli import main; main()",
            "serve",
            str(store),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--workers",
            str(workers),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited: " + process.stderr.read().decode()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start in 300 s")


def _load(base: str, make_request, *, clients: int, seconds: float, seed: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        rng = random.Random(seed + n)
        with httpx.Client(base_url=base, timeout=120) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    response = make_request(http, rng)
                    ok = response.status_code == 200 and len(response.json()["results"]) == 9
                    problem = None if ok else f"{response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    problem = repr(exc)
                elapsed = time.perf_counter() - started
                with lock:
                    (errors.append(problem) if problem else latencies.append(elapsed))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    latencies.sort()

    def pick(q: float) -> float:  # the q-quantile latency; only called when there are latencies
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": wall,
        "requests_per_second": len(latencies) / wall,
        "p50_ms": 1e3 * pick(0.50) if latencies else None,
        "p95_ms": 1e3 * pick(0.95) if latencies else None,
        "mean_ms": 1e3 * statistics.fmean(latencies) if latencies else None,
    }


def compare_workers(args) -> None:
    """Row-query throughput of ``dermris serve --workers N`` for each N of ``--workers``, over
    one store (a random store of ``--rows`` rows: no model, so the figures are the server's
    and the search's own)."""
    import httpx

    from stores import random_store

    store = random_store(
        args.workdir / f"random-{args.rows}", args.rows, seed=args.seed, channels=(16, 24, 32)
    )
    results = {}
    for workers in args.workers:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        server = _start_server(store, port, workers=workers)
        try:
            rows = httpx.get(base + "/api/info").json()["rows"]

            def row_query(http, rng, rows=rows):
                return http.post("/api/search", data={"row": rng.randrange(rows), "k": 5})

            for warm in range(4 * workers):
                row_query(httpx.Client(base_url=base, timeout=120), random.Random(warm))
            results[str(workers)] = _load(
                base, row_query, clients=args.clients, seconds=args.seconds, seed=args.seed
            )
        finally:
            server.terminate()
            server.wait(30)
    one = results.get("1", {}).get("requests_per_second")
    run = {
        "store": {"rows": args.rows, "source": "random rows (benchmarks/stores.py), no model"},
        "query": "row queries, all nine measures, k=5",
        "clients": args.clients,
        "seconds_per_setting": args.seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "speedup": {w: r["requests_per_second"] / one for w, r in results.items()} if one else {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=1))
    print(
        f"dermris serve --workers N, {args.rows} random rows, row queries (nine measures, k=5), "
        f"{args.clients} clients x {args.seconds:.0f} s, {os.cpu_count()} CPUs"
    )
    print(f"{'workers':<9}{'requests':>9}{'errors':>8}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for w, r in results.items():
        p50 = f"{r['p50_ms']:9.1f}" if r["p50_ms"] is not None else f"{'-':>9}"
        p95 = f"{r['p95_ms']:9.1f}" if r["p95_ms"] is not None else f"{'-':>9}"
        print(f"{w:<9}{r['requests']:>9}{r['errors']:>8}{r['requests_per_second']:8.1f}{p50}{p95}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("DERMRIS_BENCH_DIR", "/tmp/dermris-bench")),
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--workers",
        type=lambda text: [int(w) for w in text.split(",")],
        default=None,
        help="Compare row-query throughput of these worker counts, e.g. 1,2 "
        "(writes results/server-workers.json)",
    )
    args = parser.parse_args()
    if args.workers:
        args.out = args.out or HERE / "results" / "server-workers.json"
        compare_workers(args)
        return
    args.out = args.out or HERE / "results" / "server.json"

    store = photo_store(args.workdir / f"photo-lite0-{args.rows}", args.rows, workdir=args.workdir)
    images = sorted((args.workdir / "photos-320-0").glob("*.jpg"))[:50]
    uploads = [p.read_bytes() for p in images]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _start_server(store, port)
    try:
        import httpx

        info = httpx.get(base + "/api/info").json()
        rows = info["rows"]

        def row_query(http, rng):
            return http.post("/api/search", data={"row": rng.randrange(rows), "k": 5})

        def image_query(http, rng):
            i = rng.randrange(len(uploads))
            return http.post(
                "/api/search",
                data={"k": 5},
                files={"file": (f"q{i}.jpg", uploads[i], "image/jpeg")},
            )

        for warm in range(3):  # model loaded and caches warm before timing
            row_query(httpx.Client(base_url=base, timeout=120), random.Random(warm))
            image_query(httpx.Client(base_url=base, timeout=120), random.Random(warm))
        results = {
            name: _load(base, request, clients=args.clients, seconds=args.seconds, seed=args.seed)
            for name, request in (("row queries", row_query), ("image queries", image_query))
        }
    finally:
        server.terminate()
        server.wait(30)
    run = {
        "store": {
            "rows": rows,
            "preset": info["preset"],
            "source": "photo (scikit-image photographs)",
        },
        "clients": args.clients,
        "seconds_per_kind": args.seconds,
        "k": 5,
        "measures": 9,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=1))
    print(
        f"dermris serve, {rows} rows ({info['preset']}), "
        f"{args.clients} clients x {args.seconds:.0f} s, "
        f"all nine measures, k=5, {os.cpu_count()} CPUs"
    )
    print(f"{'kind':<15}{'requests':>9}{'errors':>8}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for name, r in results.items():
        p50 = f"{r['p50_ms']:9.0f}" if r["p50_ms"] is not None else f"{'-':>9}"
        p95 = f"{r['p95_ms']:9.0f}" if r["p95_ms"] is not None else f"{'-':>9}"
        print(
            f"{name:<15}{r['requests']:>9}{r['errors']:>8}{r['requests_per_second']:8.2f}{p50}{p95}"
        )


if __name__ == "__main__":
    main()
