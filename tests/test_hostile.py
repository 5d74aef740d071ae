"""The store under hostile and careless input: nothing lost, nothing wrong, one line per error."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from dermris.app.cli import main
from dermris.core.atomic import default_file_mode
from dermris.core.errors import (
    MetadataError,
    StoreChangedError,
    StoreFormatError,
    StoreMismatchError,
)
from dermris.indexer import Store, StoreWriter, index_folder
from dermris.indexer.store import check_store, compact
from dermris.retriever import Retriever, SearchOptions


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- a crafted store never makes a reader delete anything -------------------------------------
def test_read_only_commands_never_follow_or_remove_links(random_store, tmp_path):
    path = random_store(n=12, seed=1)
    outside = tmp_path / "precious"
    (outside / "arrays.zarr").mkdir(parents=True)
    (outside / "arrays.zarr" / "keep.txt").write_text("do not delete")
    (outside / "metadata").mkdir()
    (outside / "metadata" / "keep.txt").write_text("do not delete")
    # an interrupted compaction whose parked-old folder and staged folders are links out of the
    # store
    (path / ".compact").mkdir()
    (path / ".compact" / "READY").write_text("ready\n")
    (path / ".compact" / "metadata").symlink_to(outside / "metadata")
    (path / ".compact-old").symlink_to(outside)
    before_outside, before_store = _listing(outside), _listing(path)
    runner = CliRunner()
    for args in (
        ["info", str(path)],
        ["check", str(path)],
        ["search", str(path), "--row", "0", "-k", "2"],
    ):
        result = runner.invoke(main, args)
        assert "Traceback" not in result.output, result.output
        assert _listing(outside) == before_outside
        assert _listing(path) == before_store, args
    Retriever.open(path, device="cpu").search(0, measures="all", k=3)
    assert _listing(outside) == before_outside
    # a writer refuses to switch a linked folder in; nothing outside is touched either way
    with pytest.raises(StoreFormatError, match="symbolic link"):
        StoreWriter.open(path)
    assert _listing(outside) == before_outside
    (path / ".compact" / "metadata").unlink()
    StoreWriter.open(
        path
    ).close()  # the incomplete switch is cleared (links unlinked, not followed)
    assert _listing(outside) == before_outside
    assert not (path / ".compact").exists() and not (path / ".compact-old").exists()
    assert check_store(path).ok


def test_files_named_in_the_manifest_cannot_lead_out(random_store, tmp_path):
    path = random_store(n=6, seed=2, faiss_files=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the FAISS file and the arrays as links out of the store
    part = next((path / "faiss").glob("features_l2-*.index"))
    (elsewhere / "features_l2.index").write_bytes(part.read_bytes())
    part.unlink()
    part.symlink_to(elsewhere / "features_l2.index")
    problems = check_store(path).problems
    assert any("outside the store" in p for p in problems), problems
    shutil.move(str(path / "arrays.zarr"), str(elsewhere / "arrays.zarr"))
    (path / "arrays.zarr").symlink_to(elsewhere / "arrays.zarr")
    with pytest.raises(StoreFormatError, match="outside the store"):
        Store.open(path)


# -- an open retriever and a compaction ------------------------------------------------------
def test_open_retriever_notices_compaction(random_store):
    path = random_store(n=20, seed=3, commit_sizes=[10, 10])
    retriever = Retriever.open(path, device="cpu")
    with StoreWriter.open(path) as writer:
        writer.delete([f"IMG_3_{i:04d}" for i in (0, 1, 2)])
    before = retriever.search(15, measures="style", k=3)["style"]  # deletions are seen at once
    with StoreWriter.open(path) as writer:
        compact(writer)
    with pytest.raises(StoreChangedError, match="compacted"):
        retriever.search(15, measures="style", k=3)
    retriever.refresh()
    after = retriever.search(12, measures="style", k=3)["style"]  # row 15 is now row 12
    assert [h.image_id for h in after] == [h.image_id for h in before]


# -- missing and damaged chunks of every array --------------------------------------------------
ARRAYS = ["features", "style", "mask", "mask_area", "mask_blocks"]


def _chunk_file(path: Path, name: str) -> Path:
    return next(p for p in sorted((path / "arrays.zarr" / name / "c").rglob("*")) if p.is_file())


@pytest.mark.parametrize("name", ARRAYS)
def test_missing_chunk_is_an_error_never_zeros(random_store, name):
    path = random_store(n=30, seed=4, sketch_dim=4)
    _chunk_file(path, name).unlink()
    with pytest.raises(StoreFormatError, match=f"array {name}"):
        r = Retriever.open(path, device="cpu", options=SearchOptions(mask_memory_bytes=0))
        r.search(3, measures="all", k=5)
    report = check_store(path, full=True)
    assert not report.ok and any(name in p for p in report.problems), report.problems


@pytest.mark.parametrize("name", ARRAYS + ["sketch"])
def test_flipped_bit_is_detected(random_store, name):
    path = random_store(n=30, seed=5, sketch_dim=4)
    if name == "sketch":
        chunk = next(
            p
            for p in sorted((path / "arrays.zarr").glob("sketch_*/projections/c/**/*"))
            if p.is_file()
        )
    else:
        chunk = _chunk_file(path, name)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError):
        r = Retriever.open(
            path, device="cpu", options=SearchOptions(mask_memory_bytes=0, memory_budget_bytes=0)
        )
        for row in (0, 14, 29):
            r.search(row, measures="all", k=30)
    assert not check_store(path, full=True).ok


def test_old_layout_missing_empty_mask_chunks_are_fine_but_damage_is_not(random_store):
    """Stores written before every chunk was written lack all-zero chunks legitimately."""
    path = random_store(n=40, seed=6, empty_masks=40)
    meta = json.loads((path / "arrays.zarr" / "zarr.json").read_text())
    meta["attributes"].pop("dermris_all_chunks_written")
    (path / "arrays.zarr" / "zarr.json").write_text(json.dumps(meta))
    for chunk in (path / "arrays.zarr" / "mask" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()  # all masks empty: as an older store would have them
    assert Retriever.open(path, device="cpu").search(0, measures="i1_sd", k=3)["i1_sd"]
    areas = path / "arrays.zarr" / "mask_area" / "c" / "0"
    import zarr

    zarr.open_array(str(path / "arrays.zarr" / "mask_area"), mode="r+")[5] = (
        17  # claims pixels it has not
    )
    with pytest.raises(StoreFormatError, match="array mask is damaged at row 5"):
        Store.open(path).masks()
    assert areas.exists()


# -- metadata ----------------------------------------------------------------------------------
def _csv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    lines = [",".join(columns)] + [
        ",".join("" if r[c] is None else str(r[c]) for c in columns) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _images(folder: Path, source: Path, names: list[str], *, start: int = 0) -> Path:
    """Copies of distinct synthetic images (the ``start + i``-th for the i-th name)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(source.iterdir())
    for i, name in enumerate(names):
        shutil.copy(sources[(start + i) % len(sources)], folder / f"{name}.jpg")
    return folder


def test_metadata_columns_are_merged_not_lost(tmp_path, synthetic_set):
    images, _ = synthetic_set
    store = tmp_path / "store"
    first = _images(tmp_path / "a", images, ["0001", "1e3", "C"])
    index_folder(first, store, device="cpu", progress=False)  # no CSV at first
    second = _images(tmp_path / "b", images, ["0001", "1e3", "C", "D"])
    csv = _csv(
        tmp_path / "m.csv",
        [
            {"image_id": "0001", "diagnosis": "nevus", "age": 40, "note": None},
            {"image_id": "1e3", "diagnosis": "melanoma", "age": 71, "note": None},
            {"image_id": "D", "diagnosis": "nevus", "age": 33, "note": None},
        ],
    )
    report = index_folder(second, store, metadata=csv, device="cpu", progress=False)
    assert report.indexed == 1  # D (the others are the same bytes as indexed before)
    meta = Store.open(store).metadata().to_pylist()
    by_id = {m["image_id"]: m for m in meta}
    assert set(by_id) == {"0001", "1e3", "C", "D"}  # ids stay text: no 1, no 1000
    assert by_id["D"]["diagnosis"] == "nevus" and by_id["D"]["age"] == 33
    assert by_id["0001"]["diagnosis"] is None  # indexed before the CSV: null, not dropped
    assert pa.types.is_string(
        Store.open(store).metadata_schema().field("note").type
    )  # empty column: text
    # a third run without the CSV keeps the columns, with nulls (and a warning)
    third = _images(tmp_path / "c", images, ["E"], start=4)
    index_folder(third, store, device="cpu", progress=False)
    assert Store.open(store).metadata().column("diagnosis").to_pylist()[-1] is None
    # the note column, empty before, can now be filled
    csv2 = _csv(
        tmp_path / "m2.csv", [{"image_id": "F", "diagnosis": "bcc", "age": 50, "note": "biopsy"}]
    )
    index_folder(
        _images(tmp_path / "d", images, ["F"], start=5),
        store,
        metadata=csv2,
        device="cpu",
        progress=False,
    )
    assert Store.open(store).metadata().to_pylist()[-1]["note"] == "biopsy"
    assert check_store(store).ok


def test_metadata_type_conflict_is_refused_before_embedding(tmp_path, synthetic_set, monkeypatch):
    images, _ = synthetic_set
    store = tmp_path / "store"
    csv = _csv(tmp_path / "m.csv", [{"image_id": "A", "age": 40}])
    index_folder(
        _images(tmp_path / "a", images, ["A"]), store, metadata=csv, device="cpu", progress=False
    )
    bad = _csv(tmp_path / "bad.csv", [{"image_id": "B", "age": "forty"}])
    folder_b = _images(tmp_path / "b", images, ["B"], start=1)
    from dermris.indexer.embed import Embedder

    def no_embedding(*args, **kwargs):
        raise AssertionError("an image was embedded before the metadata was checked")

    monkeypatch.setattr(Embedder, "forward_pixels", no_embedding)
    with pytest.raises(StoreMismatchError, match="'age' holds int64 in the store but string"):
        index_folder(folder_b, store, metadata=bad, device="cpu", progress=False)
    assert Store.open(store).rows == 1


@pytest.mark.parametrize(
    "content,message",
    [
        (b"image_id,x,x\nA,1,2\n", "more than once"),
        ("image_id,diagnosis\nA,n\xe4vus\n".encode("latin-1"), "not UTF-8"),
        (b"isic_id,x\n,1\n", "empty"),
    ],
)
def test_bad_csvs_fail_before_anything_runs(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    from dermris.indexer import MetadataTable

    with pytest.raises(MetadataError, match=message):
        MetadataTable(path)


# -- creation and weights --------------------------------------------------------------------
def _index_process(folder: Path, store: Path, preset: str) -> subprocess.Popen:
    code = "import sys; from dermris.app.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "index",
            str(folder),
            str(store),
            "--preset",
            preset,
            "--device",
            "cpu",
            "--quiet",
            "--workers",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow  # two processes, each building a model
def test_two_runs_creating_the_same_store(tmp_path, synthetic_set):
    images, _ = synthetic_set
    folder = _images(tmp_path / "imgs", images, [f"I{i}" for i in range(6)])
    for trial in range(1):
        store = tmp_path / f"store{trial}"
        procs = [_index_process(folder, store, preset) for preset in ("tiny", "lite0")]
        outcomes = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
        winners = [rc for rc, _ in outcomes if rc == 0]
        assert len(winners) >= 1, outcomes
        for rc, err in outcomes:
            if rc != 0:
                assert err.startswith("Error:") and err.count("\n") == 1, err
                assert any(
                    m in err
                    for m in ("another process is writing", "built with preset", "is a store")
                ), err
        report = check_store(store)
        assert report.ok and report.rows == 6, report.problems


def test_rerun_with_the_same_weights_file_is_accepted(tmp_path, synthetic_set, tiny_model):
    from dermris.models import save_model

    images, _ = synthetic_set
    weights = tmp_path / "w.safetensors"
    save_model(tiny_model, weights)
    store = tmp_path / "store"
    index_folder(
        _images(tmp_path / "a", images, ["A", "B"]),
        store,
        weights=weights,
        device="cpu",
        progress=False,
    )
    save_model(tiny_model, tmp_path / "again.safetensors")  # the same model written again
    report = index_folder(
        _images(tmp_path / "b", images, ["A", "B", "C"]),
        store,
        weights=tmp_path / "again.safetensors",
        device="cpu",
        progress=False,
    )
    assert report.indexed == 1 and Store.open(store).rows == 3
    mode = stat.S_IMODE(os.stat(store / "model.safetensors").st_mode)
    assert mode == default_file_mode(), oct(mode)  # readable by whoever may read the store


# -- one-line errors -----------------------------------------------------------------------
def test_disk_full_during_a_commit_leaves_the_store_as_it_was(tmp_path, synthetic_set, monkeypatch):
    import errno

    images, _ = synthetic_set
    store = tmp_path / "store"
    index_folder(_images(tmp_path / "a", images, ["A", "B"]), store, device="cpu", progress=False)
    from dermris.indexer.store import writer as writer_module

    real = writer_module.atomic_path

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer_module, "atomic_path", full)
    result = CliRunner().invoke(
        main, ["index", str(_images(tmp_path / "b", images, ["C", "D"], start=2)), str(store), "-q"]
    )
    monkeypatch.setattr(writer_module, "atomic_path", real)
    assert result.exit_code == 1 and result.stderr.startswith("Error: No space left on device")
    assert result.stderr.count("\n") == 1
    assert Store.open(store).rows == 2 and check_store(store).ok
    again = index_folder(tmp_path / "b", store, device="cpu", progress=False)  # resumes cleanly
    assert again.indexed == 2 and Store.open(store).rows == 4


def test_cli_one_line_errors(tmp_path, synthetic_set, random_store):
    runner = CliRunner()
    images, _ = synthetic_set
    path = random_store(n=5, seed=8)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        (["search", str(path), "--row", "0", "--sheet", str(blocker / "sheet.png")], None),
        (["index", str(tmp_path / "empty"), str(tmp_path / "s")], None),
        (["delete", str(path), "--id", "IMG_8_0001", "--id", "NOPE"], "1 ids are not in"),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("Error:") and result.stderr.count("\n") == 1, result.stderr
        if message:
            assert message in result.stderr, result.stderr
    assert Store.open(path).deleted_rows.tolist() == []  # nothing deleted: all or nothing
    result = runner.invoke(
        main, ["delete", str(path), "--id", "IMG_8_0001", "--id", "NOPE", "--missing-ok"]
    )
    assert result.exit_code == 0 and Store.open(path).deleted_rows.tolist() == [1]
    assert (
        "no image files"
        in runner.invoke(main, ["index", str(tmp_path / "empty"), str(tmp_path / "s")]).stderr
    )
    assert not (tmp_path / "s").exists()
    # judge --out where no folder can be made
    result = runner.invoke(
        main, ["judge", str(path), "--out", str(blocker / "session"), "--no-serve"]
    )
    assert (
        result.exit_code == 1
        and result.stderr.startswith("Error:")
        and result.stderr.count("\n") == 1
    )


def test_writer_commands_on_a_store_that_cannot_be_written(random_store, monkeypatch):
    """A store on a read-only mount (simulated: the lock file cannot be opened for writing)."""
    import filelock

    path = random_store(n=4, seed=9)
    listing = _listing(path)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Read-only file system", str(path / ".writer.lock"))

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    runner = CliRunner()
    for args in (
        ["delete", str(path), "--id", "IMG_9_0001"],
        ["compact", str(path)],
        ["rebuild", str(path)],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 1 and result.stderr.startswith("Error: cannot write to"), (
            result.output
        )
        assert result.stderr.count("\n") == 1
    assert (
        runner.invoke(main, ["search", str(path), "--row", "1", "-k", "2"]).exit_code == 0
    )  # reading works
    assert _listing(path) == listing


def test_sheet_after_the_image_folder_moved(tmp_path, synthetic_set):
    images, _ = synthetic_set
    folder = _images(tmp_path / "archive", images, ["A", "B", "C", "D"])
    store = tmp_path / "store"
    index_folder(folder, store, device="cpu", progress=False)
    moved = tmp_path / "moved"
    shutil.move(str(folder), str(moved))
    runner = CliRunner()
    result = runner.invoke(
        main, ["search", str(store), "--row", "0", "-k", "2", "--sheet", str(tmp_path / "s.png")]
    )
    assert result.exit_code == 0 and "missing" in result.stderr and "--image-root" in result.stderr
    result = runner.invoke(
        main,
        [
            "search",
            str(store),
            "--row",
            "0",
            "-k",
            "2",
            "--sheet",
            str(tmp_path / "t.png"),
            "--image-root",
            str(moved),
        ],
    )
    assert result.exit_code == 0 and "missing" not in result.stderr


def test_segmenter_masks_with_the_image_stem(tmp_path):
    from PIL import Image

    from dermris.models.training import read_segmentation_set

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 16)).save(tmp_path / "img" / f"{name}.jpg")
        Image.new("L", (16, 16)).save(tmp_path / "msk" / f"{name}.png")
    pairs = read_segmentation_set(tmp_path / "img", tmp_path / "msk")
    assert [(p.image.stem, p.mask.name) for p in pairs] == [("a", "a.png"), ("b", "b.png")]
