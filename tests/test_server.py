"""The HTTP API and search page (FastAPI's test client)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dermris.app.server import create_app, is_loopback  # noqa: E402
from dermris.retriever import Retriever  # noqa: E402

BASE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def client(indexed_store):
    return TestClient(create_app(indexed_store, device="cpu"), base_url=BASE)


def test_health_info_page_and_openapi(client):
    assert client.get("/api/health").json()["rows"] == 32
    info = client.get("/api/info").json()
    assert (
        info["rows"] == 32 and "texture" in info["metadata_columns"] and len(info["measures"]) == 9
    )
    assert "store" not in info  # no server paths
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and "/api/search" in page.text
    spec = client.get("/api/openapi.json").json()
    assert {"/api/search", "/api/image/{row}", "/api/explain"} <= set(spec["paths"])


def test_search_by_row_equals_the_retriever(client, indexed_store):
    response = client.post(
        "/api/search",
        data={
            "row": 4,
            "measures": ["style", "i1_sd"],
            "k": 3,
            "columns": ["texture"],
            "where": "texture != 'streaks'",
        },
    )
    assert response.status_code == 200, response.text
    payload = response.json()
    expected = Retriever.open(indexed_store, device="cpu").search(
        4, measures=("style", "i1_sd"), k=3, columns=("texture",), where="texture != 'streaks'"
    )
    for m in ("style", "i1_sd"):
        assert [h["row"] for h in payload["results"][m]] == [h.row for h in expected[m]]
        assert [h["score"] for h in payload["results"][m]] == [h.score for h in expected[m]]
        assert all(
            h["metadata"]["texture"] != "streaks" and set(h["components"]) == {"ss", "dc"}
            for h in payload["results"][m]
        )
    assert payload["query"]["row"] == 4 and payload["stats"]["rows"] == 32


def test_search_by_upload_with_explanations(client, synthetic_set):
    images, _ = synthetic_set
    data = (images / "SYN_reticular_003.jpg").read_bytes()
    response = client.post(
        "/api/search",
        files={"file": ("q.jpg", data, "image/jpeg")},
        data={"measures": ["style", "euclidean"], "k": 2, "explain": "true"},
    )
    assert response.status_code == 200, response.text
    payload = response.json()
    top = payload["results"]["style"][0]
    assert top["image_id"] == "SYN_reticular_003" and top["components"]["ss"] == pytest.approx(
        1.0, abs=1e-5
    )
    outline = Image.open(io.BytesIO(base64.b64decode(payload["query"]["mask_outline_png"])))
    assert outline.size == (128, 128) and outline.mode == "RGBA"
    second = payload["results"]["style"][1]
    shares = [s["share"] for s in second["style_stages"]]
    assert len(shares) == 7 and sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    # the stage losses add up to the style loss between the two stored rows
    explained = client.get("/api/explain", params={"a": top["row"], "b": second["row"]}).json()
    assert sum(s["loss"] for s in explained["stages"]) == pytest.approx(explained["style_loss"])


def test_images_and_masks_by_row_only(client):
    response = client.get("/api/image/3", params={"size": 64})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) <= 64
    assert client.get("/api/mask/3").headers["content-type"] == "image/png"
    for bad in ("/api/image/99", "/api/image/-1", "/api/image/..%2Fmanifest.json", "/api/mask/32"):
        assert client.get(bad).status_code in (404, 422), bad


def test_errors_are_clear(client, tmp_path):
    cases = [
        ({"files": {"file": ("x.jpg", b"not an image", "image/jpeg")}}, 400, "not an image"),
        ({"data": {"row": 1, "measures": ["dice"]}}, 400, "unknown measure"),
        ({"data": {"row": 1, "k": 0}}, 422, None),
        ({"data": {"row": 1, "k": 5000}}, 422, None),
        ({"data": {"row": 77}}, 400, "out of range"),
        ({"data": {"row": 1, "where": "import os"}}, 400, "where"),
        ({"data": {}}, 400, "either an image file or a row"),
    ]
    for kwargs, status, message in cases:
        response = client.post("/api/search", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        if message:
            assert message in response.json()["detail"], response.text
    bomb = io.BytesIO()
    Image.new("L", (12000, 12000)).save(bomb, format="PNG")  # 144 MP: over PIL's bomb limit
    response = client.post("/api/search", files={"file": ("b.png", bomb.getvalue(), "image/png")})
    assert response.status_code == 400 and "too many pixels" in response.json()["detail"]


def test_upload_size_host_origin_and_token(indexed_store):
    small = TestClient(
        create_app(indexed_store, device="cpu", max_upload_bytes=1000), base_url=BASE
    )
    response = small.post("/api/search", files={"file": ("q.jpg", b"\xff" * 2000, "image/jpeg")})
    assert response.status_code == 413
    # refused from its Content-Length, before the body is read
    huge = small.post(
        "/api/search",
        content=b"\0" * ((1 << 20) + 2000),
        headers={"content-type": "multipart/form-data"},
    )
    assert huge.status_code == 413 and "request body over" in huge.json()["detail"]
    assert (
        small.get("/api/health", headers={"Host": "evil.example"}).status_code == 403
    )  # DNS rebinding
    assert small.get("/api/health", headers={"Origin": "http://evil.example"}).status_code == 403
    assert small.get("/api/health", headers={"Origin": BASE}).status_code == 200
    locked = TestClient(create_app(indexed_store, device="cpu", token="s3cret"), base_url=BASE)
    assert locked.get("/api/health").status_code == 401
    assert locked.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert locked.get("/api/image/1", params={"token": "s3cret"}).status_code == 200
    assert locked.get("/api/health", params={"token": "wrong"}).status_code == 401


def test_serve_refuses_open_binding_without_a_token(indexed_store, monkeypatch):
    from dermris.app import server
    from dermris.core.errors import QueryError

    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    with pytest.raises(QueryError, match="needs --token"):
        server.serve(indexed_store, host="0.0.0.0", port=8123)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_page_escapes_store_strings(client):
    """Image ids, metadata names and values come from the user's files: never raw HTML."""
    import re
    import shutil
    import subprocess

    page = client.get("/").text
    for raw in ("${h.image_id}", "${k}", "${v ", "${v}", "${c}", "${m}", "${measure}"):
        assert raw not in page, raw
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: the escape function itself is not exercised")
    esc = re.search(r"function esc\(v\) \{.*?\n\}", page, re.S).group(0)
    script = (
        esc + '\nprocess.stdout.write(esc(`<img src=x onerror="alert(1)">&\'`) + "|" + esc(null));'
    )
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout
    assert out == "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;&#39;|–"


def test_search_cli_explain_json_text_and_sheet(indexed_store, tmp_path):
    """--explain: the seven stage losses add up to the style loss (from an independent reading of
    the store); the text names the largest stages; the sheet draws lesion outlines."""
    import json

    from click.testing import CliRunner

    from dermris.app.cli import main

    from reference import load_store

    data = load_store(indexed_store)
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "search",
            str(indexed_store),
            "--row",
            "5",
            "--measure",
            "style",
            "--measure",
            "i1_sd",
            "-k",
            "3",
            "--explain",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    for hits in json.loads(result.stdout)["results"].values():
        for hit in hits:
            stages = hit["style_stages"]
            style_loss = float(
                np.sum((data["style"][5].astype(np.float64) - data["style"][hit["row"]]) ** 2)
            )
            assert len(stages) == 7 and sum(s["loss"] for s in stages) == pytest.approx(
                style_loss, rel=1e-9
            )
            assert [s["channels"] for s in stages] == sorted(s["channels"] for s in stages)
    text = runner.invoke(
        main,
        ["search", str(indexed_store), "--row", "5", "-k", "2", "--explain", "--device", "cpu"],
    )
    assert text.exit_code == 0 and text.output.count("style loss from: stage") == 9 * 2

    # an image that is itself in the store: its own copy has the same style, no stage shares of
    # rounding noise
    own = Retriever.open(indexed_store, device="cpu").paths[5]
    same = runner.invoke(
        main,
        [
            "search",
            str(indexed_store),
            own,
            "-k",
            "1",
            "--measure",
            "style",
            "--explain",
            "--device",
            "cpu",
        ],
    )
    assert same.exit_code == 0 and "style loss from: - (the same style)" in same.output, same.output

    yellow = []
    for flag in ([], ["--explain"]):
        sheet = tmp_path / f"sheet{len(flag)}.png"
        run = runner.invoke(
            main,
            [
                "search",
                str(indexed_store),
                "--row",
                "5",
                "-k",
                "2",
                "--measure",
                "style",
                "--sheet",
                str(sheet),
                "--device",
                "cpu",
                *flag,
            ],
        )
        assert run.exit_code == 0, run.output
        pixels = np.asarray(Image.open(sheet).convert("RGB"))
        yellow.append(int(np.all(pixels == (255, 230, 0), axis=-1).sum()))
    areas = [int(np.count_nonzero(m)) for m in data["masks"]]
    assert yellow[0] == 0 and (yellow[1] > 0 or max(areas) == 0)


def _chunks(total: int, size: int = 64 << 10):
    for _ in range(total // size):
        yield b"\0" * size


def test_chunked_bodies_are_limited_too(indexed_store, tmp_path):
    """A body without Content-Length (chunked) is refused as it passes the limit, on both apps."""
    from dermris.app import judge
    from dermris.retriever import Retriever

    small = TestClient(
        create_app(indexed_store, device="cpu", max_upload_bytes=1000), base_url=BASE
    )
    response = small.post(
        "/api/search",
        content=_chunks(4 << 20),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 413 and "request body over" in response.json()["detail"]
    assert small.get("/api/health").status_code == 200
    out = tmp_path / "session"
    judge.prepare_session(Retriever.open(indexed_store, device="cpu"), out, queries=1, k=2)
    client = TestClient(judge.create_judge_app(out), base_url="http://127.0.0.1:8765")
    response = client.post("/judge/api/judgments", content=_chunks(1 << 20))
    assert response.status_code == 413
    assert (out / "judgments.jsonl").read_text() == ""


def test_hosts_beyond_loopback_and_same_origin(indexed_store):
    from dermris.core.errors import QueryError

    with pytest.raises(QueryError, match="needs a token"):
        create_app(indexed_store, host="0.0.0.0", device="cpu")
    lan = TestClient(
        create_app(indexed_store, host="0.0.0.0", device="cpu", token="t"),
        base_url="http://192.168.1.5:8000",
    )
    assert lan.get("/api/health").status_code == 401  # any Host, but the token always
    assert lan.get("/api/health", params={"token": "t"}).status_code == 200
    assert (
        lan.get(
            "/api/health", params={"token": "t"}, headers={"origin": "http://192.168.1.5:8000"}
        ).status_code
        == 200
    )
    assert (
        lan.get(
            "/api/health", params={"token": "t"}, headers={"origin": "http://evil.example"}
        ).status_code
        == 403
    )
    v6 = TestClient(
        create_app(indexed_store, host="fe80::1", device="cpu", token="t"),
        base_url="http://[fe80::1]:8000",
    )
    assert v6.get("/api/health", params={"token": "t"}).status_code == 200
    named = create_app(indexed_store, device="cpu", extra_hosts=("dermris.example",))
    assert (
        TestClient(named, base_url="http://dermris.example:8000").get("/api/health").status_code
        == 200
    )
    assert (
        TestClient(named, base_url="http://other.example:8000").get("/api/health").status_code
        == 403
    )
    # the API docs page fetches its schema with the token it was opened with
    docs = lan.get("/api/docs", params={"token": "t"})
    assert docs.status_code == 200 and "/api/openapi.json?token=t" in docs.text
    assert lan.get("/api/openapi.json", params={"token": "t"}).status_code == 200


def test_no_server_paths_in_answers(client):
    payload = client.post("/api/search", data={"row": 2, "k": 3}).json()
    assert all("path" not in hit for hits in payload["results"].values() for hit in hits)
    assert "path" not in client.get("/api/info").json()["metadata_columns"]
    refused = client.post("/api/search", data={"row": 2, "columns": ["path"]})
    assert refused.status_code == 400 and "not served" in refused.json()["detail"]
