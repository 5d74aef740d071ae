"""Damage the store's own checks must catch: a row chunk whose bytes no longer match its
crc32c, a Parquet part whose bytes no longer match its sha256, and Parquet parts a crashed
writer left behind (which independent readers of ``metadata/*.parquet`` would count)."""

from __future__ import annotations

import json
import shutil

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
