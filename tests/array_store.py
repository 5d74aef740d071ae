"""Stores of hand-made arrays (chosen features, style rows and masks) for adversarial tests.

:func:`make_random_store` in ``conftest.py`` draws its arrays itself; the tests of the FAISS
certificates, of ties at the threshold and of the store's checksums need arrays built to
defeat one safeguard, written through the real :class:`~dermris.indexer.store.StoreWriter`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

__all__ = ["write_store", "shard_chunk"]


def write_store(
    path,
    *,
    features: np.ndarray,
    style: np.ndarray,
    masks: np.ndarray,
    channels=(2, 3),
    style_dtype: str = "float16",
    sketch_dim: int | None = 4,
    extra_columns: dict | None = None,
) -> Path:
    """Write one commit of the given rows (and a style sketch) into a new store at ``path``.

    Parameters
    ----------
    path : path-like
        Where the store is created.
    features : np.ndarray
        ``(N, F)`` float32 features.
    style : np.ndarray
        ``(N, D)`` style vectors, ``D`` the dimension of the layout of ``channels``.
    masks : np.ndarray
        ``(N, 32, 32)`` bool masks.
    channels : tuple of int
        Channels of the style stages.
    style_dtype : str
        ``"float16"`` or ``"float32"``.
    sketch_dim : int or None
        Dimension of the style sketch (None: no sketch).
    extra_columns : dict, optional
        Metadata columns (name to a list of N values).

    Returns
    -------
    Path
        The store.
    """
    from dermris.core import StyleLayout
    from dermris.indexer.store import StoreWriter
    from dermris.models import get_preset

    features = np.asarray(features, np.float32)
    n, feature_dim = features.shape
    layout = StyleLayout.from_channels(tuple(channels))
    config = get_preset("tiny").replace(feature_dim=feature_dim, image_size=32)
    writer = StoreWriter.create(
        path, model_config=config, style_layout=layout, style_dtype=style_dtype
    )
    records = pa.table(
        {
            "image_id": [f"IMG_{i:04d}" for i in range(n)],
            "path": [f"/nonexistent/{i}.jpg" for i in range(n)],
            "sha256": [f"{i:064x}" for i in range(n)],
            "width": pa.array([32] * n, pa.int32()),
            "height": pa.array([32] * n, pa.int32()),
        }
    )
    for name, values in (extra_columns or {}).items():
        records = records.append_column(name, pa.array(list(values)))
    writer.append(
        features=features,
        style=np.asarray(style, np.float32),
        masks=np.asarray(masks, bool),
        records=records,
    )
    if sketch_dim is not None:
        writer.update_sketch(dim=sketch_dim)
    writer.close()
    return Path(path)


def shard_chunk(shard_file: Path, shard_rows: int, local_row: int) -> tuple[int, int]:
    """``(offset, nbytes)`` of one row's chunk in a zarr v3 shard file.

    The shard ends with its index: ``shard_rows`` pairs of little-endian uint64
    ``(offset, nbytes)`` and the index's 4-byte crc32c. A chunk is its payload followed by the
    payload's crc32c.
    """
    data = shard_file.read_bytes()
    index = np.frombuffer(data[len(data) - 16 * shard_rows - 4 : -4], "<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in index[local_row])
    assert offset != 2**64 - 1, f"row {local_row} has no chunk in {shard_file}"
    return offset, nbytes
