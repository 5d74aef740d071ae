"""dermris models: the EfficientNet ensemble, Gram-matrix style vectors and lesion segmenters.

The public surface is re-exported here (imported lazily: ``import dermris.models`` does not
import torch); the submodules are implementation detail. Training lives in
:mod:`dermris.models.training`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from .errors import (
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
    "StyleLayout": ".gram",
    "gram_matrix": ".gram",
    "style_loss_from_grams": ".gram",
    "PRESETS": ".presets",
    "ModelConfig": ".presets",
    "SegmenterConfig": ".presets",
    "get_preset": ".presets",
    "list_presets": ".presets",
    "Segmenter": ".segmenters",
    "build_model": ".weights",
    "file_sha256": ".weights",
    "load_backbone_state_dict": ".weights",
    "load_model": ".weights",
    "models_compute_alike": ".weights",
    "read_weights_config": ".weights",
    "save_model": ".weights",
    "decode_image": ".imageio",
    "decode_image_bytes": ".imageio",
    "to_rgb": ".imageio",
    "atomic_path": ".atomic",
    "atomic_write": ".atomic",
    "atomic_write_bytes": ".atomic",
    "fsync_dir": ".atomic",
}

__all__ = sorted([*_EXPORTS, "ConfigError", "DermrisError", "ImageDecodeError", "OptionalDependencyError",
                  "WeightsError"])

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .atomic import atomic_path, atomic_write, atomic_write_bytes, fsync_dir
    from .ensemble import BackboneInfo, DermrisModel, ModelOutput, backbone_info, calibrate_batchnorm
    from .gram import StyleLayout, gram_matrix, style_loss_from_grams
    from .imageio import decode_image, decode_image_bytes, to_rgb
    from .presets import PRESETS, ModelConfig, SegmenterConfig, get_preset, list_presets
    from .segmenters import Segmenter
    from .weights import (
        build_model,
        file_sha256,
        load_backbone_state_dict,
        load_model,
        models_compute_alike,
        read_weights_config,
        save_model,
    )
