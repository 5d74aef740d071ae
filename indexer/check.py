"""``dermris check``: verify a store and report every problem in one line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models import file_sha256

from .errors import DermrisError
from .store import FAISS_FILES, METADATA_DIR, Store

__all__ = ["CheckReport", "check_store"]


@dataclass
class CheckReport:
    """Result of :func:`check_store`.

    Attributes
    ----------
    rows : int
        Committed rows (0 when the manifest could not be read).
    problems : list of str
        One line per problem; empty when the store is sound.
    checked : list of str
        What was verified.
    """

    rows: int = 0
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def check_store(path: str | os.PathLike, *, full: bool = False) -> CheckReport:
    """Verify a store: manifest, arrays, metadata, FAISS, sketch and checksums.

    Parameters
    ----------
    path : path-like
        The store.
    full : bool
        Also read every style row (verifies all their checksums; reads the whole store).
    """
    root = Path(path)
    report = CheckReport()
    try:
        store = Store.open(root)
    except DermrisError as exc:
        report.problems.append(f"manifest: {exc}")
        return report
    m = store.manifest
    n = store.rows
    report.rows = n
    report.checked.append("manifest")

    # arrays: shapes and dtypes were checked by Store.open; read what is cheap to read in full
    try:
        feats = store.features()
        if not np.isfinite(feats).all():
            report.problems.append("features: non-finite values")
        areas = store.mask_areas()
        masks = store.masks()
        popcount = np.bitwise_count(masks).sum(axis=1, dtype=np.int64)
        bad = np.flatnonzero(popcount != areas)
        if len(bad):
            report.problems.append(f"mask_area: {len(bad)} rows disagree with their masks (first row {bad[0]})")
        blocks, _ = store.mask_blocks()
        bad = np.flatnonzero(blocks.sum(axis=1) != areas)
        if len(bad):
            report.problems.append(f"mask_blocks: {len(bad)} rows disagree with mask_area (first row {bad[0]})")
        report.checked.append("features, mask, mask_area, mask_blocks (checksums and consistency)")
    except DermrisError as exc:
        report.problems.append(f"arrays: {exc}")
    if full:
        try:
            for _ in store.iter_style_blocks():
                pass
            report.checked.append("style (every row's checksum)")
        except DermrisError as exc:
            report.problems.append(f"style: {exc}")
    else:
        try:
            store.style_rows([r for r in {0, n // 2, n - 1} if 0 <= r < n])
            report.checked.append("style (first, middle, last row)")
        except DermrisError as exc:
            report.problems.append(f"style: {exc}")

    # metadata parts
    expected_start = 0
    listed = set()
    for part in m["metadata_parts"]:
        listed.add(part["file"])
        file = root / METADATA_DIR / part["file"]
        if part["start"] != expected_start:
            report.problems.append(f"metadata: part {part['file']} starts at {part['start']}, expected {expected_start}")
        expected_start = part["stop"]
        if not file.is_file():
            report.problems.append(f"metadata: part {part['file']} is missing")
            continue
        if part.get("sha256") and file_sha256(file) != part["sha256"]:
            report.problems.append(f"metadata: part {part['file']} does not match its sha256")
            continue
        try:
            rows = pq.read_table(file, columns=["row"]).column("row").to_numpy()
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            report.problems.append(f"metadata: part {part['file']} unreadable: {exc}")
            continue
        if not np.array_equal(rows, np.arange(part["start"], part["stop"])):
            report.problems.append(f"metadata: part {part['file']} has rows other than {part['start']}..{part['stop'] - 1}")
    if expected_start < n:
        report.problems.append(f"metadata: parts cover {expected_start} rows, manifest commits {n}")
    extra = sorted(p.name for p in (root / METADATA_DIR).iterdir() if p.name not in listed)
    if extra:
        report.problems.append(f"metadata: files not listed in the manifest: {', '.join(extra[:3])}"
                               " (left by an interrupted run; the next index or delete removes them)")
    try:
        meta = store.metadata(columns=["sha256", "image_id"])
        shas = meta.column("sha256").to_pylist()
        if len(set(shas)) != len(shas):
            report.problems.append(f"metadata: {len(shas) - len(set(shas))} duplicate image sha256")
        ids = meta.column("image_id").to_pylist()
        if len(set(ids)) != len(ids):
            report.problems.append(f"metadata: {len(ids) - len(set(ids))} duplicate image ids")
    except DermrisError as exc:
        report.problems.append(f"metadata: {exc}")
    report.checked.append("metadata parts (rows, sha256, unique ids)")

    # FAISS (derived): files recorded in the manifest must match the committed rows
    for name, info in (m.get("faiss") or {}).items():
        file = root / FAISS_FILES.get(name, info.get("file", ""))
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:
            report.problems.append(f"faiss: {name} unreadable ({str(exc).splitlines()[0]})")
            continue
        if index.ntotal != n or info.get("ntotal") != n:
            report.problems.append(f"faiss: {name} holds {index.ntotal} vectors, store has {n} rows")
            continue
        ids = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else np.arange(index.ntotal)
        if not np.array_equal(np.sort(ids), np.arange(n)):
            report.problems.append(f"faiss: {name} ids are not the rows 0..{n - 1}")
    report.checked.append("faiss (ntotal, ids)")

    # style sketch (derived)
    sketch = m.get("sketch")
    if sketch:
        if sketch["rows"] > n:
            report.problems.append(f"sketch: covers {sketch['rows']} rows, store has {n}")
        try:
            sk = store.sketch()
            if sk is None:
                report.problems.append(f"sketch: group {sketch['group']} is missing")
            elif sk.components.shape != (sketch["dim"], store.style_dim):
                report.problems.append("sketch: basis shape does not match the manifest")
        except DermrisError as exc:
            report.problems.append(f"sketch: {exc}")
        report.checked.append("style sketch")

    # model file
    weights = m["model"].get("weights_sha256")
    if weights:
        model_file = store.model_file
        if model_file is None or not model_file.is_file():
            report.problems.append("model: model.safetensors is missing")
        elif file_sha256(model_file) != weights:
            report.problems.append("model: model.safetensors does not match the sha256 in the manifest")
        report.checked.append("model sha256")

    deleted = m.get("deleted", [])
    if any(not 0 <= d.get("row", -1) < n for d in deleted):
        report.problems.append("deleted: rows outside the committed range")
    return report
