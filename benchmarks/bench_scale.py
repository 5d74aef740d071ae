"""Exact retrieval at archive scale against brute force, on stores of real pixels.

For each store (``scale_stores.py``: ~3k, ~20k, ~100k variations of real photographs indexed
with the lite0 preset) and each query (a stored row), in one run and interleaved query by
query so both see the same machine:

* the :class:`~dermris.retriever.Retriever`: every measure alone and all nine in one call,
  k = 5 and 50, unfiltered and filtered (``diagnosis_1 == 'melanoma'``), with what each query
  cost and which path it took (rows read, scans, rows scored exactly);
* **the in-RAM float32 brute force of the scans each measure needs**: the features (one
  float32 product), the style rows (held in memory as float32, one float32 product), the
  masks (popcounts), the normalisers, the ranking — timed pass by pass, so a measure is
  charged the passes it needs (``i1_sd``: style and masks). Only where the float32 style
  array fits in memory (it takes 4 x the float16 store);
* **the streaming brute force**: the same, reading the style rows from the store block by
  block (its float16 decoding is the store's own fast one) instead of holding them.

It also records the Retriever's memory (bytes per row and the fixed basis; the process' RSS),
checks on a few queries that its answers equal an exact float64 brute force, and measures
batch throughput (queries/s for batches of 1, 8 and 64). The first search of the fresh
retriever is recorded apart (``first_search_seconds``) and is not among the timed queries.
Stores too large for the in-RAM brute force get ``--large-queries`` queries (each streams the
whole store twice for the brute force). Writes JSON, prints a table and draws latency against
the number of rows (PNG).

Example::

    python benchmarks/bench_scale.py --root /data/dermris-bench --queries 20
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import nine_scores  # noqa: E402

from dermris.indexer import Store  # noqa: E402
from dermris.retriever import MEASURE_COMPONENTS, MEASURES, Retriever  # noqa: E402
from dermris.retriever.measures import rank  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FILTER = "diagnosis_1 == 'melanoma'"
PASSES = {"es": "features", "cs": "features", "ss": "style", "dc": "masks"}


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _memory_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class BruteForce:
    """A plain NumPy brute force: every row scored, pass by pass (float32 products)."""

    def __init__(self, store: Store, *, in_ram: bool) -> None:
        self.store = store
        self.n = store.rows
        self.features = store.features()
        self.feature_sq = np.einsum("ij,ij->i", self.features, self.features)
        self.masks = store.masks()
        self.areas = store.mask_areas().astype(np.float64)
        self.style: np.ndarray | None = None
        self.style_sq: np.ndarray | None = None
        if in_ram:
            self.style = np.empty((self.n, store.style_dim), np.float32)
            self.style_sq = np.empty(self.n, np.float32)
            for start, block in store.iter_style_blocks():
                self.style[start : start + len(block)] = block
                self.style_sq[start : start + len(block)] = np.einsum("ij,ij->i", block, block)
        self.live = store.live

    def features_pass(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dots = self.features @ q
        qsq = float(q @ q)
        ed = np.sqrt(np.maximum(self.feature_sq + qsq - 2 * dots, 0))
        denom = np.sqrt(self.feature_sq * qsq)
        cos = np.where(denom > 0, dots / np.where(denom > 0, denom, 1), 0.0)
        return 1 - ed / max(float(ed[self.live].max()), 1e-300), (np.clip(cos, -1, 1) + 1) / 2

    def style_pass(self, q: np.ndarray) -> np.ndarray:
        qsq = float(q.astype(np.float64) @ q)
        if self.style is not None:
            ls = self.style_sq + qsq - 2 * (self.style @ q)
        else:  # streaming: the store's blocks, decoded, one product each
            ls = np.empty(self.n, np.float32)
            for start, block in self.store.iter_style_blocks():
                ls[start : start + len(block)] = (
                    np.einsum("ij,ij->i", block, block) + qsq - 2 * (block @ q)
                )
        ls = np.maximum(ls, 0)
        return 1 - ls / max(float(ls[self.live].max()), 1e-300)

    def masks_pass(self, mask: np.ndarray, area: float) -> np.ndarray:
        inter = np.bitwise_count(self.masks & mask).sum(axis=1, dtype=np.int64)
        total = self.areas + area
        return np.where(total > 0, 2 * inter / np.where(total > 0, total, 1), 1.0)

    def query(self, row: int, measures, k: int, allowed: np.ndarray) -> dict[str, float]:
        """Seconds of each pass and of the ranking for ``row`` (the answers are not kept)."""
        q_feat = self.features[row]
        q_style = self.store.style_rows([row])[0]
        seconds = {}
        comps = {}
        t = time.perf_counter()
        comps["es"], comps["cs"] = self.features_pass(q_feat)
        seconds["features"] = time.perf_counter() - t
        t = time.perf_counter()
        comps["ss"] = self.style_pass(q_style)
        seconds["style"] = time.perf_counter() - t
        t = time.perf_counter()
        comps["dc"] = self.masks_pass(self.masks[row], float(self.areas[row]))
        seconds["masks"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = nine_scores(comps["es"], comps["cs"], comps["ss"], comps["dc"])
        rows = np.flatnonzero(allowed)
        for m in measures:
            rank(scores[m][rows], k, rows=rows)
        seconds["rank"] = (time.perf_counter() - t) / len(measures)
        return seconds

    def seconds_for(self, passes: dict[str, float], measures) -> float:
        """The time of the passes ``measures`` need, plus their ranking."""
        needed = {PASSES[c] for m in measures for c in MEASURE_COMPONENTS[m]}
        return sum(passes[p] for p in needed) + passes["rank"] * len(measures)


def _exact_brute(store: Store, row: int, k: int) -> dict[str, list[tuple[int, float]]]:
    """The exact (float64) answer, for the equality check."""
    from bench_retrieval import brute_force

    return brute_force(store, row, k)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_store(path: Path, *, queries: int, large_queries: int, seed: int, check: int) -> dict:
    store = Store.open(path)
    n = store.rows
    style_f32 = n * store.style_dim * 4
    in_ram = style_f32 < 0.6 * _memory_bytes()
    if not in_ram:  # every query then streams the whole store two times for the brute force
        queries = min(queries, large_queries)
    gc.collect()
    rss0 = _rss()
    t = time.perf_counter()
    retriever = Retriever.open(path, device="cpu")
    open_s = time.perf_counter() - t
    rss1 = _rss()
    index = retriever._index
    info = {
        "rows": n,
        "style_dim": store.style_dim,
        "style_bytes": n * store.style_row_bytes,
        "open_seconds": open_s,
        "resident_bytes": retriever.resident_bytes,
        "bytes_per_row": index.row_nbytes(),
        "fixed_basis_bytes": index.fixed_nbytes(),
        "rss_delta_bytes": rss1 - rss0,
        "style_mapped": index.style.in_memory,
        "cost_model": dataclasses.asdict(index.cost),
    }
    basis = info["fixed_basis_bytes"] / 2**20
    where = "mapped" if info["style_mapped"] else "read from disk"
    print(
        f"\n{path.name}: {n} rows, {info['bytes_per_row']} B/row + {basis:.0f} MiB basis; "
        f"open {open_s:.1f} s; style {where}",
        flush=True,
    )
    brutes = {"in_ram": BruteForce(store, in_ram=True)} if in_ram else {}
    brutes["streaming"] = brutes.get("in_ram") or BruteForce(store, in_ram=False)
    if "in_ram" in brutes:  # the streaming one reads the store instead of the array it holds
        brutes["streaming"] = BruteForce.__new__(BruteForce)
        brutes["streaming"].__dict__.update(brutes["in_ram"].__dict__, style=None, style_sq=None)
    rng = np.random.default_rng(seed)
    live = np.flatnonzero(store.live)
    picked = rng.choice(live, size=min(queries + 1, len(live)), replace=False)
    rows = [int(r) for r in picked[1:]] or [int(picked[0])]
    allowed_all = store.live
    configs = [(m,) for m in MEASURES] + [tuple(MEASURES)]
    # the first search of a fresh retriever (thread pool, first touch of its arrays), on a
    # row outside the timed ones, is recorded apart; one more (filtered, k = 50) is untimed
    t = time.perf_counter()
    retriever.search(int(picked[0]), measures=MEASURES, k=5)
    info["first_search_seconds"] = time.perf_counter() - t
    retriever.search(int(picked[0]), measures=MEASURES, k=50, where=FILTER)
    ours: dict[str, list[float]] = {}
    paths: dict[str, list[dict]] = {}
    brute: dict[str, dict[str, list[float]]] = {name: {} for name in brutes}
    for i, row in enumerate(rows):
        passes = {
            name: {kk: b.query(row, MEASURES, kk, allowed_all) for kk in (5, 50)}
            for name, b in brutes.items()
        }
        for measures in configs:
            for k in (5, 50):
                for filtered in (False, True):
                    name = "all" if len(measures) > 1 else measures[0]
                    key = f"{name}|k={k}|{'filtered' if filtered else 'all rows'}"
                    t = time.perf_counter()
                    result = retriever.search(
                        row, measures=measures, k=k, where=FILTER if filtered else None
                    )
                    ours.setdefault(key, []).append(time.perf_counter() - t)
                    s = result.stats
                    paths.setdefault(key, []).append(
                        {
                            "row": row,
                            "scans": s.scans,
                            "style_rows_read": s.style_rows_read,
                            "bytes_read": s.bytes_read,
                            "reranked": dict(s.reranked),
                            "stage_seconds": {a: round(b, 5) for a, b in s.stage_seconds.items()},
                        }
                    )
                    for name, b in brutes.items():
                        brute[name].setdefault(key, []).append(
                            b.seconds_for(passes[name][k], measures)
                        )
        print(f"  query {i + 1}/{len(rows)} (row {row})", flush=True)
    checked = []
    for row in rows[:check]:  # equality with the exact float64 brute force
        expected = _exact_brute(store, row, 5)
        got = retriever.search(row, measures=MEASURES, k=5)
        same = all(
            [h.row for h in got[m]] == [r for r, _ in expected[m]]
            and np.allclose(
                [h.score for h in got[m]], [s for _, s in expected[m]], rtol=1e-9, atol=1e-12
            )
            for m in MEASURES
        )
        checked.append({"row": row, "equal": bool(same)})
    batches = {}
    for size in (1, 8, 64):
        batch_rows = [int(r) for r in rng.choice(live, size=min(size, len(live)), replace=False)]
        t = time.perf_counter()
        retriever.search(batch_rows, measures=MEASURES, k=5)
        batches[str(size)] = len(batch_rows) / (time.perf_counter() - t)
    summary = {}
    for key, times in ours.items():
        entry = {"ours_p50": statistics.median(times), "ours_p95": _pct(times, 95)}
        for name in brutes:
            bt = brute[name][key]
            entry[f"{name}_p50"] = statistics.median(bt)
            entry[f"{name}_p95"] = _pct(bt, 95)
            ratios = [a / b for a, b in zip(times, bt)]
            entry[f"ratio_{name}_p50"] = statistics.median(ratios)
        summary[key] = entry
    return {
        "store": str(path),
        **info,
        "queries": rows,
        "summary": summary,
        "paths": paths,
        "exact_check": checked,
        "batch_queries_per_second": batches,
        "rss_end_bytes": _rss(),
    }


def _table(results: list[dict]) -> None:
    for res in results:
        print(
            f"\n{res['rows']} rows ({res['bytes_per_row']} B/row; first search "
            f"{res.get('first_search_seconds', float('nan')) * 1e3:.0f} ms; exact check: "
            f"{all(c['equal'] for c in res['exact_check'])}; batches q/s: "
            + ", ".join(f"{k}: {v:.1f}" for k, v in res["batch_queries_per_second"].items())
            + ")"
        )
        names = [
            n for n in ("in_ram", "streaming") if f"{n}_p50" in next(iter(res["summary"].values()))
        ]
        header = f"{'measures | k | rows':<34}{'ours p50':>10}{'p95':>9}" + "".join(
            f"{n + ' p50':>16}{'ratio':>8}" for n in names
        )
        print(header)
        for key, e in res["summary"].items():
            cells = "".join(
                f"{e[n + '_p50'] * 1e3:>14.1f}ms{e['ratio_' + n + '_p50']:>8.2f}" for n in names
            )
            print(f"{key:<34}{e['ours_p50'] * 1e3:>8.1f}ms{e['ours_p95'] * 1e3:>7.0f}ms{cells}")


def _plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ns = [r["rows"] for r in results]
    for key, style in (
        ("all|k=5|all rows", "-o"),
        ("i1_sd|k=5|all rows", "-s"),
        ("style|k=5|all rows", "-^"),
        ("cosine|k=5|all rows", "-v"),
    ):
        ax.plot(
            ns,
            [r["summary"][key]["ours_p50"] for r in results],
            style,
            label=f"dermris {key.split('|')[0]}",
        )
        ax.plot(
            ns,
            [r["summary"][key]["streaming_p50"] for r in results],
            style.replace("-", ":"),
            label=f"streaming brute force {key.split('|')[0]}",
            alpha=0.6,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in the store")
    ax.set_ylabel("latency per query, median (s)")
    ax.set_title("Exact search vs brute force (lite0, real-pixel stores, k=5, 2-core CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, required=True, help="Where scale_stores.py built the stores."
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 20000, 100000])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument(
        "--large-queries",
        type=int,
        default=5,
        help="Queries on stores whose float32 style rows do not fit in memory (streaming only).",
    )
    parser.add_argument(
        "--check", type=int, default=2, help="Queries checked against exact brute force."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        path = args.root / f"store-{n}"
        if not path.exists():
            print(f"skipping {path}: not built (benchmarks/scale_stores.py)")
            continue
        results.append(
            bench_store(
                path,
                queries=args.queries,
                large_queries=args.large_queries,
                seed=args.seed,
                check=args.check,
            )
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"machine": platform.platform(), "results": results}, indent=1)
        )
    _table(results)
    if results:
        _plot(results, args.out.with_suffix(".png"))
        print(f"\nJSON: {args.out}; plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
