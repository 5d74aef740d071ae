"""``/api/docs``: Swagger UI served by the server itself from the fastapi-offline package, never
from a CDN (the page carries the token); only the known files, with the token beyond loopback."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("fastapi_offline")
from fastapi.testclient import TestClient  # noqa: E402

from dermris.app import server  # noqa: E402
from dermris.app.server import create_app  # noqa: E402

BASE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def client(indexed_store):
    return TestClient(create_app(indexed_store, device="cpu"), base_url=BASE)


def _assets(html: str) -> list[str]:
    """Every ``src=`` and ``href=`` of the page's script and link tags."""
    return re.findall(r"<(?:script|link)\b[^>]*?\b(?:src|href)=\"([^\"]*)\"", html)


def test_docs_page_loads_nothing_from_elsewhere(client):
    page = client.get("/api/docs")
    assert page.status_code == 200
    assert "//" not in "".join(_assets(page.text))  # no http://, https:// or //host
    assert "cdn" not in page.text.lower() and "http" not in "".join(_assets(page.text))
    assert sorted(_assets(page.text)) == [
        "/api/docs/static/favicon.png",
        "/api/docs/static/swagger-ui-bundle.js",
        "/api/docs/static/swagger-ui.css",
    ]
    assert "'/api/openapi.json'" in page.text
    assert '"validatorUrl": null' in page.text  # no badge image from swagger.io
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self' 'unsafe-inline'" in csp


def test_docs_files_come_from_this_server(client):
    js = client.get("/api/docs/static/swagger-ui-bundle.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in js.text and len(js.content) > 100_000
    css = client.get("/api/docs/static/swagger-ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert ".swagger-ui" in css.text
    icon = client.get("/api/docs/static/favicon.png")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/png"
    assert icon.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "name",
    [
        "redoc.standalone.js",  # in the package's folder, but not one we serve
        "index.html",
        "..%2F__init__.py",
        "..%2F..%2Ffastapi%2F__init__.py",
        "%2Fetc%2Fpasswd",
    ],
)
def test_unknown_docs_files_are_404(client, name):
    answer = client.get("/api/docs/static/" + name)
    assert answer.status_code == 404


def test_docs_carry_the_token_beyond_loopback(indexed_store):
    lan = TestClient(
        create_app(indexed_store, host="0.0.0.0", device="cpu", token="t&x"),
        base_url="http://192.168.1.5:8000",
    )
    assert lan.get("/api/docs").status_code == 401
    assert lan.get("/api/docs/static/swagger-ui.css").status_code == 401
    page = lan.get("/api/docs", params={"token": "t&x"})
    assert page.status_code == 200
    assets = _assets(page.text)
    assert len(assets) == 3 and all(a.endswith("?token=t%26x") for a in assets)
    assert "/api/openapi.json?token=t%26x" in page.text
    for asset in assets:
        assert lan.get(asset).status_code == 200


def test_docs_without_the_package_is_a_clear_error(indexed_store, monkeypatch):
    monkeypatch.setattr(server, "_docs_folder", lambda: None)
    bare = TestClient(create_app(indexed_store, device="cpu"), base_url=BASE)
    answer = bare.get("/api/docs")
    assert answer.status_code == 503 and "fastapi-offline" in answer.json()["detail"]
    assert bare.get("/api/docs/static/swagger-ui.css").status_code == 404
