"""Indexing throughput: the whole pipeline against the model alone, and what precision costs.

For each preset and input size it measures, in one run on one machine:

* **decode**: the reader stage alone (worker processes read, hash, decode, resize), images/s;
* **model**: the model alone on pixel tensors already on the device, images/s, and the share
  of the forward pass spent in the segmenter;
* **pipeline**: ``index_folder`` end to end into a new store, images/s over the embedding and
  committing of rows (model set-up and the derived data built at the end are timed apart),
  with seconds per stage, and the ratio pipeline / model;
* GPU memory (peak allocated) on CUDA.

``--compare-precision`` embeds the same images in float32, bfloat16 and float16 and reports the
relative error of features and style vectors, mask agreement, and the top-10 overlap of every
measure (each image a query against all the others, brute force) against float32.

``--cluster SPEC ...`` measures ``index_folder(cluster=SPEC)`` instead (``local:N``, ``cuda``,
``tcp://HOST:PORT``), each against one process in the same run: images/s over the embedding
phase (first block submitted to last block committed; the cluster's start, the model loading on
every worker and the derived data are timed apart), and the ratio to the first spec given.
Results go to ``results/index-cluster.json``.

Inputs are JPEGs made from scikit-image's photographs (``photos.py``) at the preset's input
size and at 1024 px (so decoding counts). Writes JSON and prints a table.

Examples
--------
::

    python benchmarks/bench_index.py --preset tiny lite0 --images 384           # CPU
    python benchmarks/bench_index.py --preset paper --device cuda --images 2048 --batch-size 64 \\
        --compare-precision 256
    python benchmarks/bench_index.py --preset tiny --cluster local:1 local:2 --images 512 \\
        --repeats 3
    python benchmarks/bench_index.py --preset paper --cluster cuda --device cuda --images 4096 \\
        --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dermris.indexer import ImageLoader, index_folder, list_images  # noqa: E402
from dermris.indexer.embed import Embedder, resolve_device, resolve_precision  # noqa: E402
from dermris.models import build_model, get_preset, save_model  # noqa: E402
from dermris.retriever import MEASURES  # noqa: E402

from photos import write_photo_set  # noqa: E402

HERE = Path(__file__).resolve().parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pixels(files, size: int, workers: int) -> torch.Tensor:
    batches = [b.pixels for b in ImageLoader(files, size=size, batch_size=64, workers=workers)]
    return torch.cat(batches)


def decode_only(files, size: int, batch: int, workers: int) -> dict:
    t = time.perf_counter()
    n = sum(len(b.items) for b in ImageLoader(files, size=size, batch_size=batch, workers=workers))
    s = time.perf_counter() - t
    return {"images": n, "seconds": round(s, 3), "images_per_s": round(n / s, 1)}


@torch.inference_mode()
def model_only(
    model, device, precision: str, batch: int, pixels: torch.Tensor, repeats: int = 1
) -> dict:
    """Forward passes on pixels already on the device (normalisation included), images/s."""
    emb = Embedder(model, device=device, batch_size=batch, precision=precision)
    x = pixels.to(device)
    emb.forward_pixels(x[:batch])  # warm-up (cudnn autotune, allocator)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(x), batch):
            emb.forward_pixels(x[i : i + batch])
    _sync(device)
    seconds = time.perf_counter() - t
    n = len(x) * repeats
    out = {
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 1),
        "precision": emb.precision,
    }
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    # where the time goes: the classification ensemble (with Grams) against the segmenter
    xb = emb._normalise(x[:batch])
    parts = {}
    for name, part in (("extractor", emb.model.extractor), ("segmenter", emb.model.segmenter)):
        with emb._autocast():
            part(xb)
            _sync(device)
            t = time.perf_counter()
            reps = max(1, min(20, int(256 / batch)))
            for _ in range(reps):
                part(xb)
            _sync(device)
        parts[name] = (time.perf_counter() - t) / (reps * len(xb))
    out["ms_per_image"] = {k: round(v * 1e3, 3) for k, v in parts.items()}
    out["segmenter_share"] = round(
        parts["segmenter"] / (parts["segmenter"] + parts["extractor"]), 3
    )
    return out


def pipeline(
    folder: Path,
    weights: Path,
    device,
    precision: str,
    batch: int,
    workers: int,
    commit_every: int,
    work: Path,
) -> dict:
    store = work / f"store-{time.time_ns()}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = index_folder(
        folder,
        store,
        weights=weights,
        device=str(device),
        batch_size=batch,
        workers=workers,
        precision=precision,
        commit_every=commit_every,
        progress=False,
    )
    st = report.stages
    embed_s = report.seconds - st.get("setup", 0.0) - st.get("derived", 0.0)
    out = {
        "images": report.indexed,
        "rejected": len(report.rejected),
        "seconds_total": round(report.seconds, 3),
        "seconds_pipeline": round(embed_s, 3),
        "images_per_s": round(report.indexed / embed_s, 1),
        "images_per_s_with_setup_and_derived": round(report.indexed / report.seconds, 1),
        "stages": {k: round(v, 3) for k, v in st.items()},
        "precision": report.precision,
    }
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    shutil.rmtree(store, ignore_errors=True)
    return out


# -- cluster ----------------------------------------------------------------------------------
def cluster_pipeline(
    folder: Path,
    weights: Path,
    cluster: str | None,
    device: str,
    batch: int,
    workers: int,
    block_size: int | None,
    commit_every: int,
    work: Path,
) -> dict:
    """One ``index_folder`` run into a new store, on a cluster (or in this process for None)."""
    store = work / f"store-{time.time_ns()}"
    kwargs = {"cluster": cluster, "block_size": block_size} if cluster else {"workers": workers}
    report = index_folder(
        folder,
        store,
        weights=weights,
        device=device,
        batch_size=batch,
        commit_every=commit_every,
        progress=False,
        **kwargs,
    )
    st = report.stages
    if cluster:
        embed_s = st["embed"]
    else:
        embed_s = report.seconds - st.get("setup", 0.0) - st.get("derived", 0.0)
    out = {
        "cluster": cluster or "none (one process)",
        "images": report.indexed,
        "rejected": len(report.rejected),
        "seconds_total": round(report.seconds, 3),
        "seconds_embedding": round(embed_s, 3),
        "images_per_s": round(report.indexed / embed_s, 2),
        "images_per_s_with_start": round(
            report.indexed / (report.seconds - st.get("derived", 0.0)), 2
        ),
        "stages": {k: round(v, 3) for k, v in st.items()},
        "device": report.device,
        "precision": report.precision,
        **(
            {
                "workers": report.cluster.get("workers"),
                "blocks": report.cluster.get("blocks"),
                "block_size": report.cluster.get("block_size"),
            }
            if cluster
            else {}
        ),
    }
    shutil.rmtree(store, ignore_errors=True)
    return out


def cluster_benchmark(args, workers: int, work: Path) -> list[dict]:
    """images/s of every --cluster spec and of one process, per preset, repeats alternating."""
    runs = []
    for preset_name in args.preset:
        config = get_preset(preset_name)
        weights = work / f"{preset_name}.safetensors"
        save_model(build_model(config), weights)
        px = config.image_size
        folder = write_photo_set(args.workdir / f"photos-{px}", args.images, size=px)
        if len(list_images(folder)) != args.images:
            folder = work / f"photos-{px}-{args.images}"
            folder.mkdir()
            for f in list_images(args.workdir / f"photos-{px}")[: args.images]:
                shutil.copy(f.path, folder / f.path.name)
        specs = [None, *args.cluster]
        results: dict = {spec: [] for spec in specs}
        for _ in range(args.repeats):  # alternate, so every spec sees the same machine load
            for spec in specs:
                results[spec].append(
                    cluster_pipeline(
                        folder,
                        weights,
                        spec,
                        args.device,
                        args.batch_size,
                        workers,
                        args.block_size,
                        args.commit_every,
                        work,
                    )
                )
                print(json.dumps(results[spec][-1]))
                sys.stdout.flush()
        base = _median_run(results[args.cluster[0]])["images_per_s"]
        for spec in specs:
            run = {"preset": preset_name, "input_px": px, **_median_run(results[spec])}
            run["ratio_to_" + args.cluster[0]] = round(run["images_per_s"] / base, 3)
            runs.append(run)
    print(
        f"\n{'preset':<7}{'cluster':>22}{'workers':>9}{'images/s':>10}"
        f"{'with start':>12}{'ratio':>7}  repeats"
    )
    for r in runs:
        ratio = r["ratio_to_" + args.cluster[0]]
        print(
            f"{r['preset']:<7}{r['cluster']:>22}{r.get('workers') or '-':>9}"
            f"{r['images_per_s']:>10.1f}"
            f"{r['images_per_s_with_start']:>12.1f}{ratio:>7.2f}  {r['repeats_images_per_s']}"
        )
    return runs


# -- precision ------------------------------------------------------------------------------
def _rankings(features, style, masks, k: int, device) -> dict[str, np.ndarray]:
    """Top-k rows of every image (as a query, excluding itself) under the nine measures."""
    f = torch.from_numpy(features).to(device, torch.float64)
    s = torch.from_numpy(style).to(device, torch.float64)
    m = torch.from_numpy(masks.reshape(len(masks), -1)).to(device, torch.float64)
    n = len(f)
    ed = torch.cdist(f, f)
    fn = f / f.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cs = ((fn @ fn.T).clamp(-1, 1) + 1) / 2
    sq = (s * s).sum(1)
    ls = (sq[:, None] + sq[None, :] - 2 * s @ s.T).clamp_min(0)
    area = m.sum(1)
    inter = m @ m.T
    total = area[:, None] + area[None, :]
    dc = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    es = 1 - ed / ed.max(dim=1, keepdim=True).values.clamp_min(1e-300)
    ss = 1 - ls / ls.max(dim=1, keepdim=True).values.clamp_min(1e-300)

    def h(*c):
        stack = torch.stack(c)
        return torch.where(
            (stack <= 0).any(0),
            torch.zeros_like(stack[0]),
            len(c) / (1 / stack.clamp_min(1e-300)).sum(0),
        )

    scores = {
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
    out = {}
    eye = torch.eye(n, dtype=torch.bool, device=device)
    for name, sc in scores.items():
        sc = sc.masked_fill(eye, -1.0)
        out[name] = torch.argsort(-sc, dim=1, stable=True)[:, :k].cpu().numpy()
    return out


def compare_precisions(model, device, pixels: torch.Tensor, batch: int, k: int = 10) -> dict:
    if device.type != "cuda":
        return {"skipped": "reduced precision runs on CUDA only"}
    runs = {}
    for precision in ("float32", "tf32", "bfloat16", "float16"):
        emb = Embedder(model, device=device, batch_size=batch, precision=precision)
        e = emb.embed_pixels(pixels)
        runs[precision] = e
    base = runs["float32"]
    base_rank = _rankings(base.features, base.style, base.masks, k, device)
    out = {"images": len(pixels), "k": k}
    for precision in ("tf32", "bfloat16", "float16"):
        e = runs[precision]
        frel = np.linalg.norm(e.features - base.features, axis=1) / np.maximum(
            np.linalg.norm(base.features, axis=1), 1e-30
        )
        srel = np.linalg.norm(e.style - base.style, axis=1) / np.maximum(
            np.linalg.norm(base.style, axis=1), 1e-30
        )
        agree = (e.masks == base.masks).reshape(len(e.masks), -1).mean(1)
        a = base.masks.reshape(len(e.masks), -1)
        b = e.masks.reshape(len(e.masks), -1)
        tot = a.sum(1) + b.sum(1)
        dice = np.where(tot > 0, 2 * (a & b).sum(1) / np.maximum(tot, 1), 1.0)
        rank = _rankings(e.features, e.style, e.masks, k, device)
        overlap = {
            m: float(np.mean([len(set(x) & set(y)) / k for x, y in zip(base_rank[m], rank[m])]))
            for m in MEASURES
        }
        out[precision] = {
            "feature_relative_error": {"median": float(np.median(frel)), "max": float(frel.max())},
            "style_relative_error": {"median": float(np.median(srel)), "max": float(srel.max())},
            "mask_pixel_agreement": {"mean": float(agree.mean()), "min": float(agree.min())},
            "mask_dice_vs_float32": {"mean": float(dice.mean()), "min": float(dice.min())},
            f"top{k}_overlap": overlap,
            f"top{k}_overlap_min": min(overlap.values()),
        }
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run with the median images/s, with every repeat's images/s beside it."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    out = dict(ordered[len(ordered) // 2])
    out["repeats_images_per_s"] = [r["images_per_s"] for r in runs]
    return out


def print_table(runs: list[dict]) -> None:
    print(
        f"\n{'preset':<7}{'input':>7}{'device':>8}{'prec':>10}{'decode/s':>10}{'model/s':>10}{'pipe/s':>9}"
        f"{'ratio':>7}{'seg %':>7}{'GPU GB':>8}  stages (s)"
    )
    for r in runs:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["pipeline"]["stages"].items())
        print(
            f"{r['preset']:<7}{r['input_px']:>7}{r['device']:>8}{r['model']['precision']:>10}"
            f"{r['decode']['images_per_s']:>10.0f}{r['model']['images_per_s']:>10.1f}"
            f"{r['pipeline']['images_per_s']:>9.1f}{r['pipeline_over_model']:>7.2f}"
            f"{100 * r['model']['segmenter_share']:>7.0f}"
            f"{r['model'].get('peak_gpu_memory_gb', 0):>8.1f}  {stages}"
        )


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["tiny", "lite0"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--input",
        nargs="+",
        default=["preset", "1024"],
        help="input JPEG sizes: 'preset' (the model's input size) and/or pixels",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", nargs="+", default=["auto"])
    parser.add_argument(
        "--compare-presets",
        nargs="*",
        default=None,
        help="presets for --compare-precision (default: those benchmarked)",
    )
    parser.add_argument(
        "--skip-decode", action="store_true", help="do not time the reader stage alone"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: cores - 1)"
    )
    parser.add_argument("--commit-every", type=int, default=256)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure model and pipeline this many times, alternating; report medians",
    )
    parser.add_argument(
        "--compare-precision",
        type=int,
        default=0,
        metavar="N",
        help="also compare float32/bfloat16/float16 on N images (CUDA)",
    )
    parser.add_argument(
        "--cluster",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="measure indexing on these Dask clusters (local:N, cuda, tcp://HOST:PORT) instead",
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="files per cluster task (default: dermris's)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("DERMRIS_BENCH_DIR", "/tmp/dermris-bench")),
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    precisions = [resolve_precision(p, device) for p in args.precision]
    from dermris.indexer.loader import default_workers

    workers = default_workers() if args.workers is None else args.workers
    out = args.out or HERE / "results" / (
        f"index-{device.type}.json" if not args.cluster else "index-cluster.json"
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    if args.cluster:
        try:
            runs = cluster_benchmark(args, workers, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        existing = json.loads(out.read_text()) if out.is_file() else {"runs": []}
        fresh = {(r["preset"], r["cluster"]) for r in runs}
        keep = [r for r in existing.get("runs", []) if (r["preset"], r["cluster"]) not in fresh]
        for r in runs:
            r["command"] = " ".join(sys.argv)
            r["date"] = time.strftime("%Y-%m-%d")
        payload = {"machine": _machine(), "runs": keep + runs}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1))
        print(f"\nJSON: {out}")
        return
    runs = []
    precision_report = {}
    try:
        for preset_name in args.preset:
            config = get_preset(preset_name)
            t = time.perf_counter()
            model = build_model(config, device=device)
            weights = work / f"{preset_name}.safetensors"
            save_model(model, weights)
            build_s = time.perf_counter() - t
            for size_arg in args.input:
                px = config.image_size if size_arg == "preset" else int(size_arg)
                folder = write_photo_set(args.workdir / f"photos-{px}", args.images, size=px)
                files = list_images(folder)[: args.images]
                decode = (
                    {"images_per_s": float("nan")}
                    if args.skip_decode
                    else decode_only(files, config.image_size, args.batch_size, workers)
                )
                pixels = _pixels(files, config.image_size, workers)
                for precision in precisions:
                    models, pipes = [], []
                    for _ in range(args.repeats):  # alternate, so both see the same machine load
                        models.append(model_only(model, device, precision, args.batch_size, pixels))
                        pipes.append(
                            pipeline(
                                folder,
                                weights,
                                device,
                                precision,
                                args.batch_size,
                                workers,
                                args.commit_every,
                                work,
                            )
                        )
                    model_run = _median_run(models)
                    pipe = _median_run(pipes)
                    run = {
                        "preset": preset_name,
                        "input_px": px,
                        "device": str(device),
                        "gpu": torch.cuda.get_device_name(device)
                        if device.type == "cuda"
                        else None,
                        "batch_size": args.batch_size,
                        "workers": workers,
                        "model_build_seconds": round(build_s, 1),
                        "decode": decode,
                        "model": model_run,
                        "pipeline": pipe,
                        "pipeline_over_model": round(
                            pipe["images_per_s"] / model_run["images_per_s"], 3
                        ),
                    }
                    runs.append(run)
                    print_table([run])
                    sys.stdout.flush()
            compare = args.compare_presets if args.compare_presets is not None else args.preset
            if args.compare_precision and device.type == "cuda" and preset_name in compare:
                folder = write_photo_set(
                    args.workdir / f"photos-{config.image_size}",
                    args.compare_precision,
                    size=config.image_size,
                )
                files = list_images(folder)[: args.compare_precision]
                precision_report[preset_name] = compare_precisions(
                    model, device, _pixels(files, config.image_size, workers), args.batch_size
                )
                print(json.dumps({preset_name: precision_report[preset_name]}, indent=1))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(runs)
    existing = json.loads(out.read_text()) if out.is_file() else {"runs": []}

    def key(r):
        return r["preset"], r["input_px"], r["device"], r["model"]["precision"]

    keys = {key(r) for r in runs}
    keep = [r for r in existing.get("runs", []) if key(r) not in keys]
    payload = {
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": keep + runs,
        "precision": {**existing.get("precision", {}), **precision_report},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
