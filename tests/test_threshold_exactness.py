"""The threshold loop at its edges: ties at the k-th score across the bound boundary, and the
normaliser ``LS_max`` over live rows only.

The tie store is built so that the row that must win a tie is reached only by visiting rows
whose upper bound *equals* the k-th score. Rows are exact duplicates of the query's style
vector and feature (SS = ES = 1), so their scores are set by Dice, which is bounded from the
block counts of the masks (2 x 2 pixel cells): the query's mask covers the even columns of the
left half (2 pixels of every cell there). Then

* row 1 (the tie winner) has a mask inside the query's: its Dice bound is exact, 0.4;
* row 2 has the same Dice 0.4 (70 of its 94 pixels in the query's mask), but its 24 other
  pixels lie in cells the query covers: its bound is loose (0.537), so it is visited first;
* rows 3..34 ("fillers", 32 rows) have a loose bound (0.439) and a low Dice (0.049);
* rows 35..37 are far away with empty masks (they set ``ED_max`` and ``LS_max``; score 0).

With k = 1 the first batch of rows (32, by bound) sets the k-th score to 0.4 through row 2;
brute force returns row 1 (the tie by row). Excluding one filler leaves exactly 32 rows bounded
above 0.4, so that the next row in bound order is row 1, bounded by exactly 0.4; with all 33,
one filler is still bounded above 0.4 and is in contention together with row 1 (a scan then
visits exactly the rows in contention).
"""

from __future__ import annotations

import numpy as np
import pytest

from dermris.indexer.store import StoreWriter
from dermris.retriever import CostModel, QueryVectors, Retriever, SearchOptions

from array_store import write_store
from reference import NAMES, brute_force, load_store, row_query

TIE_PATHS = {
    "default": {"exact_dice_bytes": 0},
    "scan": {"exact_dice_bytes": 0, "cost_model": CostModel.always_scan()},
    "bounds": {"exact_dice_bytes": 0, "cost_model": CostModel.never_scan()},
    "bounds-disk": {"cost_model": CostModel.never_scan(), "mask_memory_bytes": 0},
    "bounds-disk-reads": {
        "exact_dice_bytes": 0,
        "cost_model": CostModel.never_scan(),
        "memory_budget_bytes": 0,
    },
    "exact-dice": {},
}
FILLERS = range(3, 35)
FAR = range(35, 38)
N = 38


def _tie_masks() -> np.ndarray:
    grid = np.zeros((N, 32, 32), bool)
    query = np.zeros((32, 32), bool)
    query[:, 0:16:2] = True  # 256 pixels, 2 in every cell of the left half
    grid[0] = query
    grid[1, 0:8, 0:16:2] = True  # 64 pixels, all in the query's mask: Dice 128 / 320
    grid[2, 8:16, 0:16:2] = True  # 64 + 6 pixels in the query's mask ...
    grid[2, 16, 0:12:2] = True
    grid[2, 24:27, 1:16:2] = True  # ... and 24 beside it, in cells the query covers
    for row in FILLERS:
        grid[row, 30, 0:16:2] = True  # 8 pixels in the query's mask
        grid[row, 0:8, 1:16:2] = True  # 64 beside it, in cells the query covers
    return grid  # the far rows: empty


def _tie_store(path):
    rng = np.random.default_rng(0)
    features = np.repeat(rng.normal(size=(1, 6)), N, axis=0)
    style = np.repeat(rng.normal(size=(1, 9)), N, axis=0)
    far = np.asarray(FAR)
    features[far] += rng.normal(size=(len(far), 6)) * 5
    style[far] += rng.normal(size=(len(far), 9)) * 5
    return write_store(path, features=features, style=style, masks=_tie_masks(), sketch_dim=2)


def _assert_same(hits, expected):
    assert [h.row for h in hits] == [r for r, _ in expected]
    np.testing.assert_allclose(
        [h.score for h in hits], [s for _, s in expected], rtol=1e-9, atol=1e-12
    )


def test_tie_store_is_as_described(tmp_path):
    """The premise of the tie tests: rows 1 and 2 tie at the best score (brute force)."""
    data = load_store(_tie_store(tmp_path / "ties"))
    expected = brute_force(data, *row_query(data, 0), exclude_row=0, k=3)
    for name in ("i1_sd", "i1_ed"):
        (r1, s1), (r2, s2), (_, s3) = expected[name]
        assert (r1, r2) == (1, 2) and s1 == s2 > s3


@pytest.mark.parametrize("path_name", TIE_PATHS)
@pytest.mark.parametrize("exclude", [(), (FILLERS[-1],)], ids=["33-above", "32-above"])
def test_ties_at_the_kth_score_are_visited(tmp_path, path_name, exclude):
    """Guards against the threshold loop skipping rows whose bound equals the k-th score
    (``if head <= kth: break`` for ``head < kth``, or the contention / chunk filters
    ``upper > kth`` for ``upper >= kth``): row 1, bounded by exactly its own score, must win
    the tie with row 2 by row, as in brute force."""
    path = _tie_store(tmp_path / "ties")
    data = load_store(path)
    retriever = Retriever.open(path, device="cpu", options=SearchOptions(**TIE_PATHS[path_name]))
    allowed = set(range(data["n"])) - set(exclude)
    for k in (1, 2, 5):
        expected = brute_force(data, *row_query(data, 0), exclude_row=0, k=k, allowed=allowed)
        got = retriever.search(0, measures="all", k=k, exclude=exclude)
        for name in NAMES:
            _assert_same(got[name], expected[name])
        for name in ("i1_sd", "i1_ed", "i1_ecd"):  # one measure alone: nothing read before
            alone = retriever.search(0, measures=name, k=k, exclude=exclude)
            _assert_same(alone[name], expected[name])


def test_ties_at_the_kth_score_free_query(tmp_path):
    """The same ties for a query given as vectors (the tie bugs): nothing is excluded for being
    the query, so its twin row 0 is excluded explicitly, with and without one filler."""
    path = _tie_store(tmp_path / "ties")
    data = load_store(path)
    feature, style, mask = row_query(data, 0)
    query = QueryVectors(
        feature=np.asarray(feature, np.float32),
        style=np.asarray(style, np.float32),
        mask=np.packbits(mask),
        mask_area=int(mask.sum()),
    )
    for options in (TIE_PATHS["bounds"], TIE_PATHS["scan"]):
        retriever = Retriever.open(path, device="cpu", options=SearchOptions(**options))
        for exclude in ((0,), (0, FILLERS[-1])):
            allowed = set(range(data["n"])) - set(exclude)
            expected = brute_force(data, feature, style, mask, k=1, allowed=allowed)
            got = retriever.search(query, measures=("i1_sd", "i1_ed"), k=1, exclude=exclude)
            for name in ("i1_sd", "i1_ed"):
                _assert_same(got[name], expected[name])


# -- LS_max over live rows ------------------------------------------------------------------
PATHS = {
    "default": {},
    "scan": {"cost_model": CostModel.always_scan()},
    "bounds": {
        "cost_model": CostModel.never_scan(),
        "mask_memory_bytes": 0,
        "memory_budget_bytes": 0,
    },
}


def _farthest_in_style(data, row: int) -> int:
    losses = ((data["style"] - data["style"][row]) ** 2).sum(axis=1)
    return int(np.argmax(losses))


@pytest.mark.parametrize("path_name", PATHS)
def test_deleted_farthest_row_leaves_ls_max(random_store, path_name):
    """Guards against deleted rows still counted in ``LS_max``: the row farthest in style from
    the query is deleted, so every style score must be normalised by the largest loss over the
    live rows (brute force over the live rows), in a retriever opened before the deletion and
    in one opened after it."""
    path = random_store(n=30, seed=21, clusters=2, sketch_dim=4, duplicate_rows=3)
    before = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    data = load_store(path)
    victim = _farthest_in_style(data, 0)
    with StoreWriter.open(path) as writer:
        rows, unknown = writer.delete([data["image_ids"][victim]])
    assert rows == [victim] and not unknown
    data = load_store(path)
    assert data["deleted"] == {victim}
    after = Retriever.open(path, device="cpu", options=SearchOptions(**PATHS[path_name]))
    live_losses = [
        ((data["style"][r] - data["style"][0]) ** 2).sum() for r in range(30) if r != victim
    ]
    full_losses = ((data["style"] - data["style"][0]) ** 2).sum(axis=1)
    assert max(live_losses) < 0.999 * full_losses.max()  # the deletion changes LS_max
    for retriever in (before, after):
        for k in (3, 30):
            expected = brute_force(data, *row_query(data, 0), exclude_row=0, k=k)
            got = retriever.search(0, measures="all", k=k)
            for name in NAMES:
                _assert_same(got[name], expected[name])
                assert victim not in [h.row for h in got[name]]
        for row in (5, 17, 29):
            if row == victim:
                continue
            expected = brute_force(data, *row_query(data, row), exclude_row=row, k=4)
            got = retriever.search(row, measures=("style", "i1_se", "i1_sd"), k=4)
            for name in ("style", "i1_se", "i1_sd"):
                _assert_same(got[name], expected[name])
