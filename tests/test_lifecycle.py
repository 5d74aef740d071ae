"""An index you can trust: delete, compact, check, crash safety, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dermris.app.cli import main
from dermris.indexer import Store, StoreFormatError, StoreWriter, index_folder
from dermris.indexer.store import check_store, compact
from dermris.retriever import QueryError, Retriever

from reference import NAMES, brute_force, load_store, row_query


@pytest.fixture
def small_set(tmp_path, synthetic_set):
    images, csv = synthetic_set
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(images.iterdir())[::2]:  # 16 images, 4 per class
        shutil.copy(path, folder / path.name)
    return folder, csv


def test_delete_hides_rows_everywhere_then_compact(tmp_path, small_set):
    folder, csv = small_set
    store = tmp_path / "store"
    index_folder(folder, store, metadata=csv, progress=False, commit_every=5, batch_size=5)
    retriever = Retriever.open(store, device="cpu")  # opened before the delete
    before = Store.open(store).metadata(columns=["image_id"]).column("image_id").to_pylist()
    gone = [before[1], before[6], before[15]]
    with StoreWriter.open(store) as writer:
        rows, unknown = writer.delete(gone + ["NOT_THERE"])
    assert sorted(rows) == [1, 6, 15] and unknown == ["NOT_THERE"]

    # the open retriever no longer returns them, and normalisers ignore them
    data = load_store(store)
    assert data["deleted"] == {1, 6, 15}
    for row in (0, 7, 14):
        got = retriever.search(row, k=20, measures="all")
        expected = brute_force(data, *row_query(data, row), exclude_row=row, k=20)
        for name in NAMES:
            assert [h.row for h in got[name]] == [r for r, _ in expected[name]]
            np.testing.assert_allclose(
                [h.score for h in got[name]], [s for _, s in expected[name]], rtol=1e-9
            )
            assert not {h.image_id for h in got[name]} & set(gone)
    with pytest.raises(QueryError, match="was deleted"):
        retriever.search(6, measures="style")["style"]
    by_image = retriever.search(folder / f"{gone[0]}.jpg", k=20, measures="all")
    assert all(h.image_id not in gone for hits in by_image.values() for h in hits)
    reference_hits = {
        m: [(h.image_id, round(h.score, 12)) for h in hits]
        for m, hits in retriever.search(folder / f"{before[3]}.jpg", k=6, measures="all").items()
    }

    # compact: rows physically removed, renumbered, same answers
    with StoreWriter.open(store) as writer:
        assert compact(writer) == 3
    compacted = Store.open(store)
    assert compacted.rows == 13 and len(compacted.deleted_rows) == 0
    ids = compacted.metadata(columns=["image_id"]).column("image_id").to_pylist()
    assert ids == [i for i in before if i not in gone]
    assert check_store(store).ok, check_store(store).problems
    fresh = Retriever.open(store, device="cpu")
    after = {
        m: [(h.image_id, round(h.score, 12)) for h in hits]
        for m, hits in fresh.search(folder / f"{before[3]}.jpg", k=6, measures="all").items()
    }
    assert after == reference_hits
    assert not any(p.name.startswith(".compact") for p in store.iterdir())

    # indexing the same folder again does not bring the deleted images back
    report = index_folder(folder, store, metadata=csv, progress=False)
    assert report.indexed == 0 and len(report.previously_deleted) == 3
    assert Store.open(store).rows == 13


def test_compaction_interrupted_before_and_during_the_switch(tmp_path, small_set, monkeypatch):
    import dermris.indexer.store.compaction as store_module

    folder, csv = small_set
    store = tmp_path / "store"
    index_folder(folder, store, metadata=csv, progress=False)
    with StoreWriter.open(store) as writer:
        writer.delete(["SYN_globular_000", "SYN_streaks_002"])

    # 1. crash while the compacted copy is being built: the store is untouched
    original = StoreWriter.build_derived

    def crash(self, **kwargs):
        if self.root.name == ".compact":
            raise KeyboardInterrupt("simulated crash")
        return original(self, **kwargs)

    monkeypatch.setattr(StoreWriter, "build_derived", crash)
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter.open(store) as writer:
            compact(writer)
    monkeypatch.setattr(StoreWriter, "build_derived", original)
    assert Store.open(store).rows == 16 and check_store(store).ok

    # 2. crash in the middle of the switch (after READY): the next open finishes it
    real_finish = store_module.finish_compaction

    def half_switch(root):
        staging = root / ".compact"
        if not (staging / "READY").exists():
            return real_finish(root)
        (root / ".compact-old").mkdir(exist_ok=True)
        os.replace(root / "arrays.zarr", root / ".compact-old" / "arrays.zarr")
        os.replace(staging / "arrays.zarr", root / "arrays.zarr")
        raise KeyboardInterrupt("simulated crash mid-switch")

    monkeypatch.setattr(store_module, "finish_compaction", half_switch)
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter.open(store) as writer:
            compact(writer)
    monkeypatch.setattr(store_module, "finish_compaction", real_finish)
    # reading never moves anything: readers report the unfinished switch (after a short wait)
    import dermris.indexer.store.reader as reader_module

    monkeypatch.setattr(reader_module, "_SWITCH_WAIT_SECONDS", 0.2)
    listing = sorted(p.name for p in store.iterdir())
    with pytest.raises(StoreFormatError, match="middle of a compaction"):
        Store.open(store)
    assert not check_store(store).ok
    assert sorted(p.name for p in store.iterdir()) == listing
    StoreWriter.open(store).close()  # a writer finishes the switch under the lock
    reopened = Store.open(store)
    assert reopened.rows == 14
    assert check_store(store).ok, check_store(store).problems
    assert Retriever.open(store, device="cpu").search(0, measures="i1_sd", k=3)["i1_sd"]


def test_check_reports_each_problem(tmp_path, small_set):
    folder, csv = small_set
    store = tmp_path / "store"
    index_folder(
        folder, store, metadata=csv, progress=False, commit_every=8, batch_size=8, faiss_files=True
    )
    report = check_store(store)
    assert report.ok and report.rows == 16

    # damage a mask chunk, a Parquet part, the FAISS file and the model
    chunk = next(
        p
        for p in (store / "arrays.zarr" / "mask").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    part = sorted((store / "metadata").iterdir())[1]
    part.write_bytes(part.read_bytes()[:-20])
    next((store / "faiss").glob("features_l2-*.index")).write_bytes(b"junk")
    with open(store / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    problems = check_store(store).problems
    assert any(p.startswith("arrays:") and "mask" in p for p in problems), problems
    assert any(p.startswith("metadata:") and part.name in p for p in problems), problems
    assert any(p.startswith("faiss: faiss/features_l2") for p in problems), problems
    assert any(p.startswith("model:") for p in problems), problems
    assert all("\n" not in p for p in problems)

    result = CliRunner().invoke(main, ["check", str(store)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == len(problems)
    result = CliRunner().invoke(main, ["check", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and result.output.startswith("manifest:")


def _write_bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """Every kind of file an archive may hold; returns name -> 'indexed' or 'rejected'."""
    rgb = Image.open(good).convert("RGB")
    expect = {}

    def save(name, image, outcome, **kw):
        image.save(folder / name, **kw)
        expect[name] = outcome

    (folder / "zero.jpg").write_bytes(b"")
    expect["zero.jpg"] = "rejected"
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    expect["truncated.jpg"] = "rejected"
    (folder / "random.png").write_bytes(np.random.default_rng(1).bytes(4000))
    expect["random.png"] = "rejected"
    save("cmyk.jpg", rgb.convert("CMYK"), "indexed")
    save("gray.png", rgb.convert("L"), "indexed")
    save("rgba.png", rgb.convert("RGBA"), "indexed")
    save("palette.png", rgb.convert("P"), "indexed")
    arr16 = np.asarray(rgb.convert("L"), np.uint16) * 257
    save("sixteen.png", Image.fromarray(arr16), "indexed")
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", rgb.transpose(Image.Transpose.ROTATE_90), "indexed", exif=exif.tobytes())
    save("tiny8.bmp", rgb.resize((8, 8)), "indexed")
    save("bomb.png", Image.new("L", (6000, 6000)), "rejected")
    # an EXIF block PIL cannot parse (struct.error inside getexif): the pixels are still good
    save(
        "bad_exif.jpg",
        rgb.rotate(7),
        "indexed",
        exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00",
    )
    # EPS renamed .jpg: PIL would hand it to Ghostscript; dermris decodes only its listed formats
    (folder / "eps.jpg").write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"
    )
    expect["eps.jpg"] = "rejected"
    # a file name that is not UTF-8 (reported with the byte escaped)
    with open(os.path.join(os.fsencode(folder), b"latin\xe9.jpg"), "wb") as fh:
        fh.write(good.read_bytes())
    expect["latin\\xe9.jpg"] = "rejected"
    # a link to itself, a FIFO (reading it would block forever) and an endless device
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "endless.jpg")
    expect.update({"loop.jpg": "rejected", "fifo.jpg": "rejected", "endless.jpg": "rejected"})
    return expect


def test_every_bad_input_is_indexed_or_rejected(tmp_path, synthetic_set, monkeypatch):
    images, _ = synthetic_set
    folder = tmp_path / "bad"
    folder.mkdir()
    expect = _write_bad_inputs(folder, images / "SYN_globular_002.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000_000)  # 36 MP > 2x: a bomb here
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(
        main, ["index", str(folder), str(store), "--json", "--quiet", "--strict"]
    )
    assert result.exit_code == 3, result.output  # --strict: rejects make the run fail
    report = json.loads(result.stdout)
    rejected = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert set(rejected) == {n for n, o in expect.items() if o == "rejected"}
    assert "decompression-bomb" in rejected["bomb.png"] and "empty" in rejected["zero.jpg"]
    assert "not an image of a supported format" in rejected["eps.jpg"]
    assert "not valid UTF-8" in rejected["latin\\xe9.jpg"]
    assert "link loop" in rejected["loop.jpg"]
    assert (
        "not a regular file" in rejected["fifo.jpg"]
        and "not a regular file" in rejected["endless.jpg"]
    )
    indexed = set(Store.open(store).metadata(columns=["image_id"]).column("image_id").to_pylist())
    assert indexed == {Path(n).stem for n, o in expect.items() if o == "indexed"}
    recorded = {Path(r.path).name for r in Store.open(store).rejected}
    assert recorded == set(rejected)
    meta = Store.open(store).metadata(columns=["image_id", "width", "height"]).to_pylist()
    dims = {m["image_id"]: (m["width"], m["height"]) for m in meta}
    assert dims["tiny8"] == (8, 8) and dims["rotated"] == (160, 160)
    # without --strict the same outcome exits 0
    again = runner.invoke(main, ["index", str(folder), str(tmp_path / "store2"), "--quiet"])
    assert again.exit_code == 0 and f"rejected {len(rejected)}" in again.output


def test_store_of_another_model_or_version(tmp_path, small_set):
    folder, csv = small_set
    store = tmp_path / "store"
    index_folder(folder, store, progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["index", str(folder), str(store), "--preset", "lite0", "--quiet"])
    assert result.exit_code == 1 and "built with preset 'tiny', not 'lite0'" in result.output
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["model"]["config"]["members"] = 3
    (store / "manifest.json").write_text(json.dumps(manifest))
    from dermris.models import build_model, get_preset, save_model

    other = tmp_path / "other.safetensors"
    save_model(build_model(get_preset("tiny").replace(members=1)), other)
    result = runner.invoke(
        main, ["index", str(folder), str(store), "--weights", str(other), "--quiet"]
    )
    assert result.exit_code == 1 and "was built with" in result.output


def _index_subprocess(folder, store, csv):
    code = "import sys; from dermris.app.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "index",
            str(folder),
            str(store),
            "--metadata",
            str(csv),
            "--commit-every",
            "2",
            "--batch-size",
            "2",
            "--quiet",
            "--device",
            "cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow  # real index runs killed and resumed
def test_sigkill_at_random_points_then_resume(tmp_path, synthetic_set):
    """A real `dermris index` killed with SIGKILL several times, then resumed to the end."""
    images, csv = synthetic_set
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(images.iterdir())[:24]:
        shutil.copy(path, folder / path.name)
    shutil.copy(images / "SYN_globular_000.jpg", folder / "zz_duplicate.jpg")
    store = tmp_path / "store"
    rng = np.random.default_rng(20261125)
    rows_seen = []
    # kill points: while the model loads, then after random numbers of committed rows
    # (plus a random delay, so kills also land mid-batch, mid-write or mid-commit)
    targets = [None] + sorted(rng.choice(np.arange(1, 22), size=3, replace=False).tolist())
    for target in targets:
        proc = _index_subprocess(folder, store, csv)
        deadline = time.monotonic() + 120
        if target is None:
            time.sleep(float(rng.uniform(0.5, 1.5)))
        else:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if json.loads((store / "manifest.json").read_text())["rows"] >= target:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.02)
            time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (store / "manifest.json").is_file():
            rows = Store.open(store).rows
            rows_seen.append(rows)
            if rows:  # whatever was committed is served
                assert Retriever.open(store, device="cpu").search(0, measures="style", k=3)["style"]
    proc = _index_subprocess(folder, store, csv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    final = Store.open(store)
    ids = final.metadata(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(
        p.stem for p in sorted(images.iterdir())[:24]
    )  # one row per unique image
    assert len(ids) == len(set(ids)) == final.rows == 24
    report = check_store(store)
    assert report.ok, report.problems
    assert rows_seen == sorted(rows_seen)  # commits only ever grow
    assert any(0 < r < 24 for r in rows_seen), rows_seen  # some kills landed mid-run
    print("rows committed at each kill:", rows_seen)
