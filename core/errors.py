"""Every exception dermris raises on purpose: one hierarchy, one module.

All of them derive from :class:`DermrisError`; where an error refines a builtin, it also
subclasses that builtin (zarr-python's convention), so callers can catch
``FileNotFoundError`` or ``ValueError`` as they already do::

    from dermris.core.errors import DermrisError, StoreNotFoundError

The same classes are re-exported by :mod:`dermris.retriever` and :mod:`dermris.indexer`.
This module imports nothing heavy (no torch), so command-line parsing can use it.
"""

from __future__ import annotations

__all__ = [
    "DermrisError",
    "ConfigError",
    "WeightsError",
    "OptionalDependencyError",
    "ImageDecodeError",
    "PixelBudgetError",
    "DataError",
    "MetadataError",
    "StoreError",
    "StoreNotFoundError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreMismatchError",
    "StoreLockedError",
    "StoreReadOnlyError",
    "StoreChangedError",
    "ClusterError",
    "QueryError",
    "UnknownMeasureError",
    "ModelUnavailableError",
    "EvaluationError",
    "JudgeError",
]


class DermrisError(Exception):
    """Base class of every error raised by dermris on purpose."""


# -- models ------------------------------------------------------------------------------
class ConfigError(DermrisError, ValueError):
    """A model configuration or preset name is invalid."""


class WeightsError(DermrisError, ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


class OptionalDependencyError(DermrisError, ImportError):
    """An optional extra (for example ``dermris[lite0]``) is needed but not installed."""


class ImageDecodeError(DermrisError, ValueError):
    """A file is not a decodable image (corrupt, truncated, unsupported, too large)."""


class PixelBudgetError(ImageDecodeError):
    """An image has more pixels than the caller's budget (refused before its pixels are
    decoded)."""


class DataError(DermrisError, ValueError):
    """Images or a training set that cannot be used as asked (an empty folder, missing labels,
    unmatched masks, ...)."""


# -- indexer and store ---------------------------------------------------------------------
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


class StoreChangedError(StoreError, RuntimeError):
    """The store was compacted (rows renumbered) since it was opened: reopen it."""


class StoreReadOnlyError(StoreError, PermissionError):
    """A command that writes was asked of a store this process may not write to."""


class ClusterError(DermrisError, RuntimeError):
    """A Dask cluster that cannot be started or reached, or work that failed on it for good
    (a block that kept failing, a worker that cannot read the model or the images)."""


# -- retriever ---------------------------------------------------------------------------
class QueryError(DermrisError, ValueError):
    """A query, or a search argument, that cannot be answered as given."""


class UnknownMeasureError(DermrisError, ValueError):
    """A measure name that is not one of the nine measures."""


class ModelUnavailableError(DermrisError, RuntimeError):
    """The store carries no model, so image queries cannot be embedded."""


class EvaluationError(DermrisError, ValueError):
    """The evaluation cannot run as asked (unknown column, too few labelled rows, ...)."""


class JudgeError(DermrisError, ValueError):
    """A judgment session that cannot be prepared, served or scored."""
