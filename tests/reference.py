"""An independent, slow brute-force reference of the nine measures.

It reads only the store's files (manifest.json, arrays.zarr with a plain zarr reader, the
Parquet parts with pyarrow) and computes every score in float64 with plain Python loops.
It shares no code with the retriever.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

NAMES = ("euclidean", "cosine", "style", "i1_ed", "i1_cd", "i1_ecd", "i1_se", "i1_sc", "i1_sd")


def load_store(path) -> dict:
    """Everything the reference needs, decoded from the store's files."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    n = manifest["rows"]
    group = zarr.open_group(str(path / "arrays.zarr"), mode="r")
    channels = manifest["style"]["channels"]
    scales = manifest["style"]["scales"] or [1.0] * len(channels)
    column_scale = np.concatenate(
        [np.full(c * (c + 1) // 2, s, np.float64) for c, s in zip(channels, scales)]
    )
    size = manifest["arrays"]["mask"]["size"]
    masks = np.unpackbits(np.asarray(group["mask"][:n]), axis=1)[:, : size * size].astype(bool)
    parts = [pq.read_table(path / "metadata" / p["file"]) for p in manifest["metadata_parts"]]
    ids = [i for t in parts for i in t.column("image_id").to_pylist()][:n]
    return {
        "n": n,
        "features": np.asarray(group["features"][:n], np.float64),
        "style": np.asarray(group["style"][:n], np.float64) / column_scale,
        "masks": masks,
        "image_ids": ids,
        "column_scale": column_scale,
        "deleted": {d["row"] for d in manifest.get("deleted", [])},
    }


def _harmonic(values):
    if any(v == 0.0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def brute_force(
    data: dict, feature, style, mask_bits, *, exclude_row=None, k=5, allowed=None
) -> dict:
    """Return {measure: [(row, score), ...]} over all rows of ``data``.

    ``allowed`` (a set of rows) limits the rows that may be returned; the normalisers
    ``ED_max`` and ``LS_max`` are still maxima over every live row.
    """
    n = data["n"]
    feature = [float(v) for v in feature]
    style = [float(v) for v in style]
    q_mask = np.asarray(mask_bits, bool).reshape(-1)
    ed, cos, ls, dc = [], [], [], []
    q_norm = math.sqrt(sum(v * v for v in feature))
    for r in range(n):
        x = data["features"][r].tolist()
        ed.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(x, feature))))
        x_norm = math.sqrt(sum(v * v for v in x))
        dot = sum(a * b for a, b in zip(x, feature))
        cos.append(dot / (x_norm * q_norm) if x_norm > 0 and q_norm > 0 else 0.0)
        s = data["style"][r].tolist()
        ls.append(sum((a - b) ** 2 for a, b in zip(s, style)))
        m = data["masks"][r]
        inter = int(np.count_nonzero(m & q_mask))
        total = int(np.count_nonzero(m)) + int(np.count_nonzero(q_mask))
        dc.append(1.0 if total == 0 else 2.0 * inter / total)
    live = [r for r in range(n) if r not in data.get("deleted", set())]
    ed_max = max((ed[r] for r in live), default=0.0)
    ls_max = max((ls[r] for r in live), default=0.0)
    es = [1.0 if ed_max == 0 else 1.0 - d / ed_max for d in ed]
    ss = [1.0 if ls_max == 0 else 1.0 - d / ls_max for d in ls]
    cs = [(min(1.0, max(-1.0, c)) + 1.0) / 2.0 for c in cos]
    scores = {
        "euclidean": es,
        "cosine": cs,
        "style": ss,
        "i1_ed": [_harmonic([a, b]) for a, b in zip(es, dc)],
        "i1_cd": [_harmonic([a, b]) for a, b in zip(cs, dc)],
        "i1_ecd": [_harmonic([a, b, c]) for a, b, c in zip(es, cs, dc)],
        "i1_se": [_harmonic([a, b]) for a, b in zip(ss, es)],
        "i1_sc": [_harmonic([a, b]) for a, b in zip(ss, cs)],
        "i1_sd": [_harmonic([a, b]) for a, b in zip(ss, dc)],
    }
    out = {}
    for name in NAMES:
        rows = [r for r in live if r != exclude_row and (allowed is None or r in allowed)]
        rows.sort(key=lambda r: (-scores[name][r], r))
        out[name] = [(r, scores[name][r]) for r in rows[:k]]
    out["_components"] = {"es": es, "cs": cs, "ss": ss, "dc": dc}
    return out


def row_query(data: dict, row: int):
    """The query vectors of a stored row, as the reference sees them."""
    return data["features"][row], data["style"][row], data["masks"][row]
