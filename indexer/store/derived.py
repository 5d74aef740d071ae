"""Derived data, rebuildable from ``arrays.zarr`` at any time: the FAISS indexes and the style
sketch (the PCA basis the retriever bounds style losses with)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.codecs

from dermris.core.atomic import atomic_path, fsync_dir
from dermris.core.errors import StoreFormatError

from . import _zarr
from ._files import inside
from ._format import FAISS_DIR, FAISS_NAMES, FaissPart, SketchInfo, faiss_part_file
from .sketch import fit_style_basis, orthonormality_error, project_style

if TYPE_CHECKING:
    import faiss

    from .reader import Store

__all__ = ["faiss_indexes_for", "load_faiss_index", "update_sketch", "write_faiss_parts"]


def faiss_indexes_for(features: np.ndarray, *, start: int = 0) -> dict[str, "faiss.Index"]:
    """``IDMap2(Flat L2)`` on the features and ``IDMap2(Flat IP)`` on the unit features, with
    ids ``start, start + 1, ...``."""
    import faiss

    n, dim = features.shape
    ids = np.arange(start, start + n, dtype=np.int64)
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
    l2.add_with_ids(np.ascontiguousarray(features, np.float32), ids)
    unit = np.array(features, np.float32, copy=True)
    faiss.normalize_L2(unit)
    ip = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    ip.add_with_ids(unit, ids)
    return {"features_l2": l2, "features_ip": ip}


def write_faiss_parts(store: "Store", root: Path, start: int, stop: int) -> tuple[FaissPart, ...]:
    """Write one FAISS part per index holding rows ``[start, stop)`` (atomically; the caller
    records them in the manifest, which commits them)."""
    import faiss

    features = store.features()[start:stop]
    out = []
    for name, index in faiss_indexes_for(features, start=start).items():
        file = faiss_part_file(name, start, stop)
        with atomic_path(inside(root, f"{FAISS_DIR}/{file}")) as tmp:
            faiss.write_index(index, str(tmp))
        out.append(FaissPart(name, file, start, stop))
    fsync_dir(root / FAISS_DIR)
    return tuple(out)


def load_faiss_index(store: "Store", name: str) -> "faiss.Index":
    """The store's FAISS index ``name`` (``features_l2`` or ``features_ip``) as one index, from
    its parts (or an older store's whole-store file). Deleted rows are still in it until
    compaction: filter by :attr:`Store.deleted_rows`.

    Raises
    ------
    StoreFormatError
        The store keeps no FAISS files (``dermris rebuild --faiss-files``), or one is damaged.
    """
    import faiss

    m = store.manifest
    if name not in FAISS_NAMES:
        raise ValueError(f"unknown FAISS index {name!r}; expected one of {', '.join(FAISS_NAMES)}")
    legacy = m.faiss_file(name)
    files = (
        [legacy.file]
        if legacy is not None
        else [f"{FAISS_DIR}/{p.file}" for p in m.faiss_parts_of(name)]
    )
    if not files:
        raise StoreFormatError(
            f"{store.root} keeps no FAISS files; `dermris rebuild --faiss-files` writes them"
        )
    merged = None
    for relative in files:
        try:
            part = faiss.read_index(str(inside(store.root, relative, must_exist=True)))
        except RuntimeError as exc:
            raise StoreFormatError(
                f"{store.root}: {relative} unreadable ({str(exc).splitlines()[0]})"
            ) from None
        if merged is None:
            merged = part
        else:
            merged.merge_from(part)
    assert merged is not None  # files is not empty
    return merged


def update_sketch(
    store: "Store",
    arrays: zarr.Group,
    info: SketchInfo | None,
    *,
    dim: int,
    fit_rows: int,
    refit_growth: int,
    device=None,
) -> tuple[SketchInfo | None, str | None]:
    """Bring the style sketch up to the store's committed rows.

    New rows are projected onto the current basis. The basis is (re)fitted, into a new zarr
    group the manifest then switches to, when there is none, when ``dim`` changes, or when it
    was fitted on fewer than ``fit_rows`` rows and the store has grown ``refit_growth`` times
    since. ``device`` (CUDA) runs the same float64 arithmetic on the GPU.

    Returns
    -------
    (SketchInfo or None, str or None)
        The new description (None when nothing changed), and the name of a group that is
        stale once the manifest that describes the new one is committed.
    """
    n = store.rows
    if info and info.rows == n and info.dim_requested == dim:
        return None, None
    refit = (
        info is None
        or info.dim_requested != dim
        or (info.fitted_rows < fit_rows and n >= refit_growth * max(1, info.fitted_rows))
    )
    if refit:
        sample_rows: np.ndarray | list[int] = (
            np.unique(np.linspace(0, n - 1, num=min(n, fit_rows)).round().astype(int)) if n else []
        )
        if n:
            components, mean = fit_style_basis(store.style_rows(sample_rows), dim, device=device)
        else:
            components, mean = np.zeros((0, store.style_dim), np.float32), np.zeros(store.style_dim)
        serial = (info.serial if info else 0) + 1
        name = f"sketch_{serial}"
        if name in arrays:
            del arrays[name]
        group = arrays.create_group(name)
        group.attrs["dermris_all_chunks_written"] = True
        d, big_d = components.shape
        # checksummed like the primary arrays, every chunk written: damage is detected, not read
        every: dict[str, Any] = {
            "compressors": [zarr.codecs.Crc32cCodec()],
            "config": {"write_empty_chunks": True},
            "fill_value": 0,
        }
        with zarr.config.set({"array.write_empty_chunks": True}):
            group.create_array(
                "components", shape=components.shape, dtype="float32", chunks=(1, big_d), **every
            )
            _zarr.array(group, "components")[:] = components
            group.create_array("mean", shape=mean.shape, dtype="float64", chunks=(big_d,), **every)
            _zarr.array(group, "mean")[:] = mean
        group.create_array(
            "projections", shape=(0, d), dtype="float64", chunks=(1 << 14, max(d, 1)), **every
        )
        group.create_array("residuals", shape=(0,), dtype="float64", chunks=(1 << 16,), **every)
        group.create_array("sq_norms", shape=(0,), dtype="float64", chunks=(1 << 16,), **every)
        start = 0
        new = SketchInfo(
            group=name,
            serial=serial,
            dim=d,
            dim_requested=dim,
            fitted_rows=len(sample_rows),
            orthonormality_error=orthonormality_error(components),
            rows=0,
        )
    else:
        assert info is not None  # no refit means there is a sketch
        group = _zarr.group(arrays, info.group)
        components = np.asarray(_zarr.array(group, "components")[:])
        mean = np.asarray(_zarr.array(group, "mean")[:])
        start = info.rows
        new = info
    for block_start, block in store.iter_style_blocks(start=start):
        y, r, sq = project_style(block, components, mean, device=device)
        stop = block_start + len(block)
        with zarr.config.set({"array.write_empty_chunks": True}):
            for key, data in (("projections", y), ("residuals", r), ("sq_norms", sq)):
                arr = _zarr.array(group, key)
                arr.resize((stop, *arr.shape[1:]))
                arr[block_start:stop] = data
    stale = f"sketch_{info.serial - 1}" if refit and info is not None else None
    return dataclasses.replace(new, rows=n), stale
