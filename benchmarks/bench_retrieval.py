"""Exact retrieval benchmark: recall@k against brute force, latency, rows and bytes read.

For each store size it times the Retriever (all nine measures for one query, and each measure
alone) and, in the same run, a brute-force full scan of the whole store (every style row and
mask read), checks that both give the same rows and scores, and records the memory the
Retriever keeps resident. Writes JSON, prints a table, and draws a PNG plot.

Every query's path and cost go into the JSON (``per_query``): whether it scanned or read rows
(``scans``, ``style_rows_read``, ``mask_rows_read``, ``bytes_read``, ``reranked``), the time by
stage, and what the cost model says those reads cost, so that a cost model that always scans,
never scans or ignores a forced choice shows there. ``--check-paths`` asserts it: it runs a few
queries on a small store with ``CostModel.always_scan()``, ``CostModel.never_scan()`` and the
default, and exits with status 1 when a forced choice was not honoured or the answers differ.

Examples
--------
::

    python benchmarks/bench_retrieval.py --source pipeline --rows 1000
    python benchmarks/bench_retrieval.py --source spectrum --rows 10000 20000 --brute 3
    python benchmarks/bench_retrieval.py --check-paths
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dermris.indexer import Store  # noqa: E402
from dermris.retriever import MEASURES, CostModel, Retriever, SearchOptions  # noqa: E402

from stores import (  # noqa: E402
    measure_spectrum,
    photo_store,
    pipeline_store,
    random_store,
    spectrum_store,
)

HERE = Path(__file__).resolve().parent


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def path_taken(stats) -> str:
    """The path a search took: ``"scan"`` (at least one sequential scan of the style rows),
    ``"rows"`` (style or mask rows read one by one only) or ``"memory"`` (nothing read)."""
    if stats.scans:
        return "scan"
    if stats.style_rows_read or stats.mask_rows_read:
        return "rows"
    return "memory"


def modelled_seconds(stats, store: Store, cost: CostModel) -> float:
    """What the cost model says the reads of a search cost: its scans of every style row, the
    style rows read one by one besides, and the mask rows read."""
    scanned = stats.scans * store.rows
    single = max(stats.style_rows_read - scanned, 0)
    return (
        stats.scans * cost.scan_seconds(store.rows, store.style_row_bytes)
        + cost.rows_seconds(single, store.style_row_bytes)
        + cost.rows_seconds(stats.mask_rows_read, store.mask_row_bytes)
    )


def query_record(stats, store: Store, cost: CostModel) -> dict:
    """One query's path and cost for the JSON: :meth:`SearchStats.to_dict` plus the path and
    the cost model's estimate of its reads."""
    return {
        "path": path_taken(stats),
        **stats.to_dict(),
        "modelled_read_seconds": modelled_seconds(stats, store, cost),
    }


def nine_scores(
    es: np.ndarray, cs: np.ndarray, ss: np.ndarray, dc: np.ndarray
) -> dict[str, np.ndarray]:
    """The nine measures from the four component scores of every row (I1: harmonic means, 0 when
    a component is 0)."""

    def h(*c):
        c = np.stack(c)
        return np.where((c <= 0).any(0), 0.0, len(c) / (1 / np.where(c <= 0, 1, c)).sum(0))

    return {
        "euclidean": es,
        "cosine": cs,
        "style": ss,
        "i1_ed": h(es, dc),
        "i1_cd": h(cs, dc),
        "i1_ecd": h(es, cs, dc),
        "i1_se": h(ss, es),
        "i1_sc": h(ss, cs),
        "i1_sd": h(ss, dc),
    }


def brute_force(store: Store, row: int, k: int) -> dict[str, list[tuple[int, float]]]:
    """Every measure by a full scan of the store (all style rows and masks), float64."""
    n = store.rows
    feats = store.features().astype(np.float64)
    q = feats[row]
    ed = np.sqrt(((feats - q) ** 2).sum(axis=1))
    norms = np.linalg.norm(feats, axis=1) * np.linalg.norm(q)
    cos = np.where(norms > 0, feats @ q / np.where(norms > 0, norms, 1), 0.0)
    q_style = store.style_rows([row])[0].astype(np.float64)
    ls = np.empty(n)
    for start, block in store.iter_style_blocks():
        ls[start : start + len(block)] = ((block.astype(np.float64) - q_style) ** 2).sum(axis=1)
    masks = store.masks()
    q_mask = masks[row]
    inter = np.bitwise_count(masks & q_mask).sum(axis=1)
    areas = np.bitwise_count(masks).sum(axis=1)
    total = areas + areas[row]
    dc = np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1), 1.0)
    es = np.ones(n) if ed.max() == 0 else 1 - ed / ed.max()
    ss = np.ones(n) if ls.max() == 0 else 1 - ls / ls.max()
    cs = (np.clip(cos, -1, 1) + 1) / 2

    scores = nine_scores(es, cs, ss, dc)
    out = {}
    for name, s in scores.items():
        s = s.copy()
        s[row] = -np.inf  # exclude the query itself
        order = np.lexsort((np.arange(n), -s))[:k]
        out[name] = [(int(r), float(s[r])) for r in order]
    return out


class InMemoryBruteForce:
    """The plain brute force a user would write with everything in RAM: decoded float32 style
    rows, features, unpacked-free bit masks; LS by ``||x||^2 - 2 x.q + ||q||^2`` in float32."""

    def __init__(self, store: Store) -> None:
        self.n = store.rows
        self.features = store.features()
        self.style = (
            np.concatenate([b for _, b in store.iter_style_blocks()])
            if self.n
            else np.zeros((0, 0))
        )
        self.style_sq = np.einsum("ij,ij->i", self.style, self.style)
        self.masks = store.masks()
        self.areas = np.bitwise_count(self.masks).sum(axis=1)
        self.feature_norms = np.linalg.norm(self.features, axis=1)

    @property
    def nbytes(self) -> int:
        return self.style.nbytes + self.features.nbytes + self.masks.nbytes

    def query(self, row: int, k: int) -> dict[str, list[int]]:
        f, q = self.features, self.features[row]
        ed = np.sqrt(np.maximum(self.feature_norms**2 - 2 * f @ q + q @ q, 0))
        cos = (f @ q) / np.maximum(self.feature_norms * self.feature_norms[row], 1e-30)
        ls = np.maximum(self.style_sq - 2 * self.style @ self.style[row] + self.style_sq[row], 0)
        inter = np.bitwise_count(self.masks & self.masks[row]).sum(axis=1)
        total = self.areas + self.areas[row]
        dc = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
        es = 1 - ed / max(ed.max(), 1e-30)
        ss = 1 - ls / max(ls.max(), 1e-30)
        cs = (np.clip(cos, -1, 1) + 1) / 2

        scores = nine_scores(es, cs, ss, dc)
        out = {}
        for name, sc in scores.items():
            sc = sc.copy()
            sc[row] = -np.inf
            top = np.argpartition(-sc, k)[:k] if k < self.n else np.arange(self.n)
            out[name] = top[np.lexsort((top, -sc[top]))].tolist()
        return out


def run_one(
    store_path: Path,
    *,
    queries: int,
    brute: int,
    k: int,
    seed: int,
    label: str,
    in_ram_limit: int = 8 << 30,
) -> dict:
    rss0 = _rss()
    t0 = time.perf_counter()
    retriever = Retriever.open(store_path, device="cpu")
    open_s = time.perf_counter() - t0
    rss_delta = _rss() - rss0
    store = retriever.store
    n = store.rows
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=min(queries, n), replace=False).tolist()
    retriever.search(rows[0], k=k, measures="all")  # warm-up (page cache, lazy allocations)

    all_ms, per_measure = (
        [],
        {
            m: {"ms": [], "reranked": [], "style_rows": [], "mask_rows": [], "bytes": []}
            for m in MEASURES
        },
    )
    fast_results = {}
    cost = retriever.options.cost_model
    per_query = []
    for row in rows:
        t = time.perf_counter()
        fast_results[row] = retriever.search(row, k=k, measures="all")
        all_ms.append((time.perf_counter() - t) * 1e3)
        record = {
            "row": int(row),
            "all_nine": query_record(fast_results[row].stats, store, cost),
            "measures": {},
        }
        per_query.append(record)
        for m in MEASURES:
            t = time.perf_counter()
            st = retriever.search(row, measures=m, k=k).stats
            per_measure[m]["ms"].append((time.perf_counter() - t) * 1e3)
            record["measures"][m] = query_record(st, store, cost)
            per_measure[m]["reranked"].append(st.reranked.get(m, 0))
            per_measure[m]["style_rows"].append(st.style_rows_read)
            per_measure[m]["mask_rows"].append(st.mask_rows_read)
            per_measure[m]["bytes"].append(st.bytes_read)

    style_bytes_all = [
        fast_results[row].stats.style_rows_read * store.style_row_bytes for row in rows
    ]
    style_array_bytes = n * store.style_row_bytes
    in_ram = None
    if n * store.style_dim * 4 <= in_ram_limit:
        t = time.perf_counter()
        memory = InMemoryBruteForce(store)
        load_s = time.perf_counter() - t
        memory.query(rows[0], k)
        ram_ms, ram_agree = [], []
        for row in rows:
            t = time.perf_counter()
            got = memory.query(row, k)
            ram_ms.append((time.perf_counter() - t) * 1e3)
            ram_agree.append(
                np.mean(
                    [len(set(got[m]) & {h.row for h in fast_results[row][m]}) / k for m in MEASURES]
                )
            )
        in_ram = {
            "median_ms": statistics.median(ram_ms),
            "load_seconds": round(load_s, 2),
            "resident_bytes": memory.nbytes,
            "top_k_agreement_with_exact": float(np.mean(ram_agree)),
        }
        del memory

    brute_s, agree = [], {m: [] for m in MEASURES}
    max_rel = 0.0
    for row in rows[:brute]:
        t = time.perf_counter()
        expected = brute_force(store, row, k)
        brute_s.append(time.perf_counter() - t)
        for m in MEASURES:
            got = fast_results[row][m]
            exp_rows = [r for r, _ in expected[m]]
            agree[m].append(len(set(h.row for h in got) & set(exp_rows)) / max(1, len(exp_rows)))
            if [h.row for h in got] == exp_rows:
                for hit, (_, s) in zip(got, expected[m]):
                    max_rel = max(max_rel, abs(hit.score - s) / max(abs(s), 1e-300))
            else:
                max_rel = float("inf")

    def p95(v):
        return float(np.percentile(v, 95)) if v else None

    result = {
        "label": label,
        "rows": n,
        "style_dim": store.style_dim,
        "style_dtype": store.manifest.arrays.style_dtype,
        "sketch_dim": store.sketch_info.dim if store.sketch_info else None,
        "k": k,
        "queries": len(rows),
        "open_seconds": round(open_s, 3),
        "retriever_index_bytes": retriever.resident_bytes,
        "rss_delta_bytes": rss_delta,
        "store_bytes_on_disk": sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file()),
        "all_nine": {"median_ms": statistics.median(all_ms), "p95_ms": p95(all_ms)},
        "brute_force": {
            "queries": len(brute_s),
            "median_s": statistics.median(brute_s) if brute_s else None,
        },
        "in_ram_brute_force": in_ram,
        "style_bytes_read_fraction_all_nine": {
            "median": statistics.median(style_bytes_all) / max(style_array_bytes, 1),
            "max": max(style_bytes_all) / max(style_array_bytes, 1),
        },
        "scans_all_nine_median": statistics.median([fast_results[r].stats.scans for r in rows]),
        "paths_all_nine": _path_counts(q["all_nine"] for q in per_query),
        "max_relative_score_error": max_rel if brute_s else None,
        "measures": {
            m: {
                "median_ms": statistics.median(v["ms"]),
                "p95_ms": p95(v["ms"]),
                "recall_at_k": statistics.mean(agree[m]) if agree[m] else None,
                "rows_reranked_median": statistics.median(v["reranked"]),
                "style_rows_read_median": statistics.median(v["style_rows"]),
                "mask_rows_read_median": statistics.median(v["mask_rows"]),
                "bytes_read_median": statistics.median(v["bytes"]),
                "paths": _path_counts(q["measures"][m] for q in per_query),
            }
            for m, v in per_measure.items()
        },
        "cost_model": dataclasses.asdict(cost),
        "per_query": per_query,
    }
    if brute_s:
        result["speedup_all_nine_vs_brute"] = (
            result["brute_force"]["median_s"] * 1e3 / result["all_nine"]["median_ms"]
        )
        result["all_nine_over_streaming_brute"] = result["all_nine"]["median_ms"] / (
            result["brute_force"]["median_s"] * 1e3
        )
    if in_ram:
        result["all_nine_over_in_ram_brute"] = result["all_nine"]["median_ms"] / in_ram["median_ms"]
    return result


def _path_counts(records) -> dict[str, int]:
    counts = {"scan": 0, "rows": 0, "memory": 0}
    for record in records:
        counts[record["path"]] += 1
    return counts


# The forced choices --check-paths holds the cost model to: (cost model, check of one query's
# stats for the style measure alone, what the check means).
FORCED = {
    "always_scan": (
        CostModel.always_scan(),
        lambda st, n: st.scans >= 1 and st.style_rows_read >= n,
        "a style query scans (scans >= 1, every style row read)",
    ),
    "never_scan": (CostModel.never_scan(), lambda st, n: st.scans == 0, "no query scans"),
    "default": (CostModel(), lambda st, n: True, "(recorded only)"),
}


def check_paths(store_path: Path, *, queries: int = 4, k: int = 5, seed: int = 0) -> dict:
    """Run a few queries under each cost model of :data:`FORCED` and check its forced choice.

    Every query runs the style measure alone and all nine measures; a forced scan must show as
    ``scans >= 1`` for the style query, ``never_scan`` as no scan in any query, and the answers
    must not depend on the cost model.

    Returns
    -------
    dict
        ``{"store", "rows", "queries", "runs": {model: [per-query records]}, "problems"}``;
        ``problems`` is empty when every forced choice was honoured.
    """
    store = Store.open(store_path)
    n = store.rows
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(n, size=min(queries, n), replace=False).tolist())
    runs: dict[str, list[dict]] = {}
    answers: dict[str, list] = {}
    problems: list[str] = []
    for name, (cost, honoured, meaning) in FORCED.items():
        retriever = Retriever.open(store_path, device="cpu", options=SearchOptions(cost_model=cost))
        runs[name], answers[name] = [], []
        for row in rows:
            style = retriever.search(row, measures="style", k=k)
            nine = retriever.search(row, measures="all", k=k)
            runs[name].append(
                {
                    "row": int(row),
                    "style": query_record(style.stats, store, cost),
                    "all_nine": query_record(nine.stats, store, cost),
                }
            )
            answers[name].append({m: [(h.row, h.score) for h in hits] for m, hits in nine.items()})
            if not honoured(style.stats, n):
                problems.append(
                    f"{name}: style query for row {row} took the {path_taken(style.stats)} path "
                    f"(scans {style.stats.scans}, style rows read {style.stats.style_rows_read} "
                    f"of {n}); expected: {meaning}"
                )
            if name == "never_scan" and nine.stats.scans:
                problems.append(
                    f"never_scan: all-nine query for row {row} scanned {nine.stats.scans} times"
                )
    for name in FORCED:
        if answers[name] != answers["default"]:
            problems.append(f"{name}: the answers differ from the default cost model's")
    return {
        "store": str(store_path),
        "rows": n,
        "queries": rows,
        "runs": runs,
        "problems": problems,
    }


def print_paths(report: dict) -> None:
    """One line per cost model and query: the path each search took and what it read."""
    print(f"check-paths: {report['store']} ({report['rows']} rows), queries {report['queries']}")
    print(f"  {'cost model':<12}{'row':>5}  {'style: path':<12}{'scans':>6}{'style rd':>9}", end="")
    print(f"{'mask rd':>8}  {'all nine: path':<15}{'scans':>6}{'bytes':>9}")
    for name, records in report["runs"].items():
        for r in records:
            s, a = r["style"], r["all_nine"]
            print(
                f"  {name:<12}{r['row']:>5}  {s['path']:<12}{s['scans']:>6}"
                f"{s['style_rows_read']:>9}{s['mask_rows_read']:>8}  {a['path']:<15}"
                f"{a['scans']:>6}{a['bytes_read']:>9}"
            )
    for problem in report["problems"]:
        print(f"  PROBLEM: {problem}")
    print("  forced choices honoured" if not report["problems"] else "  FAILED")


def print_table(run: dict) -> None:
    print(
        f"\n{run['label']}: N={run['rows']} D={run['style_dim']} ({run['style_dtype']}), "
        f"sketch d={run['sketch_dim']}, k={run['k']}, {run['queries']} queries"
    )
    print(
        f"  all nine: median {run['all_nine']['median_ms']:.1f} ms, "
        f"p95 {run['all_nine']['p95_ms']:.1f} ms; "
        f"brute force median {run['brute_force']['median_s']} s "
        f"over {run['brute_force']['queries']} queries; "
        f"speed-up {run.get('speedup_all_nine_vs_brute', float('nan')):.0f}x"
    )
    print(
        f"  retriever memory: index {run['retriever_index_bytes'] / 1e6:.0f} MB, "
        f"RSS +{run['rss_delta_bytes'] / 1e6:.0f} MB; "
        f"max relative score error vs brute force {run['max_relative_score_error']}"
    )
    ram = run.get("in_ram_brute_force")
    if ram:
        print(
            f"  in-RAM brute force: median {ram['median_ms']:.1f} ms "
            f"({ram['resident_bytes'] / 1e6:.0f} MB resident); "
            f"all nine / in-RAM = {run['all_nine_over_in_ram_brute']:.2f}"
        )
    frac = run["style_bytes_read_fraction_all_nine"]
    print(
        f"  style bytes read per query (all nine): median {100 * frac['median']:.2f} % "
        f"of the style array, max {100 * frac['max']:.2f} %; "
        f"scans (median) {run['scans_all_nine_median']}; all nine / streaming brute force = "
        f"{run.get('all_nine_over_streaming_brute', float('nan')):.3f}"
    )
    paths = run.get("paths_all_nine")
    if paths:
        print(
            f"  paths of the all-nine queries: {paths['scan']} scanned, "
            f"{paths['rows']} read rows only, {paths['memory']} read nothing"
        )
    print(
        f"  {'measure':<10}{'recall@k':>9}{'median ms':>11}{'p95 ms':>9}{'reranked':>10}"
        f"{'style rd':>10}{'mask rd':>9}{'MB read':>9}{'scanned':>9}"
    )
    for m, v in run["measures"].items():
        recall = "-" if v["recall_at_k"] is None else f"{v['recall_at_k']:.3f}"
        scanned = v.get("paths", {}).get("scan", "-")
        print(
            f"  {m:<10}{recall:>9}{v['median_ms']:>11.1f}{v['p95_ms']:>9.1f}"
            f"{v['rows_reranked_median']:>10.0f}{v['style_rows_read_median']:>10.0f}"
            f"{v['mask_rows_read_median']:>9.0f}{v['bytes_read_median'] / 1e6:>9.2f}{scanned:>9}"
        )


def plot(runs: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'dermris[bench]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        label = f"N={run['rows']} D={run['style_dim']}"
        ms = [run["measures"][m]["median_ms"] for m in MEASURES]
        axes[0].plot(MEASURES, ms, marker="o", label=label)
        frac = [run["measures"][m]["rows_reranked_median"] / run["rows"] for m in MEASURES]
        axes[1].plot(MEASURES, frac, marker="o", label=label)
    axes[0].set_ylabel("median latency per query (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("rows re-ranked exactly / N")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("dermris exact retrieval (k=5), one query, 2-core CPU")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=["pipeline", "spectrum", "photo"], default="pipeline")
    parser.add_argument("--rows", type=int, nargs="+", default=[1000])
    parser.add_argument("--preset", default="tiny", help="pipeline source: model preset")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--brute", type=int, default=5, help="queries also answered by brute force")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--sketch-dim", type=int, default=256)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("DERMRIS_BENCH_DIR", "/tmp/dermris-bench")),
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default: results/retrieval.json)"
    )
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check-paths",
        action="store_true",
        help="Only check that forced cost-model choices are honoured (exit 1 if not), on "
        "--store or on a small random store; JSON only with --out.",
    )
    parser.add_argument("--store", type=Path, default=None, help="--check-paths: the store")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.check_paths:
        store = args.store or random_store(args.workdir / "check-paths-random-64", 64)
        report = check_paths(store, k=args.k, seed=args.seed)
        print_paths(report)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
            print(f"JSON: {args.out}")
        sys.exit(1 if report["problems"] else 0)
    if args.out is None:
        args.out = HERE / "results" / "retrieval.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)

    spectrum = None
    if args.source == "spectrum":
        cache = args.workdir / "spectrum-lite0.json"
        if not cache.is_file():
            cache.write_text(json.dumps(measure_spectrum()))
        spectrum = json.loads(cache.read_text())
        top = np.cumsum(spectrum["variance_fraction"])
        print(
            f"measured spectrum (lite0, {spectrum['images']} images): "
            f"first 16 / 64 / 256 components hold "
            f"{top[15]:.3f} / {top[63]:.3f} / {top[min(255, len(top) - 1)]:.3f} of the variance"
        )

    existing = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    runs = []
    for n in args.rows:
        t = time.perf_counter()
        if args.source == "pipeline":
            path = pipeline_store(
                args.workdir / f"pipeline-{args.preset}-{n}",
                n,
                preset=args.preset,
                sketch_dim=args.sketch_dim,
            )
        elif args.source == "photo":
            path = photo_store(
                args.workdir / f"photo-{args.preset}-{n}",
                n,
                preset=args.preset,
                sketch_dim=args.sketch_dim,
                workdir=args.workdir,
            )
        else:
            path = spectrum_store(
                args.workdir / f"spectrum-{n}", n, spectrum, sketch_dim=args.sketch_dim
            )
        build_s = time.perf_counter() - t
        run = run_one(
            path,
            queries=args.queries,
            brute=args.brute,
            k=args.k,
            seed=args.seed,
            label=f"{args.source}" + (f"-{args.preset}" if args.source != "spectrum" else ""),
        )
        run["store_build_seconds"] = round(build_s, 1)
        runs.append(run)
        print_table(run)
    keep = [
        r
        for r in existing.get("runs", [])
        if (r["label"], r["rows"]) not in {(x["label"], x["rows"]) for x in runs}
    ]
    payload = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "runs": sorted(keep + runs, key=lambda r: (r["label"], r["rows"])),
    }
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"\nJSON: {args.out}")
    if args.plot:
        plot(payload["runs"], args.plot)


if __name__ == "__main__":
    main()
