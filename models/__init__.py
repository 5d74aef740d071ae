"""dermris models: the EfficientNet ensemble, Gram-matrix style vectors and lesion segmenters.

Networks only: what the store and the retriever share without torch (errors, the style
layout, image decoding, atomic writes) lives in :mod:`dermris.core`. The public surface is
re-exported here lazily (``import dermris.models`` does not import torch); the submodules
are implementation detail. Training lives in :mod:`dermris.models.training`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dermris.core._lazy import lazy_exports
from dermris.core.errors import (
    ConfigError,
    DermrisError,
    ImageDecodeError,
    OptionalDependencyError,
    WeightsError,
)

_EXPORTS = {
    "BackboneInfo": ".ensemble",
    "DermrisModel": ".ensemble",
    "ModelOutput": ".ensemble",
    "backbone_info": ".ensemble",
    "calibrate_batchnorm": ".ensemble",
    "gram_matrix": ".gram",
    "pack_style": ".gram",
    "style_loss_from_grams": ".gram",
    "PRESETS": ".presets",
    "ModelConfig": ".presets",
    "SegmenterConfig": ".presets",
    "get_preset": ".presets",
    "list_presets": ".presets",
    "Segmenter": ".segmenters",
    "build_model": ".weights",
    "load_backbone_state_dict": ".weights",
    "load_model": ".weights",
    "models_compute_alike": ".weights",
    "read_weights_config": ".weights",
    "save_model": ".weights",
}

__all__ = sorted(
    [
        *_EXPORTS,
        "ConfigError",
        "DermrisError",
        "ImageDecodeError",
        "OptionalDependencyError",
        "WeightsError",
    ]
)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .ensemble import (
        BackboneInfo,
        DermrisModel,
        ModelOutput,
        backbone_info,
        calibrate_batchnorm,
    )
    from .gram import gram_matrix, pack_style, style_loss_from_grams
    from .presets import PRESETS, ModelConfig, SegmenterConfig, get_preset, list_presets
    from .segmenters import Segmenter
    from .weights import (
        build_model,
        load_backbone_state_dict,
        load_model,
        models_compute_alike,
        read_weights_config,
        save_model,
    )
