"""What one hit per lesion and a three-image lesion query cost, against a single query.

On a store of real pixels (``scale_stores.py``: variations of scikit-image photographs indexed
with the lite0 preset, a ``lesion_id`` of 1 to 5 images per lesion), for lesions of at least
three images, interleaved lesion by lesion so every mode sees the same machine:

* ``single``: the lesion's first row as the query;
* ``grouped``: the same with ``group_by="lesion_id"`` (exact top k lesions);
* ``lesion3``: ``LesionQuery`` of the lesion's first three rows (each measure the mean over the
  three images);
* ``lesion3_grouped``: both.

For each measure set (each measure asked alone, and all nine in one call) it records the
median and p95 latency, the rows scored exactly and the style rows read. On a few lesions it
checks every answer against an in-RAM float64 brute force (the means over the images, the
groups). Writes ``results/grouping.json`` and prints a table.

Example::

    nice python benchmarks/bench_grouping.py --store /data/bench/store-3000 --queries 12
    nice python benchmarks/bench_grouping.py --root /data/bench --rows 2000   # build it first
"""

from __future__ import annotations

import argparse
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
from dermris.retriever import MEASURES, LesionQuery, Retriever  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("single", "grouped", "lesion3", "lesion3_grouped")
GROUP = "lesion_id"


def components(store: Store, row: int, cache: dict) -> dict[str, np.ndarray]:
    """The four component scores of every row for the query ``row``, float64, full scans (the
    style rows streamed block by block: a float64 copy of them would not fit in memory)."""
    if "features" not in cache:
        cache["features"] = store.features().astype(np.float64)
        cache["masks"] = store.masks()
        cache["areas"] = np.bitwise_count(cache["masks"]).sum(axis=1)
    feats, masks, areas = (cache[k] for k in ("features", "masks", "areas"))
    q = feats[row]
    ed = np.sqrt(((feats - q) ** 2).sum(axis=1))
    norms = np.linalg.norm(feats, axis=1) * np.linalg.norm(q)
    cos = np.where(norms > 0, feats @ q / np.where(norms > 0, norms, 1), 0.0)
    q_style = store.style_rows([row])[0].astype(np.float64)
    ls = np.empty(len(feats))
    for start, block in store.iter_style_blocks():
        ls[start : start + len(block)] = ((block.astype(np.float64) - q_style) ** 2).sum(axis=1)
    inter = np.bitwise_count(masks & masks[row]).sum(axis=1)
    total = areas + areas[row]
    dc = np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1), 1.0)
    return {
        "es": np.ones_like(ed) if ed.max() == 0 else 1 - ed / ed.max(),
        "cs": (np.clip(cos, -1, 1) + 1) / 2,
        "ss": np.ones_like(ls) if ls.max() == 0 else 1 - ls / ls.max(),
        "dc": dc,
    }


def brute_force(
    store: Store, rows: list[int], groups: np.ndarray | None, k: int, cache: dict
) -> dict[str, list[tuple[int, float]]]:
    """Top k (rows, or groups' best rows) of the mean score over the query ``rows``."""
    per_image = [nine_scores(**components(store, r, cache)) for r in rows]
    n = store.rows
    out = {}
    for name in MEASURES:
        score = sum(s[name] for s in per_image) / len(rows)
        score = score.copy()
        score[rows] = -np.inf
        order = np.lexsort((np.arange(n), -score))
        order = order[np.isfinite(score[order])]
        if groups is not None:
            _, first = np.unique(groups[order], return_index=True)
            order = order[np.sort(first)]
        out[name] = [(int(r), float(score[r])) for r in order[:k]]
    return out


def _query(mode: str, rows: list[int]):
    return LesionQuery(rows[:3]) if mode.startswith("lesion3") else rows[0]


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"median_s": statistics.median(values), "p95_s": p95, "n": len(values)}


def run(store_path: Path, *, queries: int, k: int, check: int, seed: int) -> dict:
    retriever = Retriever.open(store_path, device="cpu")
    store = retriever.store
    lesion_of = retriever.metadata().column(GROUP).to_pylist()
    grouping = retriever.grouping(GROUP)
    rng = np.random.default_rng(seed)
    candidates = [
        [int(r) for r in grouping.rows(g)]
        for g in range(grouping.n_groups)
        if grouping.values[g] is not None and len(grouping.rows(g)) >= 3
    ]
    picked = [candidates[i] for i in sorted(rng.choice(len(candidates), queries, replace=False))]
    sets = {m: (m,) for m in ("euclidean", "style", "i1_se", "i1_sd")}
    sets["all nine"] = MEASURES
    timings: dict = {mode: {s: [] for s in sets} for mode in MODES}
    cost: dict = {
        mode: {s: {"reranked": [], "style_rows_read": []} for s in sets} for mode in MODES
    }
    # warm up (model-free: row queries; page cache, thread pools)
    for mode in MODES:
        retriever.search(_query(mode, picked[0]), measures="all", k=k)
    for rows in picked:
        for set_name, measures in sets.items():
            for mode in MODES:
                started = time.perf_counter()
                result = retriever.search(
                    _query(mode, rows),
                    measures=measures,
                    k=k,
                    group_by=GROUP if mode.endswith("grouped") else None,
                )
                timings[mode][set_name].append(time.perf_counter() - started)
                cost[mode][set_name]["reranked"].append(sum(result.stats.reranked.values()))
                cost[mode][set_name]["style_rows_read"].append(result.stats.style_rows_read)
    # exactness on a few lesions, every mode, all nine
    groups = np.asarray(
        [f"null-{r}" if v is None else str(v) for r, v in enumerate(lesion_of)], object
    )
    cache: dict = {}
    checked = 0
    for rows in picked[:check]:
        for mode in MODES:
            query_rows = rows[:3] if mode.startswith("lesion3") else rows[:1]
            expected = brute_force(
                store, query_rows, groups if mode.endswith("grouped") else None, k, cache
            )
            got = retriever.search(
                _query(mode, rows),
                measures="all",
                k=k,
                group_by=GROUP if mode.endswith("grouped") else None,
            )
            for name in MEASURES:
                assert [h.row for h in got[name]] == [r for r, _ in expected[name]], (mode, name)
                np.testing.assert_allclose(
                    [h.score for h in got[name]], [s for _, s in expected[name]], rtol=1e-5
                )
            checked += 1
    out: dict = {
        "store": str(store_path),
        "rows": store.rows,
        "lesions": grouping.n_groups,
        "lesions_with_3_or_more": len(candidates),
        "k": k,
        "queries": queries,
        "checked_against_brute_force": checked,
        "machine": {"platform": platform.platform(), "cpus": _cpus()},
        "modes": {},
    }
    for mode in MODES:
        out["modes"][mode] = {}
        for set_name in sets:
            entry = _summary(timings[mode][set_name])
            base = statistics.median(timings["single"][set_name])
            entry["vs_single"] = entry["median_s"] / base if base > 0 else None
            entry["mean_reranked"] = float(np.mean(cost[mode][set_name]["reranked"]))
            entry["mean_style_rows_read"] = float(np.mean(cost[mode][set_name]["style_rows_read"]))
            out["modes"][mode][set_name] = entry
    return out


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def print_table(report: dict) -> None:
    print(
        f"{report['rows']} rows, {report['lesions']} lesions, k={report['k']}, "
        f"{report['queries']} lesions of >= 3 images as queries "
        f"({report['checked_against_brute_force']} answers checked against brute force)"
    )
    print(
        f"{'measures':<10}{'mode':<17}{'median ms':>10}{'p95 ms':>9}{'x single':>9}"
        f"{'scored':>9}{'style rd':>9}"
    )
    for set_name in report["modes"]["single"]:
        for mode in MODES:
            e = report["modes"][mode][set_name]
            print(
                f"{set_name:<10}{mode:<17}{1e3 * e['median_s']:>10.1f}{1e3 * e['p95_s']:>9.1f}"
                f"{e['vs_single']:>9.2f}{e['mean_reranked']:>9.0f}{e['mean_style_rows_read']:>9.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="A store with a lesion_id column.")
    parser.add_argument("--root", type=Path, help="Build (or reuse) ROOT/store-<rows> first.")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--check", type=int, default=3, help="Lesions checked by brute force.")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "grouping.json")
    args = parser.parse_args()
    if args.store is None:
        if args.root is None:
            parser.error("give --store or --root")
        from scale_stores import build

        args.store = build(args.root, [args.rows])[args.rows]
    report = run(args.store, queries=args.queries, k=args.k, check=args.check, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
