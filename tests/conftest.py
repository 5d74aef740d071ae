"""Shared fixtures: a tiny model, synthetic image folders, indexed and random stores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("OMP_NUM_THREADS", "2")
# `dermris index` without --preset picks the best model installed (lite0 with its package);
# the suite's stores use the tiny preset unless a test asks otherwise
os.environ.setdefault("DERMRIS_PRESET", "tiny")


@pytest.fixture(scope="session", autouse=True)
def _each_model_built_once():
    """``index`` builds a new store's model from its preset; the same config builds the same
    weights (seeded initialisation and BatchNorm calibration), so a test session builds each
    config once and hands every later run a copy. A tiny build costs about 25 CPU seconds on
    two cores, most of it the calibration; only calls with the usual arguments are cached.
    """
    import copy

    from dermris.indexer import pipeline

    original = getattr(pipeline, "build_model", None)
    if original is None:
        yield
        return
    built: dict = {}

    def build_once(config, *args, **kwargs):
        progress = kwargs.pop("progress", None)  # a copy of a cached build is ready at once
        if args or set(kwargs) - {"backbone_weights", "pretrained", "device"}:
            return original(config, *args, progress=progress, **kwargs)
        key = (
            repr(config),
            repr(kwargs.get("backbone_weights")),
            bool(kwargs.get("pretrained")),
            str(kwargs.get("device", "cpu")),
        )
        if key not in built:
            built[key] = original(config, progress=progress, **kwargs)
            progress = None
        if progress is not None:
            progress(1, 1, "model ready")
        return copy.deepcopy(built[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "build_model", build_once)
        yield


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset's model (the same build ``index --preset tiny`` gets in this session)."""
    from dermris.indexer import pipeline
    from dermris.models import get_preset

    return pipeline.build_model(get_preset("tiny"))


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """32 synthetic lesion JPEGs (4 texture classes) with a metadata CSV."""
    from dermris.indexer.synthetic import write_synthetic_set

    root = tmp_path_factory.mktemp("synthetic")
    csv = write_synthetic_set(root, per_class=8, size=160)
    return root / "images", csv


@pytest.fixture(scope="session")
def indexed_store(synthetic_set, tmp_path_factory):
    """The synthetic set indexed with the tiny preset (keeping FAISS files)."""
    from dermris.indexer import index_folder

    images, csv = synthetic_set
    store = tmp_path_factory.mktemp("stores") / "tiny"
    report = index_folder(
        images,
        store,
        preset="tiny",
        metadata=csv,
        progress=False,
        device="cpu",
        batch_size=8,
        commit_every=8,
        faiss_files=True,
    )
    assert report.indexed == 32
    return store


def make_random_store(
    path,
    *,
    n: int,
    seed: int,
    feature_dim: int = 6,
    channels=(2, 3, 4),
    duplicate_rows: int = 0,
    empty_masks: int = 0,
    identical: bool = False,
    mask_density: float = 0.3,
    commit_sizes=None,
    sketch_dim: int | None = 4,
    sketch_after: int | None = None,
    clusters: int = 0,
    extra_columns: dict | None = None,
    faiss_files: bool = False,
):
    """A store of random rows (no model) written through the real StoreWriter.

    ``duplicate_rows`` rows are exact copies of earlier rows (ties), ``empty_masks`` rows have
    empty masks, ``identical`` makes every row the same (zero maxima). The style sketch (of
    ``sketch_dim``; None for none) is built after ``sketch_after`` commits (default: all), so
    later rows are outside it. ``clusters`` > 0 draws style vectors around that many centres.
    ``faiss_files`` keeps FAISS files (one part per commit).
    """
    from dermris.core import StyleLayout
    from dermris.indexer import StoreWriter
    from dermris.models import get_preset

    rng = np.random.default_rng(seed)
    config = get_preset("tiny").replace(
        feature_dim=feature_dim, image_size=32, segmenter=get_preset("tiny").segmenter
    )
    layout = StyleLayout.from_channels(channels)
    writer = StoreWriter.create(path, model_config=config, style_layout=layout)
    feats = rng.normal(size=(n, feature_dim)).astype(np.float32)
    stage_scale = np.repeat(10.0 ** rng.uniform(-4, 3, len(channels)), layout.lengths)
    style = rng.normal(size=(n, layout.dim)) * stage_scale
    if clusters:
        centres = rng.normal(size=(clusters, layout.dim)) * stage_scale * 4
        style = style * 0.3 + centres[rng.integers(0, clusters, n)]
    style = style.astype(np.float32)
    masks = rng.random((n, 32, 32)) < mask_density
    for _ in range(min(duplicate_rows, n - 1)):
        src, dst = rng.integers(0, n, 2)
        feats[dst], style[dst], masks[dst] = feats[src], style[src], masks[src]
    for i in rng.choice(n, size=min(empty_masks, n), replace=False):
        masks[i] = False
    if identical:
        feats[:] = feats[0]
        style[:] = style[0]
        masks[:] = masks[0]
    ids = [f"IMG_{seed}_{i:04d}" for i in range(n)]
    sizes = commit_sizes or [n]
    start = 0
    for i, size in enumerate(sizes):
        if sketch_dim is not None and sketch_after == i:
            writer.update_sketch(dim=sketch_dim)
        stop = min(n, start + size)
        if stop <= start:
            break
        records = pa.table(
            {
                "image_id": pa.array(ids[start:stop]),
                "path": pa.array([f"/nonexistent/{i}.jpg" for i in ids[start:stop]]),
                "sha256": pa.array([f"{i:064x}" for i in range(start, stop)]),
                "width": pa.array([32] * (stop - start), pa.int32()),
                "height": pa.array([32] * (stop - start), pa.int32()),
            }
        )
        for name, values in (extra_columns or {}).items():
            records = records.append_column(name, pa.array(list(values)[start:stop]))
        writer.append(
            features=feats[start:stop],
            style=style[start:stop],
            masks=masks[start:stop],
            records=records,
        )
        writer.update_faiss_files(enable=faiss_files)
        start = stop
    if sketch_dim is not None and sketch_after is None:
        writer.update_sketch(dim=sketch_dim)
    writer.close()
    return Path(path)


@pytest.fixture
def random_store(tmp_path):
    def factory(**kwargs):
        name = f"store_{kwargs.get('seed', 0)}_{kwargs.get('n', 0)}_{len(list(tmp_path.iterdir()))}"
        return make_random_store(tmp_path / name, **kwargs)

    return factory
