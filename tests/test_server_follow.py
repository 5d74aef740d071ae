"""The server follows the store: deletions, new rows and compactions by other processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dermris.app.server import GENERATION_HEADER, create_app  # noqa: E402
from dermris.retriever import Retriever  # noqa: E402
from dermris.retriever.explain import style_stages  # noqa: E402

BASE = "http://127.0.0.1:8000"


@pytest.fixture
def store_copy(indexed_store, tmp_path):
    """A private copy of the indexed store (its image files stay where they are)."""
    copy = tmp_path / "store"
    shutil.copytree(indexed_store, copy)
    return copy


def _cli(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from dermris.app.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def _no_paths(text: str, store) -> None:
    assert str(store) not in text and "/tmp" not in text and "/nonexistent" not in text


def test_deleted_rows_are_gone_from_every_endpoint(store_copy):
    client = TestClient(create_app(store_copy, device="cpu", poll_seconds=0), base_url=BASE)
    assert client.get("/api/image/4").status_code == 200
    assert client.get("/api/mask/4").status_code == 200
    assert client.get("/api/explain", params={"a": 4, "b": 5}).status_code == 200
    image_id = Retriever.open(store_copy, device="cpu").image_ids[4]
    _cli("delete", str(store_copy), "--id", image_id)  # another process
    for url, params in (
        ("/api/image/4", {}),
        ("/api/mask/4", {}),
        ("/api/explain", {"a": 4, "b": 5}),
        ("/api/explain", {"a": 5, "b": 4}),
    ):
        response = client.get(url, params=params)
        assert response.status_code == 404, (url, response.text)
        assert response.json()["detail"] == "row 4 was deleted"
    found = client.post("/api/search", data={"row": 5, "k": 40, "measures": ["style"]}).json()
    assert 4 not in [h["row"] for h in found["results"]["style"]]
    assert client.get("/api/image/5").status_code == 200


def _fresh_explain(store, a: int, b: int) -> float:
    fresh = Retriever.open(store, device="cpu")
    sa, sb = fresh.store.style_rows([a, b])
    return sum(s.loss for s in style_stages(fresh.store.layout, sa, sb))


@pytest.mark.parametrize("poll_seconds", [0, 0.2])
def test_a_compaction_by_another_process_is_followed(store_copy, poll_seconds):
    client = TestClient(
        create_app(store_copy, device="cpu", poll_seconds=poll_seconds), base_url=BASE
    )
    before = client.get("/api/health").json()
    assert before["rows"] == 32 and before["generation"]
    old_image_11 = client.get("/api/image/11").content
    opened = Retriever.open(store_copy, device="cpu")
    gone = [opened.image_ids[r] for r in (0, 2, 3)]
    _cli("delete", str(store_copy), *[a for i in gone for a in ("--id", i)])
    _cli("compact", str(store_copy))
    fresh = Retriever.open(store_copy, device="cpu")
    assert len(fresh) == 29 and fresh.generation != before["generation"]

    for a, b in ((4, 5), (11, 1), (27, 28)):
        response = client.get("/api/explain", params={"a": a, "b": b})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["generation"] == fresh.generation
        assert body["style_loss"] == pytest.approx(_fresh_explain(store_copy, a, b), rel=1e-6)
    assert client.get("/api/explain", params={"a": 30, "b": 1}).status_code == 404

    response = client.post("/api/search", data={"row": 4, "k": 5, "measures": ["style", "i1_sd"]})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["generation"] == fresh.generation and payload["stats"]["rows"] == 29
    expected = fresh.search(4, measures=("style", "i1_sd"), k=5)
    for m in ("style", "i1_sd"):
        assert [h["row"] for h in payload["results"][m]] == [h.row for h in expected[m]]
        assert [h["score"] for h in payload["results"][m]] == [h.score for h in expected[m]]

    image = client.get("/api/image/11")
    assert image.status_code == 200 and image.headers[GENERATION_HEADER] == fresh.generation
    assert image.content != old_image_11  # row 11 is another image now (rows were renumbered)
    assert client.get("/api/mask/28").headers[GENERATION_HEADER] == fresh.generation
    assert client.get("/api/image/29").status_code == 404
    # a row number of the old generation is refused, not answered with another image
    stale = client.get("/api/image/11", params={"generation": before["generation"]})
    assert stale.status_code == 409 and "search again" in stale.json()["detail"]
    _no_paths(stale.text, store_copy)
    health = client.get("/api/health").json()
    assert health["rows"] == 29 and health["generation"] == fresh.generation
    info = client.get("/api/info").json()
    assert info["generation"] == fresh.generation and info["rows"] == 29


def _append(store, n: int, seed: int) -> None:
    """Append ``n`` random rows through the library writer (another writer than the server)."""
    from dermris.indexer import StoreWriter

    rng = np.random.default_rng(seed)
    writer = StoreWriter.open(store)
    try:
        reader = writer.reader()
        ids = [f"NEW_{seed}_{i}" for i in range(n)]
        writer.append(
            features=rng.normal(size=(n, reader.feature_dim)).astype(np.float32),
            style=np.abs(rng.normal(size=(n, reader.style_dim))).astype(np.float32),
            masks=rng.random((n, reader.mask_size, reader.mask_size)) < 0.3,
            records=pa.table(
                {
                    "image_id": pa.array(ids),
                    "path": pa.array([f"/nonexistent/{i}.jpg" for i in ids]),
                    "sha256": pa.array([f"{seed:032x}{i:032x}" for i in range(n)]),
                    "width": pa.array([32] * n, pa.int32()),
                    "height": pa.array([32] * n, pa.int32()),
                }
            ),
        )
    finally:
        writer.close()


def test_new_rows_appear_within_seconds(random_store):
    store = random_store(n=40, seed=3)
    client = TestClient(create_app(store, device="cpu", poll_seconds=0.2), base_url=BASE)
    assert client.get("/api/health").json()["rows"] == 40
    _append(store, 5, seed=9)
    deadline = time.monotonic() + 10
    while client.get("/api/health").json()["rows"] != 45:
        assert time.monotonic() < deadline, "the new rows never appeared"
        time.sleep(0.1)
    response = client.post("/api/search", data={"row": 43, "k": 50, "measures": ["euclidean"]})
    assert response.status_code == 200, response.text
    payload = response.json()
    expected = Retriever.open(store, device="cpu").search(43, measures="euclidean", k=50)
    assert [h["row"] for h in payload["results"]["euclidean"]] == [
        h.row for h in expected["euclidean"]
    ]
    assert client.get("/api/explain", params={"a": 44, "b": 0}).status_code == 200


def test_store_errors_name_no_server_path(random_store, monkeypatch):
    from dermris.app import _follow
    from dermris.core.errors import StoreChangedError

    store = random_store(n=20, seed=4)
    client = TestClient(create_app(store, device="cpu", poll_seconds=0), base_url=BASE)

    def never_settles(*args, **kwargs):
        raise StoreChangedError(f"{store} was compacted since it was opened; reopen it")

    monkeypatch.setattr(_follow.FollowedStore, "run", never_settles)
    response = client.get("/api/explain", params={"a": 1, "b": 2})
    assert response.status_code == 409
    _no_paths(response.text, store)
    assert "the store was compacted" in response.json()["detail"]


def test_reopening_does_not_hold_up_searches(random_store, monkeypatch):
    import threading

    from dermris.app import _follow

    store = random_store(n=30, seed=5)
    app = create_app(store, device="cpu", poll_seconds=0)
    client = TestClient(app, base_url=BASE)
    opened = _follow._open_snapshot

    def slow_open(*args, **kwargs):
        time.sleep(3.0)
        return opened(*args, **kwargs)

    monkeypatch.setattr(_follow, "_open_snapshot", slow_open)
    _append(store, 2, seed=10)
    reopening = threading.Thread(target=app.state.follow.poll)
    reopening.start()
    time.sleep(0.3)
    started = time.monotonic()
    response = client.post("/api/search", data={"row": 1, "k": 3, "measures": ["style"]})
    assert response.status_code == 200 and time.monotonic() - started < 2.0
    assert response.json()["stats"]["rows"] == 30  # the old snapshot, while the new one opens
    reopening.join(30)
    assert client.get("/api/health").json()["rows"] == 32
