"""Damage the store's own checks must catch: a row chunk whose bytes no longer match its
crc32c, a Parquet part whose bytes no longer match its sha256, and Parquet parts a crashed
writer left behind (which independent readers of ``metadata/*.parquet`` would count)."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from numcodecs import Zstd

from dermris.app.cli import main
from dermris.core.errors import StoreFormatError
from dermris.indexer.store import Store, StoreWriter, check_store
from dermris.indexer.store._zstd import decode_bounded, frame_content_size
from dermris.indexer.store.rows import index_problem
from dermris.retriever import CostModel, Retriever, SearchOptions

from array_store import shard_chunk

ROW = 17  # the damaged row (neither the first, middle nor last: only a full check reads it)


def _shard(path, array: str):
    """The first shard file of ``array`` and its rows per shard."""
    meta = json.loads((path / "arrays.zarr" / array / "zarr.json").read_text())
    shard_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    return path / "arrays.zarr" / array / "c" / "0" / "0", shard_rows


def _rewrite(file, offset: int, payload: bytes) -> None:
    data = bytearray(file.read_bytes())
    data[offset : offset + len(payload)] = payload
    file.write_bytes(bytes(data))


def _damage_style_row(path, row: int) -> None:
    """Change one byte of the row's payload, leaving its crc32c (and the shard index) as is."""
    file, shard_rows = _shard(path, "style")
    offset, nbytes = shard_chunk(file, shard_rows, row)
    payload = bytearray(file.read_bytes()[offset : offset + nbytes - 4])
    payload[len(payload) // 2] ^= 0x04  # a mantissa bit of a float16 value
    _rewrite(file, offset, bytes(payload))


def _damage_mask_row(path, row: int) -> None:
    """Change the row's zstd payload so that it still decompresses to a mask of the same size
    and the same lesion pixel count (only the crc32c can tell), leaving the crc32c stale."""
    file, shard_rows = _shard(path, "mask")
    offset, nbytes = shard_chunk(file, shard_rows, row)
    payload = file.read_bytes()[offset : offset + nbytes - 4]
    original = np.frombuffer(Zstd().decode(payload), np.uint8)
    for pos in range(len(payload) - 1, -1, -1):  # a raw block keeps the mask at the end
        byte = payload[pos]
        for bit in range(7):
            if ((byte >> bit) & 1) == ((byte >> (bit + 1)) & 1):
                continue
            candidate = bytearray(payload)
            candidate[pos] = byte ^ (0b11 << bit)  # swap two adjacent bits: same popcount
            try:
                decoded = np.frombuffer(Zstd().decode(bytes(candidate)), np.uint8)
            except Exception:
                continue
            if (
                len(decoded) == len(original)
                and not np.array_equal(decoded, original)
                and np.bitwise_count(decoded).sum() == np.bitwise_count(original).sum()
            ):
                _rewrite(file, offset, bytes(candidate))
                return
    raise AssertionError("no same-size, same-area corruption of the mask chunk found")


def test_damaged_style_row_chunk_is_detected(random_store):
    """Guards against a crc32c mismatch of a style row chunk being ignored by the shard reader
    (``ShardedRows._decode``): the shard index is intact, only the row's bytes changed."""
    path = random_store(n=30, seed=91, sketch_dim=4)
    _damage_style_row(path, ROW)
    store = Store.open(path)
    store.style_rows([ROW - 1, ROW + 1])  # the neighbours are sound
    with pytest.raises(StoreFormatError, match=f"row {ROW} fails its checksum"):
        store.style_rows([ROW])
    with pytest.raises(StoreFormatError, match="checksum"):
        next(store.iter_style_blocks())
    retriever = Retriever.open(path, device="cpu")
    with pytest.raises(StoreFormatError, match="checksum"):
        retriever.search(ROW, measures="style", k=3)  # the query's own style row
    scanning = Retriever.open(
        path, device="cpu", options=SearchOptions(cost_model=CostModel.always_scan())
    )
    with pytest.raises(StoreFormatError, match="checksum"):
        scanning.search(3, measures="style", k=3)  # a scan reads every row
    report = check_store(path, full=True)
    assert any("style" in p and f"row {ROW}" in p for p in report.problems), report.problems
    result = CliRunner().invoke(main, ["check", str(path), "--full"])
    assert result.exit_code == 1 and f"row {ROW} fails its checksum" in result.output


def test_damaged_mask_row_chunk_is_detected(random_store):
    """Guards against a crc32c mismatch of a mask row chunk being ignored: the damaged chunk
    still decompresses to a mask with the right lesion area, so only the checksum tells."""
    path = random_store(n=30, seed=92, sketch_dim=4, mask_density=0.3)
    _damage_mask_row(path, ROW)
    store = Store.open(path)
    store.mask_rows([ROW - 1, ROW + 1])  # the neighbours are sound
    with pytest.raises(StoreFormatError, match=f"row {ROW} fails its checksum"):
        store.mask_rows([ROW])
    with pytest.raises(StoreFormatError, match="checksum"):
        store.masks()
    with pytest.raises(StoreFormatError, match="checksum"):
        Retriever.open(path, device="cpu")  # masks kept in memory: all read at open
    on_disk = Retriever.open(path, device="cpu", options=SearchOptions(mask_memory_bytes=0))
    with pytest.raises(StoreFormatError, match="checksum"):
        on_disk.search(ROW, measures="i1_sd", k=3)  # the query's own mask
    report = check_store(path, full=True)
    assert any("mask" in p and f"row {ROW}" in p for p in report.problems), report.problems
    result = CliRunner().invoke(main, ["check", str(path), "--full"])
    assert result.exit_code == 1 and f"row {ROW} fails its checksum" in result.output


# -- Parquet parts -----------------------------------------------------------------------------
def _parts(path) -> list[str]:
    return [p.file for p in Store.open(path).manifest.metadata_parts]


def _tamper_part(path, part: str) -> None:
    """Rewrite a part with one image id changed: valid Parquet, another sha256."""
    file = path / "metadata" / part
    table = pq.read_table(file)
    ids = table.column("image_id").to_pylist()
    ids[1] = "TAMPERED"
    table = table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids))
    pq.write_table(table, file)


def test_tampered_parquet_part_is_detected(random_store):
    """Guards against a Parquet part's sha256 not being verified when metadata is read
    (``Store.metadata``): the part is still valid Parquet, only its sha256 differs."""
    labels = {"diagnosis": ["mel", "nev"] * 10}
    path = random_store(n=20, seed=93, commit_sizes=[8, 12], extra_columns=labels)
    opened = Retriever.open(path, device="cpu")
    part = _parts(path)[1]
    _tamper_part(path, part)
    with pytest.raises(StoreFormatError, match=f"{part} does not match its sha256"):
        Store.open(path).metadata()
    with pytest.raises(StoreFormatError, match="sha256"):
        Store.open(path).metadata(columns=["image_id"])
    with pytest.raises(StoreFormatError, match="sha256"):
        Retriever.open(path, device="cpu")
    with pytest.raises(StoreFormatError, match="sha256"):  # opened before: read for the filter
        opened.search(0, measures="style", k=3, where="diagnosis == 'mel'")
    report = check_store(path)
    assert any(part in p and "sha256" in p for p in report.problems), report.problems


def test_unlisted_parquet_part_is_removed_by_the_next_writer(random_store):
    """Guards against unlisted Parquet parts left by a crash not being removed when a writer
    opens the store (``remove_uncommitted_files``): readers of ``metadata/*.parquet`` would
    count rows that were never committed."""
    path = random_store(n=20, seed=94, commit_sizes=[8, 12])
    committed = pq.read_table(path / "metadata" / _parts(path)[1])
    # what a writer that crashed before its commit leaves: rows 20..31 as a real part
    stray = committed.set_column(
        committed.schema.get_field_index("row"),
        "row",
        pc.add(committed.column("row"), 12),
    )
    stray_file = path / "metadata" / "rows-000000000020-000000000032.parquet"
    pq.write_table(stray, stray_file)
    shutil.copy(stray_file, path / "metadata" / "rows-000000000032-000000000044.parquet")
    report = check_store(path)
    assert any("not listed in the manifest" in p and stray_file.name in p for p in report.problems)
    assert ds.dataset(path / "metadata", format="parquet").count_rows() == 44  # the hazard
    with StoreWriter.open(path):
        pass
    assert sorted(p.name for p in (path / "metadata").iterdir()) == sorted(_parts(path))
    assert check_store(path).ok
    table = ds.dataset(path / "metadata", format="parquet").to_table()
    assert sorted(table.column("row").to_pylist()) == list(range(20))
    assert sorted(table.column("image_id").to_pylist()) == sorted(
        Store.open(path).metadata().column("image_id").to_pylist()
    )
    assert pq.ParquetDataset(path / "metadata").read().num_rows == 20
    duckdb = pytest.importorskip("duckdb")
    sql = f"select count(*), count(distinct row) from read_parquet('{path}/metadata/*.parquet')"
    assert duckdb.connect().execute(sql).fetchone() == (20, 20)


# -- shard indexes -------------------------------------------------------------------------------
def _edit_index(file, shard_rows: int, edits: dict[int, tuple[int, int]]) -> None:
    """Set index entries ``{local_row: (offset, nbytes)}`` of a shard file and recompute the
    index's crc32c, so only the entries themselves are wrong."""
    data = bytearray(file.read_bytes())
    start = len(data) - 16 * shard_rows - 4
    index = np.frombuffer(bytes(data[start:-4]), "<u8").reshape(-1, 2).copy()
    for row, (offset, nbytes) in edits.items():
        index[row] = (offset, nbytes)
    raw = index.astype("<u8").tobytes()
    data[start:] = raw + google_crc32c.value(raw).to_bytes(4, "little")
    file.write_bytes(bytes(data))


def _data_end(file, shard_rows: int) -> int:
    return file.stat().st_size - 16 * shard_rows - 4


def _bad_entry(kind: str, file, shard_rows: int) -> tuple[dict[int, tuple[int, int]], str]:
    """The index edits of one kind of damage, and the message it must give."""
    offset, nbytes = shard_chunk(file, shard_rows, ROW)
    after, _ = shard_chunk(file, shard_rows, ROW + 1)
    if kind == "duplicate":  # row ROW reads row ROW + 1's chunk (its crc32c is valid)
        return {ROW: shard_chunk(file, shard_rows, ROW + 1)}, f"rows {ROW} and {ROW + 1} point"
    if kind == "overlap":  # row ROW's chunk runs into row ROW + 1's
        return {ROW: (offset, after - offset + 8)}, f"rows {ROW} and {ROW + 1} overlap"
    if kind == "outside":
        return {ROW: (_data_end(file, shard_rows) - 2, nbytes)}, f"row {ROW} .* points outside"
    assert kind == "wrap"  # offset + nbytes wraps around 2**64 to a small number
    return {ROW: (2**64 - 64, nbytes + 128)}, f"row {ROW} .* points outside"


@pytest.mark.parametrize("kind", ["duplicate", "overlap", "outside", "wrap"])
def test_damaged_style_shard_index_is_refused(random_store, kind):
    """Guards against a shard index whose entries point at another row's chunk, overlap, lie
    outside the file or wrap in uint64 (``rows.index_problem``): every chunk still passes its
    crc32c, so before the check rankings silently changed (duplicates), ``os.pread`` raised
    ``OverflowError`` (wraps) and ``dermris check --full`` said ok."""
    path = random_store(n=30, seed=95, sketch_dim=4)
    file, shard_rows = _shard(path, "style")
    edits, message = _bad_entry(kind, file, shard_rows)
    _edit_index(file, shard_rows, edits)
    with pytest.raises(StoreFormatError, match=f"shard c/0/0 is damaged .*{message}"):
        Store.open(path).style_rows([0])  # any row of the shard: the whole index is checked
    with pytest.raises(StoreFormatError, match=message):
        next(Store.open(path).iter_style_blocks())
    mapped = Store.open(path).mapped_style()
    assert mapped is not None
    with pytest.raises(StoreFormatError, match=message):
        mapped.shard(0)
    scanning = Retriever.open(
        path, device="cpu", options=SearchOptions(cost_model=CostModel.always_scan())
    )
    with pytest.raises(StoreFormatError, match=message):
        scanning.search(3, measures="style", k=3)
    report = check_store(path, full=True)
    assert any(p.startswith("style:") and "shard c/0/0" in p for p in report.problems), report
    result = CliRunner().invoke(main, ["check", str(path), "--full"])
    assert result.exit_code == 1 and "is damaged" in result.output
    assert "Traceback" not in result.output and "OverflowError" not in result.output


@pytest.mark.parametrize("kind", ["duplicate", "wrap"])
def test_damaged_mask_shard_index_is_refused(random_store, kind):
    """Guards against the same index damage in the mask array's shards (read by bytes)."""
    path = random_store(n=30, seed=96, sketch_dim=4, mask_density=0.3)
    file, shard_rows = _shard(path, "mask")
    edits, message = _bad_entry(kind, file, shard_rows)
    _edit_index(file, shard_rows, edits)
    with pytest.raises(StoreFormatError, match=message):
        Store.open(path).mask_rows([0])
    report = check_store(path, full=True)
    assert any("shard c/0/0 is damaged" in p for p in report.problems), report.problems


def test_index_problem_accepts_sound_indexes():
    """The check refuses nothing zarr writes: adjacent chunks, gaps, unwritten entries."""
    empty = 2**64 - 1
    sound = np.array([[0, 10], [10, 10], [empty, empty], [40, 8]], "<u8")
    assert index_problem(sound, 48) is None
    assert index_problem(np.full((3, 2), empty, "<u8"), 0) is None
    assert "row 3" in index_problem(sound, 47, first_row=0)
    half = sound.copy()
    half[2, 1] = 5
    assert "marks no chunk" in index_problem(half, 48)


# -- bounded decompression -----------------------------------------------------------------------
def _zero_bomb(size: int) -> bytes:
    """A valid zstd frame of ``size`` zero bytes made of RLE blocks (4 bytes per 128 KiB):
    1 GiB in 32 KiB, built by hand so the test never holds the 1 GiB itself."""
    block = 128 << 10
    assert size % block == 0
    header = (0xFD2FB528).to_bytes(4, "little") + bytes([0xC0, 0x38]) + size.to_bytes(8, "little")
    blocks = []
    for i in range(size // block):
        last = int(i == size // block - 1)
        blocks.append(((block << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\x00")
    return header + b"".join(blocks)


def _chunk(payload: bytes) -> bytes:
    return payload + google_crc32c.value(payload).to_bytes(4, "little")


def test_zero_bomb_is_a_real_zstd_frame():
    """The bomb of the tests below is what it claims to be (checked at 4 MiB)."""
    assert np.count_nonzero(np.frombuffer(Zstd().decode(_zero_bomb(4 << 20)), np.uint8)) == 0
    assert len(Zstd().decode(_zero_bomb(4 << 20))) == 4 << 20
    assert len(_zero_bomb(1 << 30)) == 32 * 1024 + 14


def test_mask_chunk_zstd_bomb_is_refused_before_allocating(random_store):
    """Guards against a mask chunk with a valid crc32c whose zstd frame inflates to 1 GiB being
    decompressed before its size is checked (``ShardedRows._decode`` via
    ``_zstd.decode_bounded``): refused from the frame header, with no large allocation."""
    path = random_store(n=30, seed=97, sketch_dim=4, mask_density=0.3)
    file, shard_rows = _shard(path, "mask")
    bomb = _chunk(_zero_bomb(1 << 30))
    end = _data_end(file, shard_rows)
    data = file.read_bytes()
    file.write_bytes(data[:end] + bomb + data[end:])  # chunks, the bomb, then the index
    _edit_index(file, shard_rows, {ROW: (end, len(bomb))})
    store = Store.open(path)
    tracemalloc.start()
    try:
        with pytest.raises(
            StoreFormatError,
            match=f"row {ROW} cannot be decompressed .*1073741824",
        ):
            store.mask_rows([ROW])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated"
    report = check_store(path, full=True)
    assert any(f"row {ROW} cannot be decompressed" in p for p in report.problems), report


def test_mask_area_zstd_bomb_is_refused_before_zarr_decompresses_it(random_store):
    """Guards against the arrays read through zarr (``mask_area``, ``mask_blocks``): zarr
    allocates what a chunk's zstd frame states, so the frame headers are checked first
    (``Store._bounded``)."""
    path = random_store(n=30, seed=98, sketch_dim=4)
    for name in ("mask_area", "mask_blocks"):
        key = "c/0" if name == "mask_area" else "c/0/0"
        (path / "arrays.zarr" / name / key).write_bytes(_chunk(_zero_bomb(1 << 30)))
    store = Store.open(path)
    tracemalloc.start()
    try:
        with pytest.raises(StoreFormatError, match="mask_area is damaged: chunk c/0: .*1073741824"):
            store.mask_areas()
        with pytest.raises(StoreFormatError, match="mask_blocks is damaged: .*1073741824"):
            store.mask_blocks()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated"
    report = check_store(path)
    assert any("mask_area is damaged" in p for p in report.problems), report.problems


def test_decode_bounded_refuses_frames_that_lie_about_their_size():
    """A frame whose header states the expected size but holds more fails inside a buffer of
    the expected size; a frame that states no size, or a non-zstd payload, is refused."""
    frame = bytearray(Zstd(level=3).encode(np.arange(600, dtype=np.uint16).astype(np.uint8)))
    assert frame_content_size(frame) == 600
    assert decode_bounded(bytes(frame), 600).tobytes() == bytes(
        np.arange(600, dtype=np.uint16).astype(np.uint8)
    )
    with pytest.raises(ValueError, match="600 bytes, the chunk has 512"):
        decode_bounded(bytes(frame), 512)
    lying = bytearray(frame)
    assert lying[4] == 0x60  # single segment, two-byte content size (value + 256)
    lying[5:7] = (512 - 256).to_bytes(2, "little")
    with pytest.raises(ValueError, match="zstd"):
        decode_bounded(bytes(lying), 512)
    unsized = bytearray(frame)
    unsized[4] = 0x00  # no content size, a window descriptor instead
    with pytest.raises(ValueError):
        decode_bounded(bytes(unsized), 600)
    with pytest.raises(ValueError, match="not a zstd frame"):
        decode_bounded(b"\x00" * 32, 32)


def test_appending_to_a_store_with_a_mask_area_bomb_is_refused(random_store):
    """Guards against the writer letting zarr decompress the chunk that new rows share with
    older ones (``mask_area``: 65,536 rows per chunk) without bounding it first."""
    path = random_store(n=30, seed=99, sketch_dim=None)
    (path / "arrays.zarr" / "mask_area" / "c" / "0").write_bytes(_chunk(_zero_bomb(1 << 30)))
    rng = np.random.default_rng(0)
    with StoreWriter.open(path) as writer:
        reader = writer.reader()
        tracemalloc.start()
        try:
            with pytest.raises(StoreFormatError, match="mask_area is damaged: .*1073741824"):
                writer.append(
                    features=rng.normal(size=(2, reader.feature_dim)).astype(np.float32),
                    style=rng.normal(size=(2, reader.style_dim)).astype(np.float32),
                    masks=np.zeros((2, reader.mask_size, reader.mask_size), bool),
                    records=Store.open(path).metadata().slice(0, 2).drop_columns(["row"]),
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 64 << 20, f"{peak} bytes allocated"
