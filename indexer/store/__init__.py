"""The store: a directory in format version 1, and the only code that reads or writes it.

::

    STORE/manifest.json        the commit point: typed and validated (:class:`Manifest`)
    STORE/model.safetensors    the model that made the store (weights + config)
    STORE/metadata/*.parquet   one row per image, in row order; parts listed in the manifest
    STORE/arrays.zarr          zarr v3: features, style, mask, mask_area, mask_blocks, sketch_<n>
    STORE/faiss/*.index        derived: IDMap2(Flat L2) and IDMap2(Flat IP on unit features)

Layers: :mod:`._format` (names and the manifest), :mod:`._files` (manifest I/O, the writer
lock, paths kept inside the store), :mod:`.reader` (:class:`Store`), :mod:`.writer`
(:class:`StoreWriter`), :mod:`.compaction`, :mod:`.derived` (FAISS, style sketch),
:mod:`.check`. Nothing outside this package reads manifest keys.
"""

from ._format import FORMAT_NAME, FORMAT_VERSION, Manifest
from .check import CheckReport, check_store
from .codec import StyleCodec
from .reader import Store, store_exists, unpack_masks
from .sketch import MASK_GRID, StyleSketch, mask_block_counts
from .writer import StoreWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MASK_GRID",
    "CheckReport",
    "Manifest",
    "Store",
    "StoreWriter",
    "StyleCodec",
    "StyleSketch",
    "check_store",
    "mask_block_counts",
    "store_exists",
    "unpack_masks",
]
