"""The store: a directory in format version 1, and the only code that reads or writes it.

::

    STORE/manifest.json        the commit point: typed and validated (:class:`Manifest`)
    STORE/model.safetensors    the model that made the store (weights + config)
    STORE/metadata/*.parquet   one row per image, in row order; parts listed in the manifest
    STORE/arrays.zarr          zarr v3: features, style, mask, mask_area, mask_blocks, sketch_<n>
    STORE/faiss/*.index        derived, only when asked: IDMap2(Flat L2) and IDMap2(Flat IP on unit
                               features), one part per run that added rows

Layers: :mod:`._format` (names and the manifest), :mod:`.schema` (the core row columns),
:mod:`._files` (manifest I/O, the writer lock, paths kept inside the store), :mod:`.rows`
(row reads by bytes), :mod:`.reader` (:class:`Store`), :mod:`.derived` (FAISS parts, style
sketch), :mod:`.recovery` (what a writer finishes or clears first), :mod:`.writer`
(:class:`StoreWriter`), :mod:`.compaction` (uses a writer), :mod:`.check`. Nothing outside
this package reads manifest keys, and nothing here imports torch.
"""

from ._format import FORMAT_NAME, FORMAT_VERSION, Manifest
from .check import CheckReport, check_store
from .codec import StyleCodec
from .compaction import compact
from .derived import load_faiss_index
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
    "compact",
    "load_faiss_index",
    "mask_block_counts",
    "store_exists",
    "unpack_masks",
]
