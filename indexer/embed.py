"""The mapper stage: RGB images -> (feature, style vector, lesion mask), in batches.

Indexed images and query images go through exactly this code, so a query with an indexed
image reproduces the stored row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dermris.models import DermrisModel

__all__ = ["resolve_device", "preprocess", "Embeddings", "Embedder"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto"`` to CUDA when available, else CPU; validate explicit names."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here")
    return torch.device(device)


def preprocess(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize the whole image (no crop) to ``size x size`` and normalise; ``(3, S, S)`` float32."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


@dataclass
class Embeddings:
    """Model outputs for a batch, as numpy arrays.

    Attributes
    ----------
    features : np.ndarray
        ``(B, F)`` float32.
    style : np.ndarray
        ``(B, D)`` float32.
    masks : np.ndarray
        ``(B, S, S)`` bool.
    """

    features: np.ndarray
    style: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.features)


class Embedder:
    """Run a :class:`models.DermrisModel` over PIL images in batches.

    Parameters
    ----------
    model : DermrisModel
        Moved to ``device`` and put in eval mode.
    device : torch.device
        Where to run.
    batch_size : int
        Images per forward pass.
    """

    def __init__(self, model: DermrisModel, *, device: torch.device, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.image_size = model.config.image_size
        self.threshold = model.config.segmenter.threshold

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's input for one image."""
        return preprocess(image, self.image_size, self.model.mean, self.model.std)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        """Embed any number of RGB images (split into batches of ``batch_size``)."""
        feats, styles, masks = [], [], []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])
            out = self.model(batch.to(self.device))
            feats.append(out.features.cpu().numpy())
            styles.append(out.style.cpu().numpy())
            masks.append((out.mask_probability > self.threshold).cpu().numpy())
        if not feats:
            cfg = self.model.config
            return Embeddings(
                np.zeros((0, cfg.feature_dim), np.float32),
                np.zeros((0, self.model.style_layout.dim), np.float32),
                np.zeros((0, cfg.mask_size, cfg.mask_size), bool),
            )
        return Embeddings(np.concatenate(feats), np.concatenate(styles), np.concatenate(masks))
