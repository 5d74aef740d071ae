"""Every CLI command through click's runner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from dermris.app.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def test_index_search_info(runner, tmp_path, synthetic_set):
    images, csv = synthetic_set
    store = tmp_path / "store"
    result = runner.invoke(
        main,
        [
            "index",
            str(images),
            str(store),
            "--metadata",
            str(csv),
            "--id-column",
            "image_id",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "indexed 32" in result.output and "store has 32 rows" in result.output

    query = images / "SYN_homogeneous_002.jpg"
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(
        main, ["search", str(store), str(query), "--all", "-k", "3", "--sheet", str(sheet)]
    )
    assert result.exit_code == 0, result.output
    for measure in (
        "euclidean",
        "cosine",
        "style",
        "i1_ed",
        "i1_cd",
        "i1_ecd",
        "i1_se",
        "i1_sc",
        "i1_sd",
    ):
        assert f"\n{measure}\n" in result.output
    assert result.output.count("SYN_homogeneous_002") >= 9
    with Image.open(sheet) as im:
        assert im.width > 3 * 128 and im.height > 10 * 128

    result = runner.invoke(
        main, ["search", str(store), str(query), "--measure", "style", "-k", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload["results"]) == ["style"] and len(payload["results"]["style"]) == 2
    assert payload["results"]["style"][0]["image_id"] == "SYN_homogeneous_002"

    result = runner.invoke(
        main, ["search", str(store), "--row", "4", "--measure", "cosine", "--json", "--stats"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert all(h["row"] != 4 for h in payload["results"]["cosine"])
    assert payload["stats"]["rows"] == 32 and "cosine" in payload["stats"]["reranked"]

    result = runner.invoke(
        main, ["search", str(store), "--row", "4", "--measure", "i1_sd", "--stats"]
    )
    assert result.exit_code == 0, result.output
    assert "style rows read" in result.output and "i1_sd" in result.output

    result = runner.invoke(main, ["info", str(store)])
    assert result.exit_code == 0 and "rows" in result.output and "efficientnet_b0" in result.output
    info = json.loads(runner.invoke(main, ["info", str(store), "--json"]).stdout)
    assert info["rows"] == 32 and info["faiss_files"] is None  # kept only when asked
    assert "texture" in info["metadata_columns"]

    before = payload_style_row4(store)  # with the 31-d sketch the index run built
    result = runner.invoke(main, ["rebuild", str(store), "--sketch-dim", "8"])
    assert result.exit_code == 0 and "d=8" in result.output, result.output
    again = runner.invoke(
        main,
        ["search", str(store), "--row", "4", "--measure", "style", "--json", "--device", "cpu"],
    )
    assert json.loads(again.stdout)["results"]["style"] == before  # exact whatever the sketch


def payload_style_row4(store):
    from dermris.retriever import Retriever

    return [
        h.to_dict()
        for h in Retriever.open(store, device="cpu").search(4, measures="style", k=5)["style"]
    ]


def test_cli_errors_are_one_line(runner, tmp_path, synthetic_set):
    images, _ = synthetic_set
    result = runner.invoke(main, ["info", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert (
        result.stderr.startswith("Error: no store at")
        and result.stderr.count("\n") == 1
        and result.stdout == ""
    )
    assert "Traceback" not in result.output

    result = runner.invoke(
        main, ["search", str(tmp_path), str(images / "SYN_streaks_000.jpg"), "--measure", "dice"]
    )
    assert result.exit_code == 2 and "dice" in result.output

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("isic_id,x\nA,1\nA,2\n")
    result = runner.invoke(
        main, ["index", str(images), str(tmp_path / "s"), "--metadata", str(bad_csv), "--quiet"]
    )
    assert result.exit_code == 1 and "duplicate ids" in result.output

    result = runner.invoke(main, ["search", str(tmp_path / "s")])
    assert result.exit_code == 2 and "either IMAGE or --row" in result.output


def test_index_json_reports_rejects(runner, tmp_path, synthetic_set):
    images, _ = synthetic_set
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "SYN_a.jpg").write_bytes((images / "SYN_globular_001.jpg").read_bytes())
    result = runner.invoke(
        main, ["index", str(folder), str(tmp_path / "store"), "--json", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["indexed"] == 1 and report["rows"] == 1
    assert report["rejected"][0]["path"].endswith("broken.jpg")


@pytest.mark.slow  # builds the lite0 model and runs the demo twice
def test_demo(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(main, ["demo", "--out", str(out), "--per-class", "3", "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "indexed 12 synthetic images" in result.output
    assert "i1_sd" in result.output and (out / "sheet.png").is_file()
    again = runner.invoke(main, ["demo", "--out", str(out), "--per-class", "3", "--json"])
    assert again.exit_code == 0
    payload = json.loads(again.stdout)
    assert set(payload["results"]) >= {"style", "i1_ecd"} and len(payload["results"]["style"]) == 5


def test_search_where_columns_exclude(runner, indexed_store):
    result = runner.invoke(
        main,
        [
            "search",
            str(indexed_store),
            "--row",
            "0",
            "--measure",
            "style",
            "-k",
            "3",
            "--where",
            "texture == 'streaks'",
            "--column",
            "texture",
            "--exclude",
            "17",
            "--json",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["results"]["style"]
    assert len(hits) == 3 and all(
        h["metadata"] == {"texture": "streaks"} and h["row"] != 17 for h in hits
    )
    text = runner.invoke(
        main,
        [
            "search",
            str(indexed_store),
            "--row",
            "0",
            "--measure",
            "cosine",
            "-k",
            "2",
            "--where",
            "texture == 'streaks'",
            "--column",
            "texture",
        ],
    )
    assert text.exit_code == 0 and "texture" in text.stdout and "streaks" in text.stdout
    bad = runner.invoke(main, ["search", str(indexed_store), "--row", "0", "--where", "import os"])
    assert (
        bad.exit_code == 1
        and bad.stderr.startswith("Error: where:")
        and bad.stderr.count("\n") == 1
    )
    bad = runner.invoke(
        main, ["search", str(indexed_store), "--row", "0", "--where", "nosuch == 1"]
    )
    assert bad.exit_code == 1 and "nosuch" in bad.stderr
    bad = runner.invoke(main, ["search", str(indexed_store), "--row", "0", "--column", "nosuch"])
    assert bad.exit_code == 1 and "unknown metadata column 'nosuch'" in bad.stderr


def test_only_dermris_errors_become_one_line(runner, indexed_store, monkeypatch):
    """A bug (an unexpected exception type) keeps its traceback; dermris errors are one line."""
    from dermris.indexer.store import Store

    def broken(self):
        raise ValueError("a programming error")

    monkeypatch.setattr(Store, "describe", broken)
    result = runner.invoke(main, ["info", str(indexed_store)])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "Error:" not in result.output


def test_warnings_and_diagnostics_go_to_stderr(runner, tmp_path, synthetic_set):
    images, csv = synthetic_set
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "NOT_IN_CSV.jpg").write_bytes((images / "SYN_globular_001.jpg").read_bytes())
    result = runner.invoke(
        main,
        ["index", str(folder), str(tmp_path / "store"), "--metadata", str(csv), "--json", "-q"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["indexed"] == 1  # stdout is pure JSON
    assert "WARNING" not in result.stdout
    loud = runner.invoke(
        main, ["index", str(folder), str(tmp_path / "store2"), "--metadata", str(csv), "--json"]
    )
    assert loud.exit_code == 0 and json.loads(loud.stdout)["without_metadata"] == ["NOT_IN_CSV"]
    assert "WARNING: 1 images have no row in the metadata CSV" in loud.stderr
    verbose = runner.invoke(main, ["info", str(tmp_path / "store2"), "-v"])
    assert verbose.exit_code == 0 and "INFO" not in verbose.stdout


def test_delete_compact_ids_file_and_locked_store_through_the_cli(runner, tmp_path):
    from conftest import make_random_store

    from dermris.indexer import Store, StoreWriter

    store = make_random_store(tmp_path / "s", n=12, seed=21)
    ids = tmp_path / "ids.txt"
    ids.write_text("IMG_21_0002\n\nIMG_21_0005\n")
    result = runner.invoke(main, ["delete", str(store), "--ids-file", str(ids)])
    assert result.exit_code == 0 and "deleted 2 images" in result.stdout
    assert Store.open(store).deleted_rows.tolist() == [2, 5]
    with StoreWriter.open(store):  # another writer holds the lock
        result = runner.invoke(main, ["compact", str(store)])
        assert result.exit_code == 1 and "another process is writing" in result.stderr
        assert result.stderr.count("\n") == 1
    result = runner.invoke(main, ["compact", str(store)])
    assert result.exit_code == 0 and "removed 2 rows; store has 10 rows" in result.stdout
    assert Store.open(store).rows == 10
    assert runner.invoke(main, ["delete", str(store)]).exit_code == 2  # usage: no ids
