"""The classification ensemble, its Gram matrices, and the whole dermris model.

Per member (a timm EfficientNet): final feature map -> global average pool -> BatchNorm1d.
The members' pooled vectors are concatenated -> ``Linear(M * C_head -> 1024)`` -> SELU: the
feature vector (paper section 3.3). The Gram matrices of the 7 block stages of every member are
averaged over members and packed into the style vector (:mod:`models.gram`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import timm
import torch
from torch import nn

from dermris.core.errors import ConfigError
from dermris.core.style_layout import StyleLayout

from .gram import gram_matrix, pack_style
from .presets import ModelConfig
from .segmenters import Segmenter

__all__ = [
    "BackboneInfo",
    "backbone_info",
    "EnsembleFeatureExtractor",
    "ModelOutput",
    "DermrisModel",
    "calibrate_batchnorm",
]


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone looks like, read off timm (no hard-coded constants).

    Attributes
    ----------
    stage_channels : tuple of int
        Channels of the block stages used for Gram matrices.
    head_channels : int
        Channels of the final feature map (``num_features``).
    mean, std : tuple of float
        The backbone's input normalisation from timm's ``pretrained_cfg``.
    """

    stage_channels: tuple[int, ...]
    head_channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _create_backbone(name: str) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(f"timm does not know the backbone {name!r}: {exc}") from None


def _stage_outputs(backbone: nn.Module, x: torch.Tensor, stages: int):
    if not hasattr(backbone, "forward_intermediates"):
        raise ConfigError(f"backbone {type(backbone).__name__} has no forward_intermediates")
    try:  # a timm method, which nn.Module's type does not declare
        return cast(Any, backbone).forward_intermediates(x, indices=stages, extra_blocks=True)
    except TypeError:
        raise ConfigError(
            f"backbone {type(backbone).__name__} does not expose its block stages "
            "(forward_intermediates(extra_blocks=True)); use an EfficientNet-family model"
        ) from None


_RGB = tuple[float, float, float]  # timm's mean and std: one value per colour channel


@lru_cache(maxsize=32)
def backbone_info(name: str, stages: int = 7) -> BackboneInfo:
    """Introspect a timm backbone on the meta device (no weights, no compute).

    Parameters
    ----------
    name : str
        timm model name.
    stages : int
        Number of block stages wanted.

    Raises
    ------
    ConfigError
        If timm does not know the model or it has fewer block stages than asked.
    """
    with torch.device("meta"):
        backbone = _create_backbone(name)
        n_blocks = len(getattr(backbone, "blocks", []))
        if n_blocks < stages:
            raise ConfigError(f"backbone {name!r} has {n_blocks} block stages, {stages} requested")
        _, inter = _stage_outputs(backbone, torch.empty(1, 3, 64, 64), stages)
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    return BackboneInfo(
        stage_channels=tuple(int(t.shape[1]) for t in inter),
        head_channels=int(cast(Any, backbone).num_features),  # a timm attribute
        mean=cast(_RGB, tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))),
        std=cast(_RGB, tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))),
    )


class EnsembleFeatureExtractor(nn.Module):
    """``M`` backbones -> (1024-d feature, member-averaged Gram matrices per stage)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        info = backbone_info(config.backbone, config.style_stages)
        self.style_stages = config.style_stages
        self.members = nn.ModuleList(
            _create_backbone(config.backbone) for _ in range(config.members)
        )
        self.member_norms = nn.ModuleList(
            nn.BatchNorm1d(info.head_channels) for _ in range(config.members)
        )
        self.head = nn.Linear(config.members * info.head_channels, config.feature_dim)
        self.activation = nn.SELU()
        # LeCun-normal initialisation keeps SELU self-normalising.
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(self.head.in_features))
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = []
        gram_sums: list[torch.Tensor] | None = None
        for member, norm in zip(self.members, self.member_norms):
            final, stages = _stage_outputs(member, x, self.style_stages)
            with torch.autocast(
                device_type=x.device.type, enabled=False
            ):  # pooling and BN in float32
                pooled.append(norm(final.float().mean(dim=(2, 3))))
            grams = [gram_matrix(s) for s in stages]  # float32 whatever the backbone ran in
            gram_sums = grams if gram_sums is None else [a + b for a, b in zip(gram_sums, grams)]
        assert gram_sums is not None  # a model has at least one member
        with torch.autocast(device_type=x.device.type, enabled=False):  # the 1024-d head in float32
            features = self.activation(self.head(torch.cat(pooled, dim=1)))
        return features, [g / len(self.members) for g in gram_sums]


@dataclass
class ModelOutput:
    """What the model gives for a batch.

    Attributes
    ----------
    features : torch.Tensor
        ``(B, feature_dim)`` float32.
    style : torch.Tensor
        ``(B, D)`` float32 packed style vectors.
    mask_probability : torch.Tensor
        ``(B, S, S)`` float32 lesion probabilities.
    """

    features: torch.Tensor
    style: torch.Tensor
    mask_probability: torch.Tensor


class DermrisModel(nn.Module):
    """The full model: classification ensemble (features, style) + segmenter (mask).

    Parameters
    ----------
    config : ModelConfig
        Architecture; weights are random until loaded or calibrated
        (see :func:`models.build_model`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        info = backbone_info(config.backbone, config.style_stages)
        self.info = info
        self.style_layout = StyleLayout.from_channels(info.stage_channels, config.style_weights)
        self.extractor = EnsembleFeatureExtractor(config)
        self.segmenter = Segmenter(config.segmenter)
        self.trained_parts: frozenset[str] = frozenset()
        """Parts trained on labelled data (``"classifier"``, ``"segmenter"``): set by
        :mod:`dermris.models.training`, written to weights files and read back by
        :func:`~dermris.models.load_model`. A preset's parts are untrained."""

    @property
    def segmenter_trained(self) -> bool:
        """Whether the segmenter was trained (else its masks are noise)."""
        return "segmenter" in self.trained_parts

    @property
    def mean(self) -> tuple[float, float, float]:
        """Input normalisation mean (config override, else the backbone's)."""
        return self.config.mean or self.info.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Input normalisation std (config override, else the backbone's)."""
        return self.config.std or self.info.std

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Run on a normalised batch ``(B, 3, S, S)``."""
        features, grams = self.extractor(x)
        logits = self.segmenter(x)
        return ModelOutput(
            features=features.float(),
            style=pack_style(self.style_layout, grams),
            mask_probability=torch.sigmoid(logits.float())[:, 0],
        )


def _synthetic_batch(generator: torch.Generator, batch: int, size: int) -> torch.Tensor:
    """Seeded, data-independent images in [0, 1]: smooth colour fields plus fine noise."""
    coarse = torch.rand(batch, 3, 6, 6, generator=generator)
    smooth = nn.functional.interpolate(
        coarse, size=(size, size), mode="bicubic", align_corners=False
    )
    fine = torch.rand(batch, 3, size, size, generator=generator)
    mix = torch.rand(batch, 1, 1, 1, generator=generator)
    return (smooth * (1 - 0.5 * mix) + fine * 0.5 * mix).clamp(0, 1)


CALIBRATION_BATCHES = 4
"""Synthetic batches :func:`calibrate_batchnorm` runs by default."""


@torch.no_grad()
def calibrate_batchnorm(
    model: DermrisModel,
    *,
    include_backbones: bool,
    seed: int,
    batches: int = CALIBRATION_BATCHES,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Set BatchNorm running statistics from seeded synthetic images.

    A randomly initialised EfficientNet in eval mode (running mean 0, variance 1) has
    vanishing activations, so every image would look alike. Running the model in train mode
    on a fixed, seeded, data-independent set of images and keeping the cumulative batch
    statistics gives every layer unit-scale outputs, and so informative features.

    Parameters
    ----------
    model : DermrisModel
        Modified in place; left in eval mode.
    include_backbones : bool
        Also recalibrate the backbones' BatchNorms (False when they carry real weights).
    seed : int
        Seed of the synthetic images.
    batches, batch_size : int
        How many synthetic batches, of how many images.
    on_batch : callable, optional
        Called with the index of every batch done (progress).
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    norms = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if name.startswith("extractor.members.") and not include_backbones:
                continue
            norms.append(module)
    model.eval()
    saved = {}
    for module in norms:
        saved[module] = module.momentum
        module.reset_running_stats()
        module.momentum = None  # cumulative average over all calibration batches
        module.train()
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    for batch in range(batches):
        images = _synthetic_batch(generator, batch_size, model.config.image_size)
        model(((images - mean) / std).to(device))
        if on_batch is not None:
            on_batch(batch)
    for module, momentum in saved.items():
        module.momentum = momentum
    model.eval()
