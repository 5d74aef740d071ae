"""ES / CS / ED_max through FAISS against the full float64 pass, at a million features.

The retriever answers the Euclidean and cosine measures, and ``ED_max``, with certified FAISS
flat searches (``dermris.retriever.feature_search``); without FAISS it makes one float64 pass
over all features. This script times both on ``N`` clustered 1024-d float32 features (only
features: no style rows are needed for this figure), checks that both give the same rows, and
reports the memory each keeps. Writes JSON and prints a table.

Example::

    python benchmarks/bench_features.py --rows 1000000 --queries 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dermris.retriever.feature_search import FeatureSearch
from dermris.retriever.measures import rank
from dermris.retriever.store_index import _FEATURE_BLOCK, cosine_of, distance_and_dot

HERE = Path(__file__).resolve().parent


def clustered_features(
    n: int, dim: int = 1024, *, clusters: int = 256, seed: int = 0
) -> np.ndarray:
    """SELU-range features around ``clusters`` centres, generated in blocks (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        which = rng.integers(0, clusters, b - a)
        out[a:b] = centres[which] + 0.6 * rng.standard_normal((b - a, dim), dtype=np.float32)
    return out


def full_pass(features: np.ndarray, norms: np.ndarray, q: np.ndarray, k: int):
    """What the retriever does without FAISS: every row's ED and cosine in float64, then top k."""
    n = len(features)
    q64 = q.astype(np.float64)
    ed = np.empty(n)
    cos = np.empty(n)
    for a in range(0, n, _FEATURE_BLOCK):
        ed[a : a + _FEATURE_BLOCK], dots = distance_and_dot(
            features[a : a + _FEATURE_BLOCK].astype(np.float64), q64
        )
        cos[a : a + _FEATURE_BLOCK] = cosine_of(dots, norms[a : a + _FEATURE_BLOCK], q64)
    ed_max = float(ed.max())
    rows = np.arange(n)
    return (
        rank(1 - ed / ed_max, k, rows=rows),
        rank((np.clip(cos, -1, 1) + 1) / 2, k, rows=rows),
        ed_max,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "features.json")
    args = parser.parse_args()

    t = time.perf_counter()
    features = clustered_features(args.rows)
    gen_s = time.perf_counter() - t
    norms = np.concatenate(
        [
            np.sqrt(np.einsum("ij,ij->i", b, b))
            for b in (
                features[a : a + 65536].astype(np.float64) for a in range(0, args.rows, 65536)
            )
        ]
    )
    t = time.perf_counter()
    search = FeatureSearch(features)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    queries = [
        features[i] + 0.05 * rng.standard_normal(features.shape[1], dtype=np.float32)
        for i in rng.choice(args.rows, args.queries, replace=False)
    ]
    search.nearest(queries[0], args.k)  # warm-up
    faiss_ms, numpy_ms, agree, certified = [], [], 0, 0
    for q in queries:
        t = time.perf_counter()
        top_e = search.nearest(q, args.k, by="euclidean")
        top_c = search.nearest(q, args.k, by="cosine")
        far = search.max_distance(q)
        faiss_ms.append((time.perf_counter() - t) * 1e3)
        certified += top_e is not None and top_c is not None and far is not None
        t = time.perf_counter()
        e, c, ed_max = full_pass(features, norms, q, args.k)
        numpy_ms.append((time.perf_counter() - t) * 1e3)
        if top_e is not None and top_c is not None and far is not None:
            agree += (
                np.array_equal(top_e[0], e)
                and np.array_equal(top_c[0], c)
                and abs(far - ed_max) <= 1e-12 * ed_max
            )
    result = {
        "rows": args.rows,
        "dim": features.shape[1],
        "k": args.k,
        "queries": args.queries,
        "faiss": {
            "median_ms": statistics.median(faiss_ms),
            "p95_ms": float(np.percentile(faiss_ms, 95)),
            "index_bytes": search.nbytes,
            "build_seconds": round(build_s, 1),
            "certified_queries": certified,
            "faiss_threads": __import__("faiss").omp_get_max_threads(),
        },
        "full_float64_pass": {
            "median_ms": statistics.median(numpy_ms),
            "p95_ms": float(np.percentile(numpy_ms, 95)),
            "feature_bytes": features.nbytes,
        },
        "same_rows_and_ed_max": f"{agree}/{args.queries}",
        "generate_seconds": round(gen_s, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"N={args.rows} D={features.shape[1]} k={args.k}, {args.queries} queries")
    print(
        "  FAISS (ES top-k, CS top-k, ED_max, certified): "
        f"median {result['faiss']['median_ms']:.1f} ms, "
        f"p95 {result['faiss']['p95_ms']:.1f} ms; indexes {search.nbytes / 1e9:.1f} GB; "
        f"certified {certified}/{args.queries}"
    )
    full = result["full_float64_pass"]
    print(
        "  full float64 pass (ES, CS of every row, ED_max): "
        f"median {full['median_ms']:.1f} ms, p95 {full['p95_ms']:.1f} ms; "
        f"features {features.nbytes / 1e9:.1f} GB"
    )
    print(f"  same rows and ED_max: {result['same_rows_and_ed_max']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
