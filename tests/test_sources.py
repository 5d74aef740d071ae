"""The reader stage: decoding every kind of file a real archive holds, and metadata CSVs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dermris.indexer import (
    ImageDecodeError,
    MetadataError,
    MetadataTable,
    decode_image,
    decode_image_bytes,
    list_images,
)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")


def test_modes_become_8bit_rgb(rgb):
    cases = {
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray": _encode(rgb.convert("L"), "PNG"),
        "rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "palette": _encode(rgb.convert("P"), "PNG"),
        "palette_transparent": _encode(rgb.convert("P"), "PNG", transparency=0),
        "bilevel": _encode(rgb.convert("1"), "BMP"),
        "tiff": _encode(rgb, "TIFF"),
    }
    for name, data in cases.items():
        image, w, h = decode_image_bytes(data, name=name)
        assert image.mode == "RGB" and (w, h) == (60, 40) and image.size == (60, 40), name


def test_16bit_png_is_rescaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 16).reshape(16, 64)).astype(np.uint16)
    data = _encode(Image.fromarray(ramp), "PNG")
    image, _, _ = decode_image_bytes(data)
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() == 255
    assert len(np.unique(values)) > 200  # the full ramp survives, not a white image


def test_exif_orientation_is_applied(rgb):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(rgb, "JPEG", exif=exif.tobytes(), quality=95)
    image, w, h = decode_image_bytes(data)
    assert image.size == (40, 60) and (w, h) == (40, 60)


def test_tiny_and_huge_images(monkeypatch, rgb):
    image, w, h = decode_image_bytes(_encode(rgb.resize((8, 8)), "PNG"))
    assert (w, h) == (8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60x40 = 2400 > 2 x limit: bomb
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image_bytes(_encode(rgb, "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # over the limit, under 2x: still refused
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image_bytes(_encode(rgb, "PNG"))


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty file"),
        (b"\x00\x01garbage" * 50, "not an image"),
    ],
)
def test_non_images(data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image_bytes(data)


def test_truncated_jpeg(rgb):
    data = _encode(rgb.resize((300, 300)), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_image_bytes(data[: len(data) // 2])


def test_decode_image_reports_path_and_hash(tmp_path, rgb):
    import hashlib

    path = tmp_path / "a.png"
    rgb.save(path)
    image, w, h, sha = decode_image(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image(tmp_path / "missing.png")


def test_list_images_walks_sorted_and_filters(tmp_path, rgb):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b.JPG", "a.png", "sub/c.tif", "notes.txt", ".hidden/d.png", "e.bmp"):
        (tmp_path / name).write_bytes(b"x")
    assert [f.path.name for f in list_images(tmp_path)] == ["a.png", "b.JPG", "e.bmp", "c.tif"]
    assert list_images(tmp_path)[0].image_id == "a"
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


def _csv(tmp_path, text):
    path = tmp_path / "meta.csv"
    path.write_text(text)
    return path


def test_isic_cli_metadata_with_types(tmp_path):
    path = _csv(
        tmp_path,
        "isic_id,diagnosis_1,benign_malignant,patient_id,age_approx,sex,width\n"
        "ISIC_0000001,Benign,benign,IP_1,45,male,640\n"
        "ISIC_0000002,Malignant,malignant,IP_2,,female,480\n",
    )
    table = MetadataTable(path)
    assert table.id_column == "isic_id"
    assert "ISIC_0000002" in table and len(table) == 2
    rows = table.rows_for(["ISIC_0000002", "ISIC_9999999"])
    assert rows.column("age_approx").to_pylist() == [None, None]
    assert rows.column("diagnosis_1").to_pylist() == ["Malignant", None]
    assert "csv_width" in rows.column_names  # reserved name kept under a prefix
    assert str(table.schema.field("age_approx").type) in ("int64", "double")


def test_challenge_csv_detected(tmp_path):
    table = MetadataTable(_csv(tmp_path, "image_name,target\nISIC_1,0\nISIC_2,1\n"))
    assert table.id_column == "image_name"
    assert table.rows_for(["ISIC_2"]).column("target").to_pylist() == [1]


def test_metadata_errors(tmp_path):
    with pytest.raises(MetadataError, match="no column 'lesion'"):
        MetadataTable(_csv(tmp_path, "isic_id,x\nA,1\n"), id_column="lesion")
    with pytest.raises(MetadataError, match="no id column found"):
        MetadataTable(_csv(tmp_path, "name,x\nA,1\n"))
    with pytest.raises(MetadataError, match="duplicate ids"):
        MetadataTable(_csv(tmp_path, "isic_id,x\nA,1\nA,2\n"))
    with pytest.raises(MetadataError, match="not found"):
        MetadataTable(tmp_path / "missing.csv")
