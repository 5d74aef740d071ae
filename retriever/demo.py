"""``dermris demo``: an offline, end-to-end run on synthetic lesion images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from indexer import index_folder
from indexer.synthetic import TEXTURE_CLASSES, synthetic_lesion, write_synthetic_set

from .search import Hit, Retriever
from .sheet import contact_sheet

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo made."""

    store: Path
    query: Path
    query_texture: str
    sheet: Path
    rows: int
    results: dict[str, list[Hit]]


def run_demo(out: str | os.PathLike, *, per_class: int = 8, k: int = 5, progress: bool = True) -> DemoResult:
    """Generate ``4 * per_class`` synthetic lesions, index them with the ``tiny`` preset,
    query with a held-out synthetic lesion and write a contact sheet.

    Running it again reuses the images and the store (nothing is indexed twice).
    """
    out = Path(out)
    data = out / "data"
    csv = write_synthetic_set(data, per_class=per_class, seed=0)
    query_texture = TEXTURE_CLASSES[0]
    query = out / "query.jpg"
    synthetic_lesion(query_texture, seed=999_999, size=192).image.save(query, quality=92)
    store = out / "store"
    report = index_folder(data / "images", store, preset="tiny", metadata=csv, progress=progress)
    retriever = Retriever.open(store, device="cpu")
    results = retriever.search_all(query, k=k)
    sheet = contact_sheet(query, results, out / "sheet.png", query_label=f"query ({query_texture})")
    return DemoResult(store=store, query=query, query_texture=query_texture, sheet=sheet,
                      rows=report.rows, results=results)
