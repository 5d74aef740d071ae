"""The package-wide exception hierarchy.

Every error dermris raises on purpose derives from :class:`DermrisError`; where an error
refines a builtin, it also subclasses that builtin (zarr-python's convention), so callers can
catch ``FileNotFoundError`` or ``ValueError`` as they already do.
"""

from __future__ import annotations

__all__ = [
    "DermrisError",
    "ConfigError",
    "WeightsError",
    "OptionalDependencyError",
    "ImageDecodeError",
]


class DermrisError(Exception):
    """Base class of every error raised by dermris on purpose."""


class ConfigError(DermrisError, ValueError):
    """A model configuration or preset name is invalid."""


class WeightsError(DermrisError, ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


class OptionalDependencyError(DermrisError, ImportError):
    """An optional extra (for example ``dermris[lite0]``) is needed but not installed."""


class ImageDecodeError(DermrisError, ValueError):
    """A file is not a decodable image (corrupt, truncated, unsupported, too large)."""
