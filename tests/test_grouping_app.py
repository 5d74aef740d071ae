"""Grouped search and lesion queries through ``dermris search`` and ``POST /api/search``: the
same answers as the library (which ``test_grouping.py`` checks against the brute force)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dermris.app.cli import main
from dermris.retriever import LesionQuery, Retriever

BASE = "http://127.0.0.1:8000"


def _rows(hits):
    return [(h["row"], h["score"]) for h in hits]


def _lib(hits):
    return [(h.row, h.score) for h in hits]


@pytest.mark.slow
def test_cli_group_by_and_lesion_queries(indexed_store, synthetic_set):
    images, _ = synthetic_set
    runner = CliRunner()
    retriever = Retriever.open(indexed_store, device="cpu")
    out = runner.invoke(
        main,
        ["search", str(indexed_store), "--row", "3", "--group-by", "texture", "-k", "3"]
        + ["--measure", "style", "--json"],
    )
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    expected = retriever.search(3, measures="style", k=3, group_by="texture")["style"]
    hits = payload["results"]["style"]
    assert _rows(hits) == _lib(expected) and payload["group_by"] == "texture"
    assert [h["group"] for h in hits] == [h.group for h in expected]
    assert [h["members"] for h in hits] == [list(h.members) for h in expected]
    assert len({h["group"] for h in hits}) == 3  # three textures, one hit each

    # several rows with --lesion: one lesion query
    out = runner.invoke(
        main,
        ["search", str(indexed_store), "--row", "3", "--row", "5", "--lesion", "--json"]
        + ["--measure", "i1_se", "-k", "4"],
    )
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    expected = retriever.search(LesionQuery([3, 5]), measures="i1_se", k=4)["i1_se"]
    assert _rows(payload["results"]["i1_se"]) == _lib(expected)
    assert payload["rows"] == [3, 5] and "lesion" in payload["query"]
    assert not {3, 5} & {h["row"] for h in payload["results"]["i1_se"]}

    # an image file and a row, mixed, in text form
    image = images / "SYN_reticular_003.jpg"
    out = runner.invoke(
        main,
        ["search", str(indexed_store), str(image), "--row", "9", "--lesion"]
        + ["--measure", "style", "-k", "2", "--group-by", "texture"],
    )
    assert out.exit_code == 0, out.output
    assert "lesion of 2 image(s)" in out.output and "texture " in out.output

    # --lesion-of: every row of one group
    out = runner.invoke(
        main,
        ["search", str(indexed_store), "--lesion-of", "texture=streaks", "--json"]
        + ["--measure", "style", "-k", "3"],
    )
    assert out.exit_code == 0, out.output
    streaks = retriever.group_rows("texture", "streaks")
    assert json.loads(out.output)["rows"] == streaks
    expected = retriever.search(LesionQuery(streaks), measures="style", k=3)["style"]
    assert _rows(json.loads(out.output)["results"]["style"]) == _lib(expected)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--row", "1", "--row", "2"], "add --lesion"),
        ([], "either IMAGE or --row"),
        (["--lesion-of", "texture"], "COLUMN=VALUE"),
        (["--row", "1", "--row", "2", "--lesion", "--explain"], "not available"),
    ],
)
def test_cli_lesion_usage_errors(indexed_store, args, message):
    out = CliRunner().invoke(main, ["search", str(indexed_store), *args])
    assert out.exit_code == 2 and message in out.output


def test_cli_group_by_unknown_column(indexed_store):
    out = CliRunner().invoke(main, ["search", str(indexed_store), "--row", "1", "--group-by", "x"])
    assert out.exit_code == 1 and "unknown metadata column 'x'" in out.output


@pytest.fixture(scope="module")
def client(indexed_store):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermris.app.server import create_app

    return TestClient(create_app(indexed_store, device="cpu"), base_url=BASE)


@pytest.mark.slow
def test_api_group_by_rows_and_files(client, indexed_store, synthetic_set):
    images, _ = synthetic_set
    retriever = Retriever.open(indexed_store, device="cpu")
    response = client.post(
        "/api/search", data={"row": 4, "measures": ["style"], "k": 3, "group_by": "texture"}
    )
    assert response.status_code == 200, response.text
    hits = response.json()["results"]["style"]
    expected = retriever.search(4, measures="style", k=3, group_by="texture")["style"]
    assert _rows(hits) == _lib(expected)
    assert [(h["group"], h["members"]) for h in hits] == [
        (h.group, list(h.members)) for h in expected
    ]

    # several rows: one lesion query
    response = client.post("/api/search", data={"rows": [4, 11], "measures": ["i1_sd"], "k": 3})
    assert response.status_code == 200, response.text
    payload = response.json()
    expected = retriever.search(LesionQuery([4, 11]), measures="i1_sd", k=3)["i1_sd"]
    assert _rows(payload["results"]["i1_sd"]) == _lib(expected)
    assert payload["query"]["lesion"]["rows"] == [4, 11]

    # two file parts and a row: one lesion query, as the library answers it
    a, b = images / "SYN_reticular_003.jpg", images / "SYN_globular_001.jpg"
    response = client.post(
        "/api/search",
        files=[
            ("file", ("a.jpg", a.read_bytes(), "image/jpeg")),
            ("file", ("b.jpg", b.read_bytes(), "image/jpeg")),
        ],
        data={"rows": [7], "measures": ["style", "i1_se"], "k": 3, "group_by": "texture"},
    )
    assert response.status_code == 200, response.text
    payload = response.json()
    expected = retriever.search(
        LesionQuery([a, b, 7]), measures=("style", "i1_se"), k=3, group_by="texture"
    )
    for m in ("style", "i1_se"):
        assert [h["row"] for h in payload["results"][m]] == [h.row for h in expected[m]]
        assert [h["score"] for h in payload["results"][m]] == pytest.approx(
            [h.score for h in expected[m]], rel=1e-6
        )
    assert payload["query"]["lesion"]["filenames"] == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"row": 1, "rows": [2]}, "either a row"),
        ({"row": 1, "group_by": "path"}, "not served"),
        ({"row": 1, "group_by": "nope"}, "unknown metadata column"),
        ({"rows": [1, 99]}, "out of range"),
    ],
)
def test_api_lesion_and_group_errors(client, data, message):
    response = client.post("/api/search", data=data)
    assert response.status_code == 400 and message in response.json()["detail"]


def test_page_offers_lesion_queries_and_grouping(client):
    page = client.get("/").text
    assert 'id="group-by"' in page and 'id="rows"' in page and "multiple hidden" in page
    assert 'form.append("group_by"' in page and 'form.append("rows", r)' in page
    assert 'if (!lesion) form.append("explain"' in page  # explain is refused for lesions
