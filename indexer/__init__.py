"""dermris indexer: images -> store (FAISS + Zarr + Parquet).

Stages: :mod:`indexer.sources` (reader), :mod:`indexer.embed` (mapper), :mod:`indexer.store`
(writer and reader of the store format), tied together by :func:`index_folder`.
"""

from .embed import Embedder, Embeddings, preprocess, resolve_device
from .errors import (
    DermrisError,
    ImageDecodeError,
    MetadataError,
    StoreError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
)
from .pipeline import IndexReport, index_folder
from .sources import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    ImageFile,
    MetadataTable,
    Rejected,
    decode_image,
    decode_image_bytes,
    list_images,
    read_images,
    to_rgb,
)
from .store import FORMAT_VERSION, Store, StoreWriter, StyleCodec, build_faiss_indexes

__all__ = [
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "DermrisError",
    "Embedder",
    "Embeddings",
    "ImageDecodeError",
    "ImageFile",
    "IndexReport",
    "MetadataError",
    "MetadataTable",
    "Rejected",
    "Store",
    "StoreError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "StoreWriter",
    "StyleCodec",
    "build_faiss_indexes",
    "decode_image",
    "decode_image_bytes",
    "index_folder",
    "list_images",
    "preprocess",
    "read_images",
    "resolve_device",
    "to_rgb",
]
