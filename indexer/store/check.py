"""``dermris check``: verify a store and report every problem in one line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dermris.core.errors import DermrisError
from dermris.core.hashing import file_sha256

from ._files import inside
from ._format import FAISS_DIR, METADATA_DIR
from .reader import Store

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

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "rows": self.rows,
            "ok": self.ok,
            "problems": list(self.problems),
            "checked": list(self.checked),
        }


def check_store(path: str | os.PathLike, *, full: bool = False) -> CheckReport:
    """Verify a store: manifest, arrays, metadata, FAISS, sketch and checksums (reads only).

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
            report.problems.append(
                f"mask_area: {len(bad)} rows disagree with their masks (first row {bad[0]})"
            )
        blocks, _ = store.mask_blocks()
        bad = np.flatnonzero(blocks.sum(axis=1) != areas)
        if len(bad):
            report.problems.append(
                f"mask_blocks: {len(bad)} rows disagree with mask_area (first row {bad[0]})"
            )
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

    # metadata parts (the manifest guarantees they are contiguous from row 0)
    listed = set()
    for part in m.metadata_parts:
        listed.add(part.file)
        try:
            file = inside(root, f"{METADATA_DIR}/{part.file}")
        except DermrisError as exc:
            report.problems.append(f"metadata: {exc}")
            continue
        if not file.is_file():
            report.problems.append(f"metadata: part {part.file} is missing")
            continue
        if part.sha256 and file_sha256(file) != part.sha256:
            report.problems.append(f"metadata: part {part.file} does not match its sha256")
            continue
        try:
            rows = pq.read_table(file, columns=["row"]).column("row").to_numpy()
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            report.problems.append(f"metadata: part {part.file} unreadable: {exc}")
            continue
        if not np.array_equal(rows, np.arange(part.start, part.stop)):
            report.problems.append(
                f"metadata: part {part.file} has rows other than {part.start}..{part.stop - 1}"
            )
    metadata_dir = root / METADATA_DIR
    extra = (
        sorted(p.name for p in metadata_dir.iterdir() if p.name not in listed)
        if metadata_dir.is_dir()
        else []
    )
    if extra:
        report.problems.append(
            f"metadata: files not listed in the manifest: {', '.join(extra[:3])}"
            " (left by an interrupted run; the next index or delete removes them)"
        )
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

    # FAISS (derived, kept only when asked): every listed file holds the rows it says it holds
    if m.faiss or m.faiss_parts:
        _check_faiss(root, m, n, report)
        report.checked.append("faiss files (ntotal, ids)")

    # style sketch (derived)
    if m.sketch is not None:
        if m.sketch.rows > n:
            report.problems.append(f"sketch: covers {m.sketch.rows} rows, store has {n}")
        try:
            if store.sketch() is None:
                report.problems.append(f"sketch: group {m.sketch.group} is missing")
        except DermrisError as exc:
            report.problems.append(f"sketch: {exc}")
        report.checked.append("style sketch")

    # model file
    if m.model.weights_sha256:
        try:
            model_file = inside(root, m.model.weights_file or "model.safetensors")
            if not model_file.is_file():
                report.problems.append("model: model.safetensors is missing")
            elif file_sha256(model_file) != m.model.weights_sha256:
                report.problems.append(
                    "model: model.safetensors does not match the sha256 in the manifest"
                )
        except DermrisError as exc:
            report.problems.append(f"model: {exc}")
        report.checked.append("model sha256")
    return report


def _check_faiss(root: Path, m, n: int, report: CheckReport) -> None:
    import faiss

    entries = [(info.name, info.file, 0, n, info.ntotal) for info in m.faiss]
    entries += [
        (p.name, f"{FAISS_DIR}/{p.file}", p.start, p.stop, p.stop - p.start) for p in m.faiss_parts
    ]
    for _name, relative, start, stop, ntotal in entries:
        try:
            index = faiss.read_index(str(inside(root, relative, must_exist=True)))
        except DermrisError as exc:
            report.problems.append(f"faiss: {exc}")
            continue
        except RuntimeError as exc:
            report.problems.append(f"faiss: {relative} unreadable ({str(exc).splitlines()[0]})")
            continue
        if index.ntotal != stop - start or ntotal != stop - start:
            report.problems.append(
                f"faiss: {relative} holds {index.ntotal} vectors, expected {stop - start} "
                f"(rows {start}..{stop - 1})"
            )
            continue
        ids = (
            faiss.vector_to_array(index.id_map)
            if hasattr(index, "id_map")
            else np.arange(index.ntotal)
        )
        if not np.array_equal(np.sort(ids), np.arange(start, stop)):
            report.problems.append(f"faiss: {relative} ids are not the rows {start}..{stop - 1}")
