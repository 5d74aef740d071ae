"""How long the store commands take as whole processes: start-up (imports) plus the answer.

Times ``dermris info STORE``, ``dermris check STORE`` and ``dermris search STORE --row 0
--measure cosine`` (and ``dermris --help``), alternating runs of this checkout's command with
a baseline's (another install of dermris, e.g. an older checkout's ``.venv/bin/dermris``), so
both see the same machine load. Writes JSON and prints a table of medians.

``index-first-progress`` is the time from starting ``dermris index IMAGES NEW_STORE`` to its
first line on stderr (the process is stopped there; each run indexes into a new store).

Example (the README's figures)::

    python benchmarks/bench_startup.py --baseline /path/to/old/.venv/bin/dermris --repeats 9

The store is made once with the tiny preset on 32 synthetic lesions (``--store`` to use
another); it carries its model, as a real store does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

COMMANDS = {
    "help": ["--help"],
    "info": ["info", "{store}"],
    "check": ["check", "{store}"],
    "search --row (cosine)": ["search", "{store}", "--row", "0", "--measure", "cosine"],
}


def _make_store(folder: Path) -> Path:
    from dermris.indexer import index_folder
    from dermris.indexer.synthetic import write_synthetic_set

    csv = write_synthetic_set(folder / "data", per_class=8, size=160)
    store = folder / "store"
    index_folder(
        folder / "data" / "images", store, preset="tiny", metadata=csv, progress=False, device="cpu"
    )
    return store


FIRST_LINE_CASES = {
    "index-first-progress": ["index", "{images}", "{fresh_store}", "--device", "cpu"],
}


def _first_stderr_line(argv: list[str]) -> float:
    """Seconds from starting ``argv`` to its first non-blank output on stderr; then stopped."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    assert proc.stderr is not None
    try:
        while True:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                raise SystemExit(f"{' '.join(argv)} ended without a line on stderr")
            if chunk.strip():
                return time.perf_counter() - started
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _time(argv: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dermris",
        default=shutil.which("dermris") or "dermris",
        help="The command to measure (default: dermris on PATH).",
    )
    parser.add_argument("--baseline", help="Another dermris command to measure beside it.")
    parser.add_argument("--store", type=Path, help="A store to use (default: a new tiny store).")
    parser.add_argument(
        "--images", type=Path, help="Images for index-first-progress (default: synthetic)."
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or _make_store(Path(tmp))
        commands = {"this": args.dermris}
        if args.baseline:
            commands["baseline"] = args.baseline
        images = args.images or Path(tmp) / "data" / "images"
        if not images.is_dir():
            from dermris.indexer.synthetic import write_synthetic_set

            write_synthetic_set(images.parent, per_class=8, size=160)
        labels = [*COMMANDS, *FIRST_LINE_CASES]
        runs: dict[str, dict[str, list[float]]] = {
            name: {c: [] for c in labels} for name in commands
        }
        fresh = 0
        for _ in range(args.repeats):
            for label, argv in COMMANDS.items():
                for name, binary in commands.items():  # alternating: both see the same load
                    runs[name][label].append(
                        _time([binary, *(a.format(store=store) for a in argv)])
                    )
            for label, argv in FIRST_LINE_CASES.items():
                for name, binary in commands.items():
                    fresh += 1
                    target = Path(tmp) / f"fresh-{fresh}"
                    runs[name][label].append(
                        _first_stderr_line(
                            [
                                binary,
                                *(
                                    a.format(store=store, images=images, fresh_store=target)
                                    for a in argv
                                ),
                            ]
                        )
                    )
    table = {
        name: {label: statistics.median(v) for label, v in per.items()}
        for name, per in runs.items()
    }
    payload = {
        "repeats": args.repeats,
        "commands": commands,
        "median_seconds": table,
        "runs": runs,
        "python": sys.version.split()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    names = list(commands)
    print(
        f"{'command':<24}"
        + "".join(f"{n:>12}" for n in names)
        + ("   ratio" if len(names) == 2 else "")
    )
    for label in labels:
        cells = "".join(f"{table[n][label]:>11.3f}s" for n in names)
        ratio = (
            f"   {table['baseline'][label] / table['this'][label]:.1f}x" if len(names) == 2 else ""
        )
        print(f"{label:<24}{cells}{ratio}")
    print(f"medians of {args.repeats} alternating runs; JSON: {args.out}")


if __name__ == "__main__":
    main()
