"""Benchmark stores: made with the real pipeline, or paper-sized with a measured style spectrum.

* :func:`pipeline_store` indexes synthetic lesion images with a preset (real Gram matrices).
* :func:`photo_store` indexes variations of real photographs (``photos.py``) with a preset:
  with ``lite0`` (real ImageNet weights, untrained segmenter) it behaves like a store of real
  images: spread-out style vectors and irregular masks.
* :func:`measure_spectrum` measures the principal spectrum of real style vectors (the ``lite0``
  preset, real ImageNet weights, on synthetic lesions).
* :func:`spectrum_store` writes ``N`` rows of paper size (B6 layout, ``D = 260,032`` float16)
  whose principal spectrum follows the measured one: ``r`` explicit principal directions with
  the measured variances, plus the remaining variance spread over all other directions.
* :func:`random_store` writes a small store of clustered random rows (no model), in seconds:
  enough for checks of the search's paths (``bench_retrieval.py --check-paths``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from dermris.core import StyleLayout
from dermris.indexer import Store, StoreWriter, index_folder, store_exists
from dermris.indexer.synthetic import TEXTURE_CLASSES, synthetic_lesion, write_synthetic_set
from dermris.models import backbone_info, build_model, get_preset

__all__ = ["pipeline_store", "photo_store", "measure_spectrum", "spectrum_store", "random_store"]


def pipeline_store(
    path: Path, n: int, *, preset: str = "tiny", seed: int = 0, sketch_dim: int = 256
) -> Path:
    """Index ``n`` synthetic lesion images with ``preset`` into ``path`` (reused if complete)."""

    if store_exists(path) and Store.open(path).rows == n:
        return path
    shutil.rmtree(path, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        per_class = -(-n // len(TEXTURE_CLASSES))
        write_synthetic_set(tmp, per_class=per_class, size=160, seed=seed)
        images = sorted((Path(tmp) / "images").iterdir())[:n]
        folder = Path(tmp) / "subset"
        folder.mkdir()
        for image in images:
            image.rename(folder / image.name)
        index_folder(
            folder, path, preset=preset, progress=True, sketch_dim=sketch_dim, batch_size=32
        )
    return path


def photo_store(
    path: Path,
    n: int,
    *,
    preset: str = "lite0",
    size: int = 320,
    seed: int = 0,
    sketch_dim: int = 256,
    workdir: Path | None = None,
) -> Path:
    """Index ``n`` JPEGs made from scikit-image's photographs with ``preset``.

    The store is reused if it is complete.
    """
    from photos import write_photo_set

    if store_exists(path) and Store.open(path).rows == n:
        return path
    shutil.rmtree(path, ignore_errors=True)
    folder = write_photo_set(
        (workdir or path.parent) / f"photos-{size}-{seed}", n, size=size, seed=seed
    )
    index_folder(folder, path, preset=preset, progress=True, sketch_dim=sketch_dim, batch_size=32)
    return path


def measure_spectrum(n_images: int = 512, *, preset: str = "lite0", seed: int = 7) -> dict:
    """Singular values of centred real style vectors, normalised to a total variance of 1."""
    import torch

    from dermris.indexer import Embedder

    model = build_model(get_preset(preset))
    embedder = Embedder(model, device=torch.device("cpu"), batch_size=32)
    rng = np.random.default_rng(seed)
    images = [
        synthetic_lesion(TEXTURE_CLASSES[i % 4], seed=int(rng.integers(1 << 30)), size=192).image
        for i in range(n_images)
    ]
    style = embedder.embed(images).style.astype(np.float64)
    centred = style - style.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    variance = sv**2 / (sv**2).sum()
    return {
        "preset": preset,
        "images": n_images,
        "style_dim": int(style.shape[1]),
        "variance_fraction": variance.tolist(),
        "mean_abs": float(np.abs(style).mean()),
        "total_variance_per_dim": float((centred**2).sum() / n_images / style.shape[1]),
    }


def spectrum_store(
    path: Path,
    n: int,
    spectrum: dict,
    *,
    rank: int = 256,
    seed: int = 0,
    sketch_dim: int = 256,
    chunk: int = 256,
    progress: bool = True,
) -> Path:
    """Write ``n`` paper-sized rows (B6 layout, float16 style) following ``spectrum``."""

    if (
        store_exists(path)
        and Store.open(path).rows == n
        and getattr(Store.open(path).sketch_info, "rows", None) == n
    ):
        return path
    shutil.rmtree(path, ignore_errors=True)
    config = get_preset("paper")
    info = backbone_info(config.backbone, config.style_stages)
    layout = StyleLayout.from_channels(info.stage_channels, config.style_weights)
    big_d = layout.dim
    rng = np.random.default_rng(seed)
    variance = np.asarray(spectrum["variance_fraction"], np.float64)
    rank = min(rank, len(variance) - 1)
    total = spectrum["total_variance_per_dim"] * big_d  # expected ||x - mu||^2
    principal_sd = np.sqrt(variance[:rank] * total)
    tail_sd = np.sqrt(max(variance[rank:].sum(), 1e-6) * total / big_d)
    basis = rng.standard_normal((rank, big_d), dtype=np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    mean = np.abs(rng.standard_normal(big_d, dtype=np.float32)) * spectrum["mean_abs"]
    pool = rng.standard_normal((64, big_d), dtype=np.float32) * np.float32(tail_sd)
    writer = StoreWriter.create(path, model_config=config, style_layout=layout)
    size = config.mask_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    feature_basis = rng.standard_normal((rank, config.feature_dim)).astype(np.float32) / np.sqrt(
        rank
    )
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"spectrum store {n}", unit="row", disable=not progress)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        coeff = rng.standard_normal((b, rank)).astype(np.float32) * principal_sd.astype(np.float32)
        style = mean + coeff @ basis
        for i in range(b):
            a, c = rng.integers(0, 64, 2)
            s1, s2 = rng.integers(0, big_d, 2)
            style[i] += (
                np.roll(pool[a], int(s1)) + np.roll(pool[c], int(s2)) * rng.choice([-1, 1])
            ) / np.sqrt(2)
        features = np.tanh(coeff / principal_sd[:1].astype(np.float32)) @ feature_basis * 3
        features += rng.standard_normal(features.shape).astype(np.float32) * 0.3
        cx, cy, ax, ay = (
            rng.uniform(0.3, 0.7, b),
            rng.uniform(0.3, 0.7, b),
            rng.uniform(0.08, 0.3, b),
            rng.uniform(0.08, 0.3, b),
        )
        masks = ((xx[None] - cx[:, None, None]) / ax[:, None, None]) ** 2 + (
            (yy[None] - cy[:, None, None]) / ay[:, None, None]
        ) ** 2 < 1.0
        ids = [f"SPEC_{r:07d}" for r in range(start, start + b)]
        records = pa.table(
            {
                "image_id": pa.array(ids),
                "path": pa.array([f"synthetic://{i}" for i in ids]),
                "sha256": pa.array([f"{r:064x}" for r in range(start, start + b)]),
                "width": pa.array([size] * b, pa.int32()),
                "height": pa.array([size] * b, pa.int32()),
            }
        )
        writer.append(features=features, style=style, masks=masks, records=records)
        bar.update(b)
    bar.close()
    writer.update_sketch(dim=sketch_dim)
    writer.close()
    (path / "benchmark-source.json").write_text(
        json.dumps({"kind": "spectrum", "rank": rank, "seed": seed})
    )
    return path


def random_store(
    path: Path, n: int = 64, *, seed: int = 0, channels=(4, 6, 8), sketch_dim: int = 8
) -> Path:
    """Write ``n`` clustered random rows (tiny preset's shapes, 32 x 32 masks, no model).

    Reused when ``path`` already holds ``n`` rows with a sketch of them.
    """
    if (
        store_exists(path)
        and Store.open(path).rows == n
        and getattr(Store.open(path).sketch_info, "rows", None) == n
    ):
        return path
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    config = get_preset("tiny").replace(feature_dim=16, image_size=32)
    layout = StyleLayout.from_channels(channels)
    centres = rng.normal(size=(4, layout.dim)) * 4
    style = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, layout.dim))
    features = rng.normal(size=(n, config.feature_dim)).astype(np.float32)
    masks = rng.random((n, 32, 32)) < rng.uniform(0.05, 0.5, (n, 1, 1))
    ids = [f"RAND_{r:05d}" for r in range(n)]
    records = pa.table(
        {
            "image_id": pa.array(ids),
            "path": pa.array([f"synthetic://{i}" for i in ids]),
            "sha256": pa.array([f"{r:064x}" for r in range(n)]),
            "width": pa.array([32] * n, pa.int32()),
            "height": pa.array([32] * n, pa.int32()),
        }
    )
    writer = StoreWriter.create(path, model_config=config, style_layout=layout)
    writer.append(features=features, style=style.astype(np.float32), masks=masks, records=records)
    writer.update_sketch(dim=sketch_dim)
    writer.close()
    return path
