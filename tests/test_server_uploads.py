"""Uploads: decoded outside the search lock, within a pixel budget, without float64 copies of
the whole image."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from dermris.core import imageio
from dermris.core.errors import PixelBudgetError
from dermris.core.imageio import decode_image_bytes, to_rgb

BASE = "http://127.0.0.1:8000"


def _whole_image_reference(image: Image.Image) -> np.ndarray:
    """The conversion as it was, over the whole image in float64 (the arithmetic to keep)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
        if image.mode == "I" and lo >= 0 and hi <= 255:
            scaled = values
        elif image.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = values / 257.0
        else:
            scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _images():
    rng = np.random.default_rng(0)
    f = (rng.normal(size=(53, 71)) * 1e3).astype(np.float32)
    f[3, 4], f[10, 10], f[20, 5] = np.nan, np.inf, -np.inf
    yield Image.fromarray(f)
    yield Image.fromarray(np.full((9, 8), 7.5, np.float32))  # constant
    yield Image.fromarray(rng.integers(0, 255, (40, 33)).astype(np.int32))
    yield Image.fromarray(rng.integers(0, 60000, (40, 33)).astype(np.int32))
    yield Image.fromarray(rng.integers(-9, 10**7, (40, 33)).astype(np.int32))
    yield Image.fromarray(rng.integers(0, 65535, (37, 29)).astype(np.uint16))


@pytest.mark.parametrize("strip_pixels", [1, 100, 1 << 20])
def test_strip_conversion_equals_the_whole_image_arithmetic(monkeypatch, strip_pixels):
    monkeypatch.setattr(imageio, "_STRIP_PIXELS", strip_pixels)
    for image in _images():
        got = np.asarray(to_rgb(image))
        expected = _whole_image_reference(image)
        assert got.shape == (*expected.shape, 3)
        for channel in range(3):
            np.testing.assert_array_equal(got[:, :, channel], expected)


def _float_tiff(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("F", (side, side), 0.5).save(buf, format="TIFF", compression="tiff_deflate")
    return buf.getvalue()


def test_a_pixel_budget_refuses_before_decoding():
    data = _float_tiff(1200)
    with pytest.raises(PixelBudgetError, match="1200 x 1200 pixels is over the budget"):
        decode_image_bytes(data, name="big.tif", max_pixels=1_000_000)
    assert decode_image_bytes(data, name="big.tif", max_pixels=1_440_000)[0].size == (1200, 1200)


def test_uploads_are_refused_by_pixels_and_decoded_outside_the_search_lock(random_store):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermris.app.server import create_app

    store = random_store(n=10, seed=8)
    app = create_app(store, device="cpu", poll_seconds=0, max_upload_pixels=1_000_000)
    client = TestClient(app, base_url=BASE)
    data = _float_tiff(1200)
    answers = []

    def upload():
        answers.append(client.post("/api/search", files={"file": ("big.tif", data, "image/tiff")}))

    with app.state.follow.lock:  # a long search holds the lock: the upload is refused anyway
        worker = threading.Thread(target=upload)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "the upload waited for the search lock"
    assert answers[0].status_code == 413
    assert "over the budget of 1000000 pixels" in answers[0].json()["detail"]


PEAK = """
import io, resource, sys
from dermris.core.imageio import decode_image_bytes
data = open(sys.argv[1], "rb").read()
budget = None if sys.argv[2] == "none" else int(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    image = decode_image_bytes(data, name="big.tif", max_pixels=budget)[0]
    print("decoded", image.size, end=" ")
except Exception as exc:
    print("refused", type(exc).__name__, end=" ")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""

MAKE = """
import sys
from PIL import Image
Image.new("F", (7000, 7000), 0.5).save(sys.argv[1], format="TIFF", compression="tiff_deflate")
"""


@pytest.mark.slow
def test_a_7000_square_float_tiff_costs_no_gigabytes(tmp_path):
    """Refused by the default budget at no cost; decoded without a budget, strip by strip, in
    about the image's own size (the whole-image float64 conversion took about 2 GB)."""
    from dermris.app.server import MAX_UPLOAD_PIXELS

    path = tmp_path / "big.tif"
    subprocess.run([sys.executable, "-c", MAKE, str(path)], check=True, timeout=300)
    assert path.stat().st_size < 1 << 20

    def peak(budget) -> tuple[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(path), str(budget)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        words = done.stdout.split()
        return words[0], int(words[-1]) * 1024  # ru_maxrss is in KiB on Linux

    refused, refused_bytes = peak(MAX_UPLOAD_PIXELS)
    assert refused == "refused" and refused_bytes < 50 << 20
    decoded, decoded_bytes = peak("none")
    # the float image itself (196 MB) + the 8-bit gray and RGB results (196 MB) + strips
    assert decoded == "decoded" and decoded_bytes < 600 << 20, decoded_bytes
