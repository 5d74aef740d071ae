"""The whole path on real image files: index a folder, then search by rows and by images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from dermris.indexer import Store, StoreMismatchError, index_folder
from dermris.indexer.store import check_store, load_faiss_index
from dermris.retriever import MEASURES, QueryError, Retriever, UnknownMeasureError

from reference import NAMES, brute_force, load_store, row_query


def test_index_writes_every_image_with_metadata(indexed_store, synthetic_set):
    store = Store.open(indexed_store)
    assert store.rows == 32
    meta = store.metadata()
    assert meta.column("row").to_pylist() == list(range(32))
    assert set(meta.column_names) >= {
        "row",
        "image_id",
        "path",
        "sha256",
        "width",
        "height",
        "texture",
        "seed",
    }
    textures = dict(zip(meta.column("image_id").to_pylist(), meta.column("texture").to_pylist()))
    assert all(image_id.split("_")[1] == t for image_id, t in textures.items())
    assert meta.column("width").to_pylist() == [160] * 32
    assert len(store.manifest.metadata_parts) == 4  # commit_every=8


def test_search_row_equals_brute_force_from_store_files(indexed_store):
    """DESIGN's contract on an indexed folder: every measure, every row, from the files alone."""
    data = load_store(indexed_store)
    retriever = Retriever.open(indexed_store, device="cpu")
    for row in range(0, 32, 3):
        expected = brute_force(data, *row_query(data, row), exclude_row=row, k=5)
        got = retriever.search(row, k=5, measures="all")
        for name in NAMES:
            assert [h.row for h in got[name]] == [r for r, _ in expected[name]], (row, name)
            np.testing.assert_allclose(
                [h.score for h in got[name]], [s for _, s in expected[name]], rtol=1e-7
            )


def test_query_with_indexed_image_returns_it_first(indexed_store, synthetic_set):
    images, _ = synthetic_set
    retriever = Retriever.open(indexed_store, device="cpu")
    target = retriever.image_ids.index("SYN_reticular_003")
    results = retriever.search(images / "SYN_reticular_003.jpg", k=3, measures="all")
    for measure in MEASURES:
        top = results[measure][0]
        assert top.row == target, measure
    top = results["style"][0]
    assert top.components["es"] == pytest.approx(1.0, abs=1e-5)
    assert top.components["ss"] == pytest.approx(1.0, abs=1e-5)
    assert top.components["dc"] == pytest.approx(1.0, abs=1e-3)
    # the image-query scores equal brute force from the stored arrays
    data = load_store(indexed_store)
    q = retriever.embed(images / "SYN_reticular_003.jpg")
    expected = brute_force(data, q.feature, q.style, np.unpackbits(q.mask).astype(bool), k=3)
    for name in NAMES:
        assert [h.row for h in results[name]] == [r for r, _ in expected[name]]


def test_query_types(indexed_store, synthetic_set):
    images, _ = synthetic_set
    retriever = Retriever.open(indexed_store, device="cpu")
    path = images / "SYN_streaks_001.jpg"
    by_path = retriever.search(path, measures="cosine", k=4)["cosine"]
    pil = Image.open(path)
    by_pil = retriever.search(pil, measures="cosine", k=4)["cosine"]
    by_array = retriever.search(np.asarray(pil.convert("RGB")), measures="cosine", k=4)["cosine"]
    assert [h.row for h in by_path] == [h.row for h in by_pil] == [h.row for h in by_array]
    gray = retriever.search(np.asarray(pil.convert("L")), measures="style", k=2)["style"]
    assert len(gray) == 2
    # a mixed batch: images embedded together, rows read from the store, same answers
    mixed = retriever.search([path, 3, pil], measures="cosine", k=4)
    assert (
        [h.row for h in mixed[0]["cosine"]]
        == [h.row for h in by_path]
        == [h.row for h in mixed[2]["cosine"]]
    )
    assert [h.row for h in mixed[1]["cosine"]] == [
        h.row for h in retriever.search(3, measures="cosine", k=4)["cosine"]
    ]
    assert 3 not in [h.row for h in mixed[1]["cosine"]] and mixed[1].row == 3
    with pytest.raises(QueryError, match="not found"):
        retriever.search(images / "missing.jpg")
    with pytest.raises(QueryError, match="uint8"):
        retriever.search(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(QueryError, match="with pixels"):
        retriever.search(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(QueryError, match="no pixels"):
        retriever.search(Image.new("RGB", (0, 5)))
    with pytest.raises(QueryError, match="unsupported query type"):
        retriever.search(3.5)
    with pytest.raises(QueryError, match="out of range"):
        retriever.search(32)
    with pytest.raises(UnknownMeasureError):
        retriever.search(path, measures="dice")
    with pytest.raises(UnknownMeasureError):
        retriever.search(path, measures=["style", None])
    with pytest.raises(QueryError, match="k must be"):
        retriever.search(0, k=0)
    with pytest.raises(QueryError, match="k must be"):
        retriever.search(0, k=True)
    with pytest.raises(QueryError, match="unknown metadata column 'diagnosis'"):
        retriever.search(0, columns=["diagnosis"])
    with pytest.raises(QueryError, match="where: .*diagnosis"):
        retriever.search(0, where="diagnosis == 'melanoma'")
    with pytest.raises(QueryError, match="exclude"):
        retriever.search(0, exclude=[99])
    with pytest.raises(QueryError, match="exclude"):
        retriever.search(0, exclude="12")
    assert len(retriever.search(0, measures="euclidean", k=1000)["euclidean"]) == 31
    textures = retriever.search(
        0, measures="all", k=3, where="texture == 'streaks'", columns="texture"
    )
    assert all(h.metadata == {"texture": "streaks"} for hits in textures.values() for h in hits)
    assert len(textures["style"]) == 3


def test_hits_carry_ids_paths_and_components(indexed_store):
    retriever = Retriever.open(indexed_store, device="cpu")
    hits = retriever.search(5, measures="i1_sd", k=3)["i1_sd"]
    for hit in hits:  # the components of the measures asked for: a measure pays for no other
        assert hit.path.endswith(f"{hit.image_id}.jpg")
        assert set(hit.components) == {"ss", "dc"}
        assert hit.score == pytest.approx(2 / (1 / hit.components["ss"] + 1 / hit.components["dc"]))
    euclid = retriever.search(5, measures="euclidean", k=3)["euclidean"]
    assert set(euclid[0].components) == {"es"}
    assert euclid[0].score == euclid[0].components["es"]
    both = retriever.search(5, measures=("euclidean", "i1_sc"), k=3)
    assert all(set(h.components) == {"es", "ss", "cs"} for hits in both.values() for h in hits)
    every = retriever.search(5, measures="all", k=3)
    assert all(
        set(h.components) == {"es", "cs", "ss", "dc"} for hits in every.values() for h in hits
    )
    # the components agree with the measures that are those components alone
    alone = retriever.search(5, measures="cosine", k=3)["cosine"]
    assert [h.score for h in alone] == [h.components["cs"] for h in every["cosine"]]


def test_bad_files_are_recorded_not_fatal(tmp_path, synthetic_set):
    images, csv = synthetic_set
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("SYN_globular_000.jpg", "SYN_streaks_002.jpg", "SYN_reticular_001.jpg"):
        shutil.copy(images / name, folder / name)
    shutil.copy(images / "SYN_globular_000.jpg", folder / "copy_of_globular.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    data = (images / "SYN_streaks_002.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("L", (8, 8), 90).save(folder / "tiny_gray.png")
    report = index_folder(folder, tmp_path / "store", metadata=csv, progress=False, device="cpu")
    assert report.indexed == 4  # three lesions + the 8x8 grayscale image
    assert report.without_metadata == ["tiny_gray"]
    assert [p.split("/")[-1] for p, _ in report.duplicates] == ["copy_of_globular.jpg"]
    rejected = {p.split("/")[-1]: reason for p, reason in report.rejected}
    assert set(rejected) == {"empty.jpg", "noise.png", "truncated.jpg"}
    store = Store.open(tmp_path / "store")
    recorded = {r.path.split("/")[-1] for r in store.rejected}
    assert recorded == {"empty.jpg", "noise.png", "truncated.jpg", "copy_of_globular.jpg"}
    assert store.rows == 4


def test_rerun_adds_only_new_images_and_refresh(tmp_path, synthetic_set):
    images, csv = synthetic_set
    folder = tmp_path / "images"
    folder.mkdir()
    names = sorted(p.name for p in images.iterdir())
    for name in names[:5]:
        shutil.copy(images / name, folder / name)
    store = tmp_path / "store"
    first = index_folder(
        folder, store, metadata=csv, progress=False, device="cpu", faiss_files=True
    )
    assert first.indexed == 5
    first_parts = sorted(p.name for p in (store / "faiss").iterdir())
    retriever = Retriever.open(store, device="cpu")
    for name in names[5:9]:
        shutil.copy(images / name, folder / name)
    second = index_folder(folder, store, metadata=csv, progress=False, device="cpu")
    assert (second.indexed, second.already_indexed, second.rows) == (4, 5, 9)
    assert len(retriever) == 5  # the open retriever keeps its snapshot
    assert len(retriever.search(0, measures="style", k=50)["style"]) == 4
    retriever.refresh()
    assert len(retriever) == 9 and len(retriever.search(0, measures="style", k=50)["style"]) == 8
    meta = Store.open(store).metadata()
    assert meta.column("image_id").to_pylist() == [n[:-4] for n in names[:9]]
    # FAISS files, once asked for, are appended: the first run's parts are kept as they were
    assert load_faiss_index(Store.open(store), "features_l2").ntotal == 9
    parts = sorted(p.name for p in (store / "faiss").iterdir())
    assert set(first_parts) < set(parts) and len(parts) == 4
    assert check_store(store).ok
    with pytest.raises(StoreMismatchError, match="preset 'tiny', not 'lite0'"):
        index_folder(folder, store, preset="lite0", progress=False)


def test_large_jpeg_query_reproduces_its_row(tmp_path, synthetic_set):
    """Files are decoded identically at index and query time (JPEG draft decoding included)."""
    images, _ = synthetic_set
    folder = tmp_path / "big"
    folder.mkdir()
    for name in ("SYN_globular_001", "SYN_streaks_003", "SYN_reticular_005"):
        Image.open(images / f"{name}.jpg").resize((900, 700)).save(
            folder / f"{name}.jpg", quality=95
        )
    index_folder(folder, tmp_path / "store", progress=False, device="cpu")
    retriever = Retriever.open(tmp_path / "store", device="cpu")
    hits = retriever.search(folder / "SYN_streaks_003.jpg", measures=("euclidean", "style"), k=1)[
        "euclidean"
    ]
    assert hits[0].image_id == "SYN_streaks_003"
    assert hits[0].components["es"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0].components["ss"] == pytest.approx(1.0, abs=1e-5)
