"""Random and mutated image bytes through ``dermris index``: the run always finishes, every good
image is indexed and every bad file is rejected with a reason."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dermris.app.cli import main
from dermris.indexer import Store
from dermris.indexer.store import check_store

FORMATS = [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif")]


def _encoded(rng: np.random.Generator, fmt: str) -> bytes:
    pixels = rng.integers(
        0, 256, (int(rng.integers(8, 48)), int(rng.integers(8, 48)), 3), dtype=np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _mutate(rng: np.random.Generator, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # flipped bytes
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    elif kind == 1:  # truncated
        data = data[: int(rng.integers(0, len(data)))]
    elif kind == 2:  # garbage spliced in
        at = int(rng.integers(len(data)))
        data[at:at] = rng.bytes(int(rng.integers(1, 200)))
    elif kind == 3:  # the header of one format, the body of random bytes
        data = data[:32] + bytearray(rng.bytes(int(rng.integers(0, 4000))))
    else:  # a chunk of the file repeated
        a = int(rng.integers(len(data)))
        data = data + data[a : a + int(rng.integers(1, 4000))] * int(rng.integers(1, 50))
    return bytes(data)


@pytest.mark.slow  # 160 files decoded and 40 indexed
def test_fuzzed_files_never_stop_a_run(tmp_path):
    rng = np.random.default_rng(20261126)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    good, fuzzed = set(), set()
    for i in range(160):
        fmt, ext = FORMATS[i % len(FORMATS)]
        data = _encoded(rng, fmt)
        if i % 4 == 0:
            good.add(f"g{i:03d}")
            (folder / f"g{i:03d}.{ext}").write_bytes(data)
        else:
            fuzzed.add(f"f{i:03d}")
            (folder / f"f{i:03d}.{ext}").write_bytes(
                _mutate(rng, data) if i % 13 else rng.bytes(int(rng.integers(0, 999)))
            )
    store = tmp_path / "store"
    result = CliRunner().invoke(
        main, ["index", str(folder), str(store), "--json", "-q", "--batch-size", "16"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rejected = {r["path"].rsplit("/", 1)[-1].split(".")[0]: r["reason"] for r in report["rejected"]}
    duplicates = {d["path"].rsplit("/", 1)[-1].split(".")[0] for d in report["duplicates"]}
    indexed = set(Store.open(store).metadata(columns=["image_id"]).column("image_id").to_pylist())
    assert good <= indexed  # every untouched image is in the store
    assert indexed | set(rejected) | duplicates == good | fuzzed  # every file accounted for
    assert not indexed & set(rejected)
    assert all(reason.strip() for reason in rejected.values())
    assert len(rejected) >= len(fuzzed) // 3  # mutations do break most files (some stay decodable)
    assert check_store(store).ok
