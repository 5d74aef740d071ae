"""dermris models: the EfficientNet ensemble, Gram-matrix style vectors and lesion segmenters.

The public surface is re-exported here; the submodules are implementation detail.
"""

from .ensemble import BackboneInfo, DermrisModel, ModelOutput, backbone_info, calibrate_batchnorm
from .errors import ConfigError, DermrisError, OptionalDependencyError, WeightsError
from .gram import StyleLayout, gram_matrix, style_loss_from_grams
from .presets import PRESETS, ModelConfig, SegmenterConfig, get_preset, list_presets
from .segmenters import Segmenter
from .weights import (
    build_model,
    file_sha256,
    load_backbone_state_dict,
    load_model,
    read_weights_config,
    save_model,
)

__all__ = [
    "BackboneInfo",
    "ConfigError",
    "DermrisError",
    "DermrisModel",
    "ModelConfig",
    "ModelOutput",
    "OptionalDependencyError",
    "PRESETS",
    "SegmenterConfig",
    "Segmenter",
    "StyleLayout",
    "WeightsError",
    "backbone_info",
    "build_model",
    "calibrate_batchnorm",
    "file_sha256",
    "get_preset",
    "gram_matrix",
    "list_presets",
    "load_backbone_state_dict",
    "load_model",
    "read_weights_config",
    "save_model",
    "style_loss_from_grams",
]
