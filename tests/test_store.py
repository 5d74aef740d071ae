"""The store format: independent readers, float16 storage, damaged and foreign stores."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from indexer import Store, StoreFormatError, StoreNotFoundError, StyleCodec
from indexer.errors import DermrisError
from models import StyleLayout
from retriever import Retriever


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
    for name in ("features_l2", "features_ip"):
        index = faiss.read_index(str(indexed_store / manifest["faiss"][name]["file"]))
        assert index.ntotal == n
        assert sorted(faiss.vector_to_array(index.id_map).tolist()) == list(range(n))
    l2 = faiss.read_index(str(indexed_store / "faiss/features_l2.index"))
    feats = group["features"][:]
    _, ids = l2.search(feats[3:4], 1)
    assert ids[0, 0] == 3
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    count = con.execute(f"select count(*) from read_parquet('{indexed_store}/metadata/*.parquet')").fetchone()[0]
    assert count == n


def test_float16_storage_keeps_the_values(tiny_model):
    """Scaled float16 keeps every meaningful style value (no flush to zero, small error)."""
    import torch
    from indexer.synthetic import synthetic_lesion, TEXTURE_CLASSES
    from indexer import Embedder

    emb = Embedder(tiny_model, device=torch.device("cpu"), batch_size=8)
    style = emb.embed([synthetic_lesion(TEXTURE_CLASSES[i % 4], seed=i).image for i in range(8)]).style
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
    with pytest.raises(StoreFormatError, match="array features"):
        Store.open(path)

    manifest_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DermrisError):
        Store.open(path)


def test_rows_past_the_commit_point_are_invisible(random_store):
    path = random_store(n=10, seed=2)
    m = json.loads((path / "manifest.json").read_text())
    m["rows"] = 6  # as if the last commit never happened
    (path / "manifest.json").write_text(json.dumps(m))
    retriever = Retriever.open(path, device="cpu")
    assert len(retriever) == 6
    assert max(h.row for h in retriever.search_row(0, measure="style", k=100)) == 5
    # the FAISS files hold 10 rows: they are derived, so they are rebuilt, not trusted
    assert Store.open(path).faiss_indexes()["features_ip"].ntotal == 6


def test_store_without_model_rejects_image_queries(random_store):
    from retriever import ModelUnavailableError

    retriever = Retriever.open(random_store(n=3, seed=3), device="cpu")
    with pytest.raises(ModelUnavailableError, match="search_row"):
        retriever.search(np.zeros((20, 20, 3), np.uint8))


def test_one_writer_at_a_time(random_store):
    from indexer import StoreLockedError, StoreWriter

    path = random_store(n=2, seed=4)
    with StoreWriter.open(path):
        with pytest.raises(StoreLockedError, match="another process"):
            StoreWriter.open(path)
    StoreWriter.open(path).close()  # released


def test_interrupted_creation_is_cleared(tmp_path):
    from indexer import StoreExistsError, StoreWriter
    from models import StyleLayout, get_preset

    root = tmp_path / "store"
    (root / ".create" / "arrays.zarr").mkdir(parents=True)  # what a crash mid-creation leaves
    with pytest.raises(StoreNotFoundError):
        Store.open(root)
    cfg = get_preset("tiny").replace(feature_dim=4, image_size=32)
    StoreWriter.create(root, model_config=cfg, style_layout=StyleLayout.from_channels((2,))).close()
    assert Store.open(root).rows == 0 and not (root / ".create").exists()
    with pytest.raises(StoreExistsError, match="it is a store"):
        StoreWriter.create(root, model_config=cfg, style_layout=StyleLayout.from_channels((2,)))
