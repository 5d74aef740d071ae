"""The layout of a style vector: which columns hold which block stage's Gram matrix.

The paper's style loss (eq. 6) is ``LS(x, y) = sum_s w_s * ||G_s^x - G_s^y||_F^2`` over the
block stages ``s``. Because every Gram matrix is symmetric, packing
``v = concat_s sqrt(w_s) * triu(G_s)`` with the off-diagonal entries multiplied by ``sqrt(2)``
gives ``LS(x, y) == ||v_x - v_y||^2`` exactly, which turns style search into an L2 problem.
:class:`StyleLayout` says where each stage lives in ``v``; it is pure Python (no torch), so
the store and the retriever can use it. The packing itself runs with the model
(:func:`dermris.models.gram.pack_style`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["StyleLayout"]


@dataclass(frozen=True)
class StyleLayout:
    """Where each stage's packed upper triangle lives in the style vector.

    Parameters
    ----------
    channels : tuple of int
        ``C_s`` of every stage.
    weights : tuple of float
        ``w_s`` of every stage (the paper's beta squared).
    """

    channels: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.weights) or not self.channels:
            raise ConfigError("style layout needs one weight per stage and at least one stage")
        if any(c < 1 for c in self.channels) or any(not w > 0 for w in self.weights):
            raise ConfigError("style layout channels must be >= 1 and weights > 0")

    @classmethod
    def from_channels(
        cls, channels: Sequence[int], weights: Sequence[float] | None = None
    ) -> "StyleLayout":
        """Build a layout; ``weights=None`` gives the default ``w_s = 1 / C_s ** 2``."""
        channels = tuple(int(c) for c in channels)
        if weights is None:
            weights = tuple(1.0 / (c * c) for c in channels)
        return cls(channels, tuple(float(w) for w in weights))

    @property
    def lengths(self) -> tuple[int, ...]:
        """Packed length ``C_s (C_s + 1) / 2`` of each stage."""
        return tuple(c * (c + 1) // 2 for c in self.channels)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each stage in the style vector (plus the total length at the end)."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def dim(self) -> int:
        """Length ``D`` of the style vector."""
        return self.offsets[-1]

    def stage_index(self) -> np.ndarray:
        """Return, for each of the ``D`` columns, the stage it belongs to (int32)."""
        return np.repeat(np.arange(len(self.channels), dtype=np.int32), self.lengths)

    def to_dict(self) -> dict:
        """Return a JSON-ready dictionary."""
        return {"channels": list(self.channels), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, data: dict) -> "StyleLayout":
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(int(c) for c in data["channels"]), tuple(float(w) for w in data["weights"])
        )
