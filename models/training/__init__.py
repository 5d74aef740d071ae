"""Training the paper's models: readers of ISIC and PH2 sets (:mod:`.data`), the seven
augmentations (:mod:`.augment`), focal and focal Tversky losses (:mod:`.losses`), and the
resumable training loops (:mod:`.train`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dermris.core._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": ".train",
    "SEGMENTER_TRAINING": ".train",
    "learning_rate": ".train",
    "train_classifier": ".train",
    "train_ensemble": ".train",
    "train_segmenter": ".train",
    "read_classification_set": ".data",
    "read_segmentation_set": ".data",
    "split_train_val": ".data",
    "binary_focal_loss": ".losses",
    "focal_tversky_loss": ".losses",
    "AUGMENTATIONS": ".augment",
    "augment": ".augment",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .augment import AUGMENTATIONS, augment
    from .data import read_classification_set, read_segmentation_set, split_train_val
    from .losses import binary_focal_loss, focal_tversky_loss
    from .train import (
        SEGMENTER_TRAINING,
        TrainConfig,
        learning_rate,
        train_classifier,
        train_ensemble,
        train_segmenter,
    )
