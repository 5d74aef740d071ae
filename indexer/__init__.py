"""dermris indexer: images -> store (FAISS + Zarr + Parquet).

Stages: :mod:`~dermris.indexer.sources` (the reader), :mod:`~dermris.indexer.embed` (the
mapper), :mod:`~dermris.indexer.store` (the writer, and the store format), tied together by
:func:`index_folder`. Names are imported lazily (``import dermris.indexer`` does not import
torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dermris.core._lazy import lazy_exports
from dermris.core.errors import (
    ClusterError,
    DermrisError,
    ImageDecodeError,
    MetadataError,
    StoreChangedError,
    StoreError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreReadOnlyError,
)

_EXPORTS = {
    "Embedder": ".embed",
    "Embeddings": ".embed",
    "preprocess": ".embed",
    "resolve_device": ".embed",
    "IndexReport": ".report",
    "index_folder": ".pipeline",
    "IMAGE_EXTENSIONS": ".sources",
    "ImageFile": ".sources",
    "LoadedImage": ".sources",
    "MetadataTable": ".sources",
    "decode_image": ".sources",
    "decode_image_bytes": ".sources",
    "list_images": ".sources",
    "load_image": ".sources",
    "to_pixels": ".sources",
    "to_rgb": ".sources",
    "ImageLoader": ".loader",
    "ClusterSpec": ".cluster",
    "parse_cluster": ".cluster",
    "FORMAT_VERSION": ".store",
    "CheckReport": ".store",
    "Manifest": ".store",
    "Store": ".store",
    "StoreWriter": ".store",
    "StyleCodec": ".store",
    "check_store": ".store",
    "store_exists": ".store",
}

__all__ = sorted(
    [
        *_EXPORTS,
        "ClusterError",
        "DermrisError",
        "ImageDecodeError",
        "MetadataError",
        "StoreChangedError",
        "StoreError",
        "StoreExistsError",
        "StoreFormatError",
        "StoreLockedError",
        "StoreMismatchError",
        "StoreNotFoundError",
        "StoreReadOnlyError",
    ]
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import ClusterSpec, parse_cluster
    from .embed import Embedder, Embeddings, preprocess, resolve_device
    from .loader import ImageLoader
    from .pipeline import index_folder
    from .report import IndexReport
    from .sources import (
        IMAGE_EXTENSIONS,
        ImageFile,
        LoadedImage,
        MetadataTable,
        decode_image,
        decode_image_bytes,
        list_images,
        load_image,
        to_pixels,
        to_rgb,
    )
    from .store import (
        FORMAT_VERSION,
        CheckReport,
        Manifest,
        Store,
        StoreWriter,
        StyleCodec,
        check_store,
        store_exists,
    )
