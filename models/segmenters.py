"""Lesion segmenters: U-Net, RU-Net and R2U-Net.

U-Net follows Ronneberger et al. (2015); RU-Net and R2U-Net follow Alom et al. (2018):
every encoder/decoder block is two recurrent convolutional layers (RCL, ``t`` recurrent
steps each), and R2U-Net adds a residual connection around them. The network returns one
logit per pixel; ``sigmoid(logit) > threshold`` is the lesion mask.
"""

from __future__ import annotations

import torch
from torch import nn

from .presets import SegmenterConfig

__all__ = ["Segmenter", "build_segmenter"]


class _ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class _RecurrentConv(nn.Module):
    """Alom's recurrent convolutional layer: ``h_0 = f(x)``, ``h_{i+1} = f(x + h_i)``."""

    def __init__(self, channels: int, steps: int) -> None:
        super().__init__()
        self.conv = _ConvBNReLU(channels, channels)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        for _ in range(self.steps):
            h = self.conv(x + h)
        return h


class _Block(nn.Module):
    """One encoder or decoder block of the chosen architecture."""

    def __init__(self, arch: str, in_ch: int, out_ch: int, steps: int) -> None:
        super().__init__()
        self.residual = arch == "r2unet"
        self.entry: nn.Module
        if arch == "unet":
            self.entry = nn.Identity()
            self.body = nn.Sequential(_ConvBNReLU(in_ch, out_ch), _ConvBNReLU(out_ch, out_ch))
        else:
            self.entry = nn.Conv2d(in_ch, out_ch, 1)
            self.body = nn.Sequential(_RecurrentConv(out_ch, steps), _RecurrentConv(out_ch, steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        y = self.body(x)
        return x + y if self.residual else y


class Segmenter(nn.Module):
    """U-shaped encoder-decoder returning per-pixel lesion logits ``(B, 1, H, W)``.

    Parameters
    ----------
    config : SegmenterConfig
        Architecture, width, depth and recurrence.
    in_channels : int
        Input channels (3 for RGB).
    """

    def __init__(self, config: SegmenterConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.encoder = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.encoder.append(_Block(config.arch, prev, w, config.recurrence))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(prev, w, 2, stride=2))
            self.decoder.append(_Block(config.arch, 2 * w, w, config.recurrence))
            prev = w
        self.head = nn.Conv2d(prev, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def build_segmenter(config: SegmenterConfig) -> Segmenter:
    """Return a randomly initialised segmenter for ``config``."""
    return Segmenter(config)
