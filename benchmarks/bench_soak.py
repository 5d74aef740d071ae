"""Soak test of ``dermris serve`` beside writers: appends, deletions and compactions by another
process while clients search, every answer checked against the brute force of the store state
it came from.

A random store (no model) is served by ``dermris serve`` in its own process. A writer (this
process, through the library's StoreWriter, as ``dermris index``/``delete``/``compact`` would)
appends rows, deletes rows and compacts for ``--minutes`` while ``--clients`` clients search by
random stored rows (all nine measures, k=5). Before each compaction (and at the end) the writer
archives the generation's files; an answer names its ``generation``, its row count
(``stats.rows``) and how many deletions it honoured (``deleted``), which fixes the store state it
came from. Afterwards answers are checked against ``tests/reference.py`` (an independent float64
brute force) over that state: every answer of every generation, up to ``--verify`` answers
sampled evenly.

Counted: errors (5xx, connection errors, 409 "being compacted"), refusals that are correct
answers (400/404 for a row deleted or renumbered meanwhile), disagreements with the brute force.

Examples
--------
::

    nice python benchmarks/bench_soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from dermris.core import StyleLayout  # noqa: E402
from dermris.indexer import StoreWriter  # noqa: E402
from dermris.indexer.store import Store, compact  # noqa: E402
from dermris.models import get_preset  # noqa: E402

from reference import NAMES, brute_force, load_store, row_query  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Rows:
    """Random rows of one shape (tiny preset's, 32 x 32 masks)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.layout = StyleLayout.from_channels((2, 3, 4))
        self.config = get_preset("tiny").replace(feature_dim=6, image_size=32)
        self.next_id = 0

    def batch(self, n: int) -> dict:
        ids = [f"SOAK_{self.next_id + i:06d}" for i in range(n)]
        self.next_id += n
        scale = np.repeat(10.0 ** np.array([-1.0, 0.0, 1.0]), self.layout.lengths)
        return {
            "features": self.rng.normal(size=(n, 6)).astype(np.float32),
            "style": (self.rng.normal(size=(n, self.layout.dim)) * scale).astype(np.float32),
            "masks": self.rng.random((n, 32, 32)) < self.rng.uniform(0.05, 0.5, (n, 1, 1)),
            "records": pa.table(
                {
                    "image_id": pa.array(ids),
                    "path": pa.array([f"synthetic://{i}" for i in ids]),
                    "sha256": pa.array([f"{self.next_id - n + i:064x}" for i in range(n)]),
                    "width": pa.array([32] * n, pa.int32()),
                    "height": pa.array([32] * n, pa.int32()),
                }
            ),
        }


def _archive(store: Path, archive: Path) -> str:
    """Copy the store's current generation (manifest, arrays, metadata) under ``archive``."""
    generation = Store.open(store).manifest.generation or ""
    target = archive / generation
    if target.exists():
        shutil.rmtree(target)
    # the whole store (the manifest is its commit): the reader's own view of this generation
    shutil.copytree(store, target, ignore=shutil.ignore_patterns(".writer.lock", ".compact"))
    return generation


def _writer(store: Path, archive: Path, rows: Rows, stop: threading.Event, log: Counter, args):
    rng = random.Random(args.seed)
    last_compaction = time.monotonic()
    while not stop.wait(args.write_every):
        writer = StoreWriter.open(store)
        try:
            reader = writer.reader()
            live = [int(r) for r in np.flatnonzero(reader.live)]
            if time.monotonic() - last_compaction > args.compact_every and reader.deleted_rows.size:
                _archive(store, archive)
                compact(writer)
                log["compactions"] += 1
                last_compaction = time.monotonic()
            elif rng.random() < 0.5 and len(live) < args.max_rows:
                writer.append(**rows.batch(rng.randint(1, 12)))
                log["appends"] += 1
            elif len(live) > 20:
                meta = reader.metadata(columns=["image_id"]).column("image_id").to_pylist()
                victims = [meta[r] for r in rng.sample(live, rng.randint(1, 4))]
                writer.delete(victims)
                log["deletions"] += len(victims)
        finally:
            writer.close()


def _client(base: str, n: int, stop: threading.Event, out: list, lock: threading.Lock, seed):
    import httpx

    rng = random.Random(seed * 100 + n)
    rows = 1
    with httpx.Client(base_url=base, timeout=60) as http:
        while not stop.is_set():
            row = rng.randrange(max(1, rows))
            started = time.perf_counter()
            try:
                r = http.post("/api/search", data={"row": row, "k": 5, "measures": list(NAMES)})
                body = r.json()
            except (httpx.HTTPError, ValueError) as exc:
                entry = {"kind": "error", "detail": repr(exc)[:200]}
            else:
                if r.status_code == 200:
                    rows = body["stats"]["rows"]
                    entry = {
                        "kind": "answer",
                        "row": row,
                        "generation": body["generation"],
                        "rows": rows,
                        "deleted": body["deleted"],
                        "results": {
                            m: [(h["row"], h["score"]) for h in body["results"][m]] for m in NAMES
                        },
                    }
                elif r.status_code in (400, 404) and (
                    "deleted" in r.text or "out of range" in r.text
                ):
                    entry = {"kind": "refused"}
                    rows = max(1, rows // 2)
                else:
                    entry = {"kind": "error", "detail": f"{r.status_code}: {r.text[:200]}"}
            entry["seconds"] = time.perf_counter() - started
            with lock:
                out.append(entry)


def _state(data: dict, rows: int, deleted: int) -> dict | None:
    """The reference data of generation ``data`` at ``rows`` rows and ``deleted`` deletions."""
    honoured, count = set(), 0
    for row in data["deleted_order"]:
        if count == deleted:
            break
        if row < rows:
            honoured.add(row)
            count += 1
    if count != deleted:
        return None
    return {
        "n": rows,
        "features": data["features"][:rows],
        "style": data["style"][:rows],
        "masks": data["masks"][:rows],
        "deleted": honoured,
    }


def _agrees(answer: dict, state: dict) -> bool:
    expected = brute_force(state, *row_query(state, answer["row"]), exclude_row=answer["row"], k=5)
    for m in NAMES:
        got = answer["results"][m]
        if [r for r, _ in got] != [r for r, _ in expected[m]]:
            return False
        if not np.allclose([s for _, s in got], [s for _, s in expected[m]], rtol=1e-7, atol=1e-9):
            return False
    return True


def verify(answers: list[dict], archive: Path, limit: int, seed: int) -> dict:
    """Check answers (every generation's, up to ``limit`` in all) against the brute force."""
    by_generation = defaultdict(list)
    for a in answers:
        by_generation[a["generation"]].append(a)
    rng = random.Random(seed)
    share = max(1, limit // max(1, len(by_generation)))
    checked = disagreed = later = missing = controls = controls_caught = 0
    first = []
    for generation, group in by_generation.items():
        folder = archive / generation
        if not folder.is_dir():
            missing += len(group)
            continue
        data = load_store(folder)
        data["deleted_order"] = [d.row for d in Store.open(folder).manifest.deleted]
        # a negative control: an answer with two hits swapped must be caught
        control = json.loads(json.dumps(group[0]))
        hits = control["results"]["style"]
        if len(hits) >= 2 and hits[0][1] != hits[1][1]:
            hits[0], hits[1] = hits[1], hits[0]
            state = _state(data, control["rows"], control["deleted"])
            controls_caught += state is not None and not _agrees(control, state)
            controls += 1
        for answer in rng.sample(group, min(share, len(group))):
            checked += 1
            ok = False
            # the deletions a search honours are read as it starts: the answer's count, or one
            # committed in the instant between the count and the search
            for extra in range(3):
                state = _state(data, answer["rows"], answer["deleted"] + extra)
                if state is not None and _agrees(answer, state):
                    ok = True
                    later += extra > 0
                    break
            if not ok:
                disagreed += 1
                if len(first) < 3:
                    first.append({k: answer[k] for k in ("row", "generation", "rows", "deleted")})
    return {
        "checked": checked,
        "disagreed": disagreed,
        "agreed_with_a_deletion_committed_as_it_started": later,
        "answers_of_unarchived_generations": missing,
        "first_disagreements": first,
        "negative_controls": controls,
        "negative_controls_caught": controls_caught,
        "generations_answered": len(by_generation),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rows", type=int, default=300, help="rows to start with")
    parser.add_argument("--max-rows", type=int, default=700, help="live rows appends stop at")
    parser.add_argument("--write-every", type=float, default=0.5, help="seconds between writes")
    parser.add_argument("--compact-every", type=float, default=30.0, help="seconds")
    parser.add_argument("--verify", type=int, default=3000, help="answers checked at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("DERMRIS_BENCH_DIR", "/tmp/dermris-bench")) / "soak",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    store, archive = args.workdir / "store", args.workdir / "generations"
    archive.mkdir(parents=True)
    rows = Rows(args.seed)
    writer = StoreWriter.create(store, model_config=rows.config, style_layout=rows.layout)
    writer.append(**rows.batch(args.rows))
    writer.close()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
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
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise RuntimeError("the server exited: " + server.stderr.read().decode()[-2000:])
        try:
            httpx.get(base + "/api/health", timeout=2)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)

    stop = threading.Event()
    log: Counter = Counter()
    answers: list[dict] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_writer, args=(store, archive, rows, stop, log, args))]
    threads += [
        threading.Thread(target=_client, args=(base, n, stop, answers, lock, args.seed))
        for n in range(args.clients)
    ]
    began = time.monotonic()
    try:
        for t in threads:
            t.start()
        time.sleep(args.minutes * 60)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
        server.terminate()
        server.wait(30)
    wall = time.monotonic() - began
    _archive(store, archive)

    kinds = Counter(a["kind"] for a in answers)
    errors = [a["detail"] for a in answers if a["kind"] == "error"]
    found = [a for a in answers if a["kind"] == "answer"]
    latencies = sorted(a["seconds"] for a in found)
    checked = verify(found, archive, args.verify, args.seed)
    run = {
        "minutes": args.minutes,
        "seconds": wall,
        "clients": args.clients,
        "writes": dict(log),
        "requests": len(answers),
        "answers": kinds["answer"],
        "refused_deleted_or_renumbered_rows": kinds["refused"],
        "errors": kinds["error"],
        "first_errors": errors[:5],
        "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "verification": checked,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=1))
    v = checked
    print(
        f"soak: {args.minutes:g} min, {args.clients} clients, writer: {dict(log)}\n"
        f"{'requests':<34}{len(answers):>8}\n"
        f"{'answers':<34}{kinds['answer']:>8}\n"
        f"{'refused (row deleted/renumbered)':<34}{kinds['refused']:>8}\n"
        f"{'errors':<34}{kinds['error']:>8}\n"
        f"{'generations answered':<34}{v['generations_answered']:>8}\n"
        f"{'answers checked (brute force)':<34}{v['checked']:>8}\n"
        f"{'disagreeing with brute force':<34}{v['disagreed']:>8}\n"
        f"{'p50 / p99 ms':<34}{run['p50_ms'] or 0:>8.1f} / {run['p99_ms'] or 0:.1f}"
    )


if __name__ == "__main__":
    main()
