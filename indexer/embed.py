"""The mapper stage: model-ready pixels -> (feature, style vector, lesion mask), in batches.

Indexed images and query images go through exactly this code (:func:`to_pixels`, then
:meth:`Embedder.embed_pixels`), so a query with an indexed image reproduces the stored row.

On CUDA the backbones and the segmenter may run in reduced precision (``precision``);
the Gram matrices, the style vector and the feature head are always computed in float32
(:mod:`dermris.models.gram`, :mod:`dermris.models.ensemble`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dermris.core.errors import ConfigError
from dermris.core.imageio import to_pixels
from dermris.models import DermrisModel

__all__ = [
    "PRECISIONS",
    "resolve_device",
    "resolve_precision",
    "preprocess",
    "Embeddings",
    "Embedder",
]

PRECISIONS = ("auto", "float32", "tf32", "bfloat16", "float16")
"""Inference precisions. ``float32`` is IEEE float32 throughout (no TF32); ``tf32`` lets CUDA
convolutions and matrix products use TF32 tensor cores; ``bfloat16`` / ``float16`` run the
backbones and the segmenter under autocast. ``auto`` is :data:`CUDA_DEFAULT_PRECISION` on
CUDA and float32 on the CPU."""

CUDA_DEFAULT_PRECISION = "float32"
"""The CUDA default: the only precision measured to keep the top 10 of every measure against
float32 on the paper preset (bfloat16 kept 0.71 to 0.97 of them on an H200, float16 overflowed
to NaN; README, ``benchmarks/results/index-cuda.json``)."""

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto"`` to CUDA when available, else CPU; validate explicit names."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available here")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run at.

    ``auto`` -> float32 on CPU, :data:`CUDA_DEFAULT_PRECISION` on CUDA.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        return CUDA_DEFAULT_PRECISION if device.type == "cuda" else "float32"
    return precision


def preprocess(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize the whole image (no crop) to ``size x size`` and normalise; ``(3, S, S)`` float32."""
    pixels = torch.from_numpy(to_pixels(image, size)).permute(2, 0, 1).float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


@dataclass
class Embeddings:
    """Model outputs for a batch, as numpy arrays.

    Attributes
    ----------
    features : np.ndarray
        ``(B, F)`` float32.
    style : np.ndarray
        ``(B, D)`` float32 style vectors, or the store's encoded form when an encoder was given.
    masks : np.ndarray
        ``(B, S, S)`` bool.
    clipped : int
        Style values clipped by the encoder (0 without one).
    """

    features: np.ndarray
    style: np.ndarray
    masks: np.ndarray
    clipped: int = 0

    def __len__(self) -> int:
        return len(self.features)


class Embedder:
    """Run a :class:`~dermris.models.DermrisModel` over pixels or PIL images in batches.

    Parameters
    ----------
    model : DermrisModel
        Moved to ``device`` and put in eval mode.
    device : torch.device
        Where to run.
    batch_size : int
        Images per forward pass.
    precision : str
        One of :data:`PRECISIONS` (reduced precision applies on CUDA only; the CPU runs float32).
    channels_last : bool, optional
        NHWC memory format (default: on CUDA).
    compile : bool
        ``torch.compile`` the model (slow to start; worth it for long runs).
    """

    def __init__(
        self,
        model: DermrisModel,
        *,
        device: torch.device,
        batch_size: int = 16,
        precision: str = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        self.device = device
        self.precision = resolve_precision(precision, device)
        if device.type != "cuda":
            self.precision = "float32"
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.model = model.to(device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._forward = torch.compile(self.model) if compile else self.model
        self.batch_size = batch_size
        self.image_size = model.config.image_size
        self.threshold = model.config.segmenter.threshold
        self._mean = torch.tensor(model.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(model.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The model's input pixels for one RGB image, ``(S, S, 3)`` uint8."""
        return to_pixels(image, self.image_size)

    def _autocast(self):
        """The numeric context of a forward pass.

        On CUDA: cuDNN autotuning for the fixed input shape; float32 means true float32 (no
        TF32 convolutions or matrix products), reduced precisions run under autocast.
        """
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        exact = self.precision == "float32"
        stack.enter_context(
            torch.backends.cudnn.flags(
                enabled=True, benchmark=True, deterministic=False, allow_tf32=not exact
            )
        )
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = not exact
        stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", previous)
        if self.precision in _DTYPES:
            stack.enter_context(torch.autocast(device_type="cuda", dtype=_DTYPES[self.precision]))
        return stack

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def forward_pixels(self, pixels: torch.Tensor, *, encoder=None):
        """Run one batch; results stay on the device.

        Returns
        -------
        (torch.Tensor, torch.Tensor, torch.Tensor, int)
            Features ``(B, F)`` float32, style ``(B, D)`` (float32, or encoded by ``encoder``),
            masks ``(B, S, S)`` bool, and the number of style values the encoder clipped.
        """
        with self._autocast():
            out = self._forward(self._normalise(pixels))
        style = out.style.float()
        clipped = 0
        if encoder is not None:
            style, clipped = encoder(style)
        return out.features.float(), style, out.mask_probability.float() > self.threshold, clipped

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor | np.ndarray, *, encoder=None) -> Embeddings:
        """Embed uint8 pixels ``(B, S, S, 3)`` (split into batches of ``batch_size``)."""
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        feats, styles, masks, clipped = [], [], [], 0
        for start in range(0, len(pixels), self.batch_size):
            f, s, m, c = self.forward_pixels(
                pixels[start : start + self.batch_size], encoder=encoder
            )
            feats.append(f.cpu().numpy())
            styles.append(s.cpu().numpy())
            masks.append(m.cpu().numpy())
            clipped += c
        if not feats:
            cfg = self.model.config
            return Embeddings(
                np.zeros((0, cfg.feature_dim), np.float32),
                np.zeros((0, self.model.style_layout.dim), np.float32),
                np.zeros((0, cfg.mask_size, cfg.mask_size), bool),
            )
        return Embeddings(
            np.concatenate(feats), np.concatenate(styles), np.concatenate(masks), clipped
        )

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        """Embed RGB PIL images (resized with :func:`to_pixels`, as indexed files are)."""
        if not len(images):
            return self.embed_pixels(np.zeros((0, self.image_size, self.image_size, 3), np.uint8))
        return self.embed_pixels(np.stack([self.pixels(im) for im in images]))
