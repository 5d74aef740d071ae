"""Errors of the indexer and the store (all under :class:`models.DermrisError`)."""

from __future__ import annotations

from models.errors import DermrisError, ImageDecodeError

__all__ = [
    "DermrisError",
    "ImageDecodeError",
    "MetadataError",
    "StoreError",
    "StoreNotFoundError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreMismatchError",
    "StoreLockedError",
]


class MetadataError(DermrisError, ValueError):
    """A metadata CSV is unreadable or does not fit the images (id column, duplicate ids)."""


class StoreError(DermrisError):
    """Base class of store problems."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """There is no store at the given path."""


class StoreExistsError(StoreError, FileExistsError):
    """A store already exists where a new one was to be created."""


class StoreFormatError(StoreError, ValueError):
    """The store is damaged, half-written, or of an unknown format version."""


class StoreMismatchError(StoreError, ValueError):
    """The store was built by another model configuration or weights than requested."""


class StoreLockedError(StoreError, BlockingIOError):
    """Another process is writing to the store."""
