"""The fast paths under the exact search: float16 decoding, tight scans, mapped rows, memory.

Each is held against a slow, obvious computation: NumPy's own float16 conversion, float64
products with ``math.fsum``-grade accuracy, reads by bytes through the shard reader.
"""

from __future__ import annotations

import numpy as np
import pytest

from dermris.core import StyleLayout
from dermris.indexer.store import Store, StyleCodec
from dermris.retriever import CostModel, Retriever, SearchOptions
from dermris.retriever.scan import QueryWeights, dot_error, style_dots

from reference import NAMES, brute_force, load_store, row_query


def test_every_float16_value_decodes_bit_for_bit():
    """The bit reinterpretation equals NumPy's float16 -> float32 conversion for all 63,488
    finite float16 values (normal, subnormal, both zeros), through the codec's scales too."""
    values = np.arange(65536, dtype=np.uint16).view(np.float16)
    values = values[np.isfinite(values)]
    channels = 356  # 356 * 357 / 2 = 63,546 columns: every value fits in one row
    layout = StyleLayout.from_channels((channels,))
    row = np.zeros(layout.dim, np.float16)
    row[: len(values)] = values
    for scale in (1.0, 2.0**-7, 2.0**9):
        codec = StyleCodec(layout, (scale,), "float16")
        got = codec.decode(row[None, :])[0]
        expected = row.astype(np.float32) / np.float32(scale)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("seed", range(3))
def test_scan_dots_are_within_their_error_bound(seed):
    """``x . z_q`` from the scan equals an exact (compensated, float64 pairwise of exact
    products) dot product within :func:`dot_error`, on stages of very different magnitudes,
    float16 subnormals included, in blocks of any stride."""
    rng = np.random.default_rng(seed)
    n, lengths = 150, [40, 300, 1000, 2500]
    d = sum(lengths)
    x = np.concatenate(
        [rng.normal(size=(n, m)) * 10.0 ** rng.uniform(-7, 3) for m in lengths], axis=1
    )
    scales = np.concatenate(
        [
            np.full(m, 2.0 ** int(np.floor(np.log2(64 / np.abs(x[:, o : o + m]).max()))))
            for o, m in zip(np.cumsum([0] + lengths[:-1]), lengths)
        ]
    )
    stored = np.clip(x * scales, -65504, 65504).astype(np.float16)
    decoded = stored.astype(np.float64) / scales  # exact: stored values over powers of two
    z = decoded[:3] - decoded.mean(axis=0) + rng.normal(size=(3, d)) * 1e-3
    weights = QueryWeights(z, scales)
    blocks = [(0, stored[:70]), (70, stored[70:])]
    got = style_dots(blocks, weights, n)
    exact = np.array([[np.sum(np.sort(decoded[i] * z[j])) for j in range(3)] for i in range(n)])
    bound = dot_error(np.linalg.norm(decoded, axis=1), weights)
    assert (np.abs(got - exact) <= bound).all()
    assert np.median(bound / np.abs(exact)) < 1e-9  # and the bound is tight


def test_mapped_rows_equal_reads_by_bytes(random_store):
    path = random_store(n=70, seed=5, channels=(20, 30), commit_sizes=[30, 40])
    store = Store.open(path)
    mapped = store.mapped_style()
    assert mapped is not None
    blocks = list(mapped.blocks())
    rows = np.concatenate([b for _, b in blocks])
    assert [f for f, _ in blocks][0] == 0 and len(rows) == 70
    np.testing.assert_array_equal(
        rows.view(np.uint16), store.stored_style_rows(np.arange(70)).view(np.uint16)
    )
    assert not any(b.flags.writeable for _, b in blocks) and not mapped.shard(0).flags.writeable


@pytest.mark.parametrize("budget", [None, 0])  # mapped shards; rows read from disk by bytes
def test_row_chunks_give_every_row_once_in_order(random_store, budget):
    from dermris.retriever.store_index import StyleAccess

    path = random_store(n=70, seed=6, channels=(20, 30), commit_sizes=[30, 40])
    store = Store.open(path)
    access = StyleAccess(store, 1 << 40 if budget is None else budget)
    assert access.in_memory == (budget is None)
    rows = np.array([69, 3, 4, 5, 40, 41, 0, 68])  # several shards, unsorted, adjacent runs
    chunks = list(access.row_chunks(rows, 3, read_rows=5))
    # mapped: chunks of 3; on disk: reads of 5 rows, each cut in chunks of 3
    expected = [0, 3, 6] if budget is None else [0, 3, 5]
    assert [at for at, _, _ in chunks] == expected
    got_rows = np.concatenate([part for _, part, _ in chunks])
    np.testing.assert_array_equal(got_rows, rows)
    values = np.concatenate([v() if callable(v) else v for _, _, v in chunks])
    assert all(callable(v) == (budget is None) for _, _, v in chunks)
    for at, part, _ in chunks:
        np.testing.assert_array_equal(got_rows[at : at + len(part)], part)
    np.testing.assert_array_equal(
        values.view(np.uint16), store.stored_style_rows(rows).view(np.uint16)
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"memory_budget_bytes": 0},  # rows read from disk by bytes, scans block by block
        {"memory_budget_bytes": 0, "cost_model": CostModel.always_scan()},
        {"cost_model": CostModel.always_scan()},
        {"cost_model": CostModel.never_scan(), "exact_dice_bytes": 0},
    ],
)
def test_every_access_path_equals_brute_force(random_store, options):
    path = random_store(n=80, seed=9, clusters=4, sketch_dim=6, duplicate_rows=5, empty_masks=3)
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**options))
    assert retriever._index.style.in_memory == (options.get("memory_budget_bytes") != 0)
    data = load_store(path)
    for row in (0, 41, 79):
        expected = brute_force(data, *row_query(data, row), exclude_row=row, k=6)
        got = retriever.search(row, measures="all", k=6)
        for name in NAMES:
            assert [h.row for h in got[name]] == [r for r, _ in expected[name]]
            np.testing.assert_allclose(
                [h.score for h in got[name]], [s for _, s in expected[name]], rtol=1e-9, atol=1e-12
            )


def test_measured_cost_model_and_memory_per_row(random_store):
    path = random_store(n=40, seed=2, channels=(10, 20))
    mapped = Retriever.open(path, device="cpu")
    assert mapped._index.style.in_memory and mapped._index.cost.request_seconds < 1e-3
    from_disk = Retriever.open(path, device="cpu", options=SearchOptions(memory_budget_bytes=0))
    cost = from_disk._index.cost
    assert cost.scan_bytes_per_second > 0 and cost.request_seconds >= 0
    index = mapped._index
    # per row: features (float32, once), masks, sketch projections (float32), a few scalars
    expected = index.features.shape[1] * 4 + index.mask_row_bytes + index.sketch_dim * 4
    assert expected <= index.row_nbytes() <= expected + 64
    assert mapped.resident_bytes == index.row_nbytes() * 40 + index.fixed_nbytes()
    from dermris.retriever import estimate_memory

    for opts in ({}, {"exact_dice_bytes": 0}, {"mask_memory_bytes": 0}):
        r = Retriever.open(path, device="cpu", options=SearchOptions(**opts))
        estimate = estimate_memory(r.store, SearchOptions(**opts))
        assert estimate["bytes_per_row"] == r._index.row_nbytes()
        assert estimate["fixed_bytes"] == r._index.fixed_nbytes()


def test_a_cheap_measure_alone_reads_no_style_row(random_store):
    path = random_store(n=60, seed=4, channels=(10, 20), sketch_dim=4)
    retriever = Retriever.open(path, device="cpu")
    result = retriever.search(3, measures="cosine", k=5)
    assert result.stats.style_rows_read == 0 and "bounds" not in result.stats.stage_seconds
    assert set(result["cosine"][0].components) == {"cs"}


@pytest.mark.parametrize("width", [13, 6272])
def test_mask_intersections_in_parallel_blocks_equal_unpacked_counts(width):
    """The popcount pass over every row (blocks of rows on every core, 64-bit words and a tail
    of bytes) equals the intersections counted on unpacked bits, across block boundaries."""
    from dermris.retriever.store_index import _MASK_BLOCK, _intersections

    rng = np.random.default_rng(width)
    n = 2 * _MASK_BLOCK + 37
    masks = rng.integers(0, 256, size=(n, width), dtype=np.uint8)
    masks[5] = 0
    masks[_MASK_BLOCK] = 255
    query = rng.integers(0, 256, size=width, dtype=np.uint8)
    expected = (np.unpackbits(masks, axis=1) & np.unpackbits(query)[None, :]).sum(axis=1)
    np.testing.assert_array_equal(_intersections(masks, query), expected)
