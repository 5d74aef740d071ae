"""The store format: independent readers, float16 storage, damaged and foreign stores."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from dermris.core import StyleLayout
from dermris.core.errors import DermrisError
from dermris.indexer import Store, StoreFormatError, StoreNotFoundError, StyleCodec
from dermris.indexer.store import load_faiss_index
from dermris.retriever import Retriever


def test_store_is_read_by_independent_clients(indexed_store):
    manifest = json.loads((indexed_store / "manifest.json").read_text())
    n = manifest["rows"]
    group = zarr.open_group(str(indexed_store / "arrays.zarr"), mode="r")
    assert group["features"].shape == (n, 1024) and group["features"].dtype == np.float32
    assert group["style"].dtype == np.float16
    assert group["style"].shape == (n, manifest["arrays"]["style"]["dim"])
    assert group["mask"].shape == (n, 128 * 128 // 8)
    areas = np.unpackbits(group["mask"][:], axis=1).sum(axis=1)
    np.testing.assert_array_equal(areas, group["mask_area"][:])
    table = pq.ParquetDataset(indexed_store / "metadata").read()
    assert table.num_rows == n
    for name in ("features_l2", "features_ip"):  # plain FAISS files, one per run that added rows
        ids = []
        for part in (p for p in manifest["faiss_parts"] if p["name"] == name):
            index = faiss.read_index(str(indexed_store / "faiss" / part["file"]))
            assert index.ntotal == part["stop"] - part["start"]
            ids += faiss.vector_to_array(index.id_map).tolist()
        assert sorted(ids) == list(range(n))
    l2 = faiss.read_index(str(indexed_store / "faiss" / manifest["faiss_parts"][0]["file"]))
    feats = group["features"][:]
    _, ids = l2.search(feats[3:4], 1)
    assert ids[0, 0] == 3
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    count = con.execute(
        f"select count(*) from read_parquet('{indexed_store}/metadata/*.parquet')"
    ).fetchone()[0]
    assert count == n


def test_float16_storage_keeps_the_values(tiny_model):
    """Scaled float16 keeps every meaningful style value (no flush to zero, small error)."""
    import torch

    from dermris.indexer import Embedder
    from dermris.indexer.synthetic import TEXTURE_CLASSES, synthetic_lesion

    emb = Embedder(tiny_model, device=torch.device("cpu"), batch_size=8)
    style = emb.embed(
        [synthetic_lesion(TEXTURE_CLASSES[i % 4], seed=i).image for i in range(8)]
    ).style
    codec = StyleCodec.fit(style[:2], tiny_model.style_layout)
    stored, clipped = codec.encode(style)
    assert clipped == 0
    back = codec.decode(stored)
    nonzero = style != 0
    assert np.mean(back[nonzero] == 0) < 1e-3  # nothing meaningful flushed to zero
    rel = np.abs(back - style) / np.maximum(np.abs(style), 1e-30)
    big = np.abs(style) > 1e-3 * np.abs(style).max(axis=1, keepdims=True)
    assert np.quantile(rel[big], 0.999) < 1e-3
    naive = style.astype(np.float16).astype(np.float32)
    assert np.mean(naive[nonzero] == 0) >= np.mean(back[nonzero] == 0)
    # distances survive: float16 storage changes LS by well under 1 %
    d_true = ((style[0] - style[1:]) ** 2).sum(1)
    d_back = ((back[0] - back[1:]) ** 2).sum(1)
    np.testing.assert_allclose(d_back, d_true, rtol=1e-2)


def test_codec_scales_are_powers_of_two():
    layout = StyleLayout.from_channels((2, 3))
    style = np.array([[1e-6, 2e-6, 3e-6, 500.0, 1, 1, 1, 1, 1]], np.float32)
    codec = StyleCodec.fit(style, layout)
    for s in codec.stage_scales:
        assert np.log2(s) == int(np.log2(s))
    assert codec.stage_scales[0] > 1e6 and codec.stage_scales[1] < 1


def test_missing_damaged_and_foreign_stores(tmp_path, random_store):
    with pytest.raises(StoreNotFoundError):
        Retriever.open(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):  # builtin refined
        Store.open(tmp_path)
    path = random_store(n=5, seed=1)
    manifest_path = path / "manifest.json"
    good = manifest_path.read_text()

    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(StoreFormatError, match="half-written"):
        Store.open(path)

    m = json.loads(good)
    m["format_version"] = 2
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(StoreFormatError, match="format version 2"):
        Store.open(path)

    m = json.loads(good)
    m["rows"] = 50
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(
        StoreFormatError, match="metadata parts cover 5 rows, the manifest commits 50"
    ):
        Store.open(path)
    m["metadata_parts"][-1]["stop"] = 50
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(StoreFormatError, match="array features"):
        Store.open(path)

    manifest_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DermrisError):
        Store.open(path)


def test_rows_past_the_commit_point_are_invisible(random_store):
    path = random_store(n=10, seed=2, commit_sizes=[6, 4], faiss_files=True)
    m = json.loads((path / "manifest.json").read_text())
    m["rows"] = 6  # as if the last commit never happened
    (path / "manifest.json").write_text(json.dumps(m))
    retriever = Retriever.open(path, device="cpu")
    assert len(retriever) == 6
    assert max(h.row for h in retriever.search(0, measures="style", k=100)["style"]) == 5
    # the FAISS part of rows 6..9 is past the commit point: never read
    assert load_faiss_index(Store.open(path), "features_ip").ntotal == 6


def test_store_without_model_rejects_image_queries(random_store):
    from dermris.retriever import ModelUnavailableError

    retriever = Retriever.open(random_store(n=3, seed=3), device="cpu")
    with pytest.raises(ModelUnavailableError, match="query stored rows"):
        retriever.search(np.zeros((20, 20, 3), np.uint8))


def test_one_writer_at_a_time(random_store):
    from dermris.indexer import StoreLockedError, StoreWriter

    path = random_store(n=2, seed=4)
    with StoreWriter.open(path):
        with pytest.raises(StoreLockedError, match="another process"):
            StoreWriter.open(path)
    StoreWriter.open(path).close()  # released


def test_interrupted_creation_is_cleared(tmp_path):
    from dermris.core import StyleLayout
    from dermris.indexer import StoreExistsError, StoreWriter
    from dermris.models import get_preset

    root = tmp_path / "store"
    (root / ".create" / "arrays.zarr").mkdir(parents=True)  # what a crash mid-creation leaves
    with pytest.raises(StoreNotFoundError):
        Store.open(root)
    cfg = get_preset("tiny").replace(feature_dim=4, image_size=32)
    StoreWriter.create(root, model_config=cfg, style_layout=StyleLayout.from_channels((2,))).close()
    assert Store.open(root).rows == 0 and not (root / ".create").exists()
    with pytest.raises(StoreExistsError, match="it is a store"):
        StoreWriter.create(root, model_config=cfg, style_layout=StyleLayout.from_channels((2,)))


WRONG_TYPES = [
    ("rows", True, "'rows' must be an integer"),
    ("rows", -1, "'rows' must be an integer >= 0"),
    ("rows", "5", "'rows' must be an integer"),
    ("arrays", {}, "lacks the field 'arrays.features'"),
    ("arrays", [], "'arrays' must be a JSON object"),
    ("metadata_parts", "x", "'metadata_parts' must be a JSON list"),
    (
        "metadata_parts",
        [{"file": "../../etc/passwd.parquet", "start": 0, "stop": 5}],
        "plain file name",
    ),
    ("metadata_parts", [{"file": "/abs/part.parquet", "start": 0, "stop": 5}], "plain file name"),
    (
        "metadata_parts",
        [
            {"file": "a.parquet", "start": 0, "stop": 2},
            {"file": "b.parquet", "start": 3, "stop": 5},
        ],
        "expected to start at 2",
    ),
    ("model", {"config": {"name": "x"}}, "invalid model config"),
    ("model", None, "'model' must be a JSON object"),
    ("style", {"channels": [2, 3, 4], "weights": [1, 1], "dtype": "float16"}, "style layout"),
    (
        "style",
        {"channels": [2, 3, 4], "weights": [1, 1, 1], "dtype": "int8"},
        "one of float16, float32",
    ),
    ("faiss", {"other": {"file": "x", "ntotal": 1}}, "keyed by"),
    ("faiss", {"features_l2": {"file": "../x.index", "ntotal": 5}}, "'faiss/features_l2.index'"),
    ("sketch", {"group": "../../elsewhere"}, "plain file name"),
    ("deleted", [{"row": 99, "image_id": "a", "sha256": "b"}], "outside the 5 committed rows"),
    ("deleted", "all", "'deleted' must be a JSON list"),
    ("rejected", [{"path": 3, "reason": "x"}], "'rejected[0].path' must be a string"),
    ("generation", "../x", "'generation' must be a hex string"),
]


@pytest.mark.parametrize(
    "key,value,message", WRONG_TYPES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(WRONG_TYPES)]
)
def test_manifest_of_wrong_types_is_one_line_error(random_store, key, value, message):
    """Every manifest field is typed: a wrong one is one StoreFormatError line, at open."""
    from dermris.indexer import Manifest

    path = random_store(n=5, seed=5)
    good = json.loads((path / "manifest.json").read_text())
    bad = dict(good)
    if key == "style" and isinstance(value, dict):
        value = {**good["style"], **value}
    bad[key] = value
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(StoreFormatError) as info:
        Store.open(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StoreFormatError):
        Manifest.from_dict(bad)


def test_manifest_round_trips(random_store):
    from dermris.indexer import Manifest

    path = random_store(n=7, seed=6, commit_sizes=[3, 4])
    data = json.loads((path / "manifest.json").read_text())
    manifest = Manifest.from_dict(data)
    assert manifest.rows == 7 and len(manifest.metadata_parts) == 2
    again = manifest.to_dict()
    for key in data:
        assert again[key] == data[key], key


def test_files_named_by_the_store_stay_inside_it(random_store, tmp_path):
    """A symbolic link inside the store that leads out of it is refused, not followed."""
    path = random_store(n=5, seed=7)
    outside = tmp_path / "outside"
    outside.mkdir()
    part = next((path / "metadata").iterdir())
    (outside / part.name).write_bytes(part.read_bytes())
    part.unlink()
    part.symlink_to(outside / part.name)
    with pytest.raises(StoreFormatError, match="outside the store"):
        Store.open(path).metadata()


def test_no_module_outside_the_store_layer_reads_manifest_keys():
    """The manifest is typed: only dermris.indexer.store touches its JSON keys."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"manifest(\.get\(|\[)|manifest\.json|MANIFEST_NAME|_format import")
    offenders = []
    for folder in ("models", "indexer", "retriever", "benchmarks"):
        for file in (root / folder).rglob("*.py"):
            if "store" in file.relative_to(root).parts[1:2]:
                continue
            for number, line in enumerate(file.read_text().splitlines(), start=1):
                if pattern.search(line):
                    offenders.append(f"{file.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, offenders
