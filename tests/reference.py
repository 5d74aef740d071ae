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
    data["_last_scores"] = scores  # for the grouped and lesion references below
    for name in NAMES:
        rows = [r for r in live if r != exclude_row and (allowed is None or r in allowed)]
        rows.sort(key=lambda r: (-scores[name][r], r))
        out[name] = [(r, scores[name][r]) for r in rows[:k]]
    out["_components"] = {"es": es, "cs": cs, "ss": ss, "dc": dc}
    return out


def row_query(data: dict, row: int):
    """The query vectors of a stored row, as the reference sees them."""
    return data["features"][row], data["style"][row], data["masks"][row]


def all_scores(data: dict, feature, style, mask_bits) -> dict:
    """{measure: [score of every row]} for one query (deleted rows included)."""
    brute_force(data, feature, style, mask_bits, k=0)
    return data.pop("_last_scores")


def _rows(data: dict, exclude_rows=(), allowed=None) -> list:
    deleted = data.get("deleted", set())
    return [
        r
        for r in range(data["n"])
        if r not in deleted and r not in set(exclude_rows) and (allowed is None or r in allowed)
    ]


def mean_scores(data: dict, queries) -> dict:
    """{measure: [mean over ``queries`` of the measure's score, for every row]}: a lesion query.

    ``queries``: (feature, style, mask) triples, each scored on its own (own ED_max, LS_max).
    """
    per_query = [all_scores(data, *q) for q in queries]
    return {
        name: [sum(s[name][r] for s in per_query) / len(per_query) for r in range(data["n"])]
        for name in NAMES
    }


def ranked(scores: dict, rows: list, k: int) -> dict:
    """{measure: [(row, score), ...]}: the k best of ``rows``, score descending, ties by row."""
    out = {}
    for name in NAMES:
        order = sorted(rows, key=lambda r: (-scores[name][r], r))
        out[name] = [(r, scores[name][r]) for r in order[:k]]
    return out


def grouped(scores: dict, rows: list, groups: list, k: int) -> dict:
    """{measure: [(row, score, group, members), ...]}: the k best groups among ``rows``.

    A group is the set of ``rows`` sharing a non-null value of ``groups`` (a list with one value
    per store row); a null value is a group of its own. A group's score is its best row's
    (ties by row); groups are ranked by score descending, then by that row. ``members``: the
    group's other rows among ``rows``, ascending.
    """
    by_group: dict = {}
    for r in rows:
        key = ("value", groups[r]) if groups[r] is not None else ("null", r)
        by_group.setdefault(key, []).append(r)
    out = {}
    for name in NAMES:
        best = []
        for key, members in by_group.items():
            top = min(members, key=lambda r: (-scores[name][r], r))
            best.append((top, scores[name][top], key, members))
        best.sort(key=lambda t: (-t[1], t[0]))
        out[name] = [
            (top, score, key[1] if key[0] == "value" else None, sorted(m for m in ms if m != top))
            for top, score, key, ms in best[:k]
        ]
    return out
