"""Training the paper's models: ensemble members, the ensemble head, and the segmenter.

1. Each member (backbone -> global average pool -> Linear -> sigmoid) with binary focal loss.
2. The ensemble head (GAP -> BatchNorm -> concat -> Dense 1024 SELU -> Dense 1 sigmoid) with the
   members frozen; the Dense 1 head is dropped for indexing.
3. The segmenter (U-Net, RU-Net or R2U-Net) with focal Tversky loss.

Every stage checkpoints after each epoch (``OUT.checkpoints/<stage>.pt``, read back with
``weights_only=True``) and resumes from it; a metrics file (``OUT.metrics.json``) records the
training loss and the validation ROC AUC (classification) or Dice and Jaccard (segmentation)
of every epoch. The result is a dermris weights file that ``dermris index --weights`` loads.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dermris.core.atomic import atomic_path, atomic_write

from ..ensemble import DermrisModel
from ..weights import save_model
from .augment import expand_offline, random_augment
from .data import (
    ClassificationItem,
    DataError,
    SegmentationItem,
    load_image_tensor,
    load_mask_tensor,
    split_train_val,
)
from .losses import binary_focal_loss, focal_tversky_loss

__all__ = [
    "TrainConfig",
    "SEGMENTER_TRAINING",
    "learning_rate",
    "roc_auc",
    "dice_jaccard",
    "train_classifier",
    "train_ensemble",
    "train_segmenter",
]


@dataclass(frozen=True)
class TrainConfig:
    """Training options shared by the three stages.

    Parameters
    ----------
    epochs : int
        Epochs per stage (per member for the classifier stage).
    batch_size : int
        Images per step.
    lr : float
        AdamW learning rate.
    weight_decay : float
        AdamW weight decay.
    val_fraction : float
        Share of the data (whole patients / lesions) kept for validation.
    seed : int
        Seed of the split, the augmentations and the sampling.
    augment : str
        ``"online"`` (random on the fly), ``"offline"`` (the paper's 7x expansion) or ``"none"``.
    balance : str
        ``"sampler"`` draws classes equally often (the paper's set is 2 % malignant), ``"none"``.
    focal_alpha, focal_gamma : float
        Binary focal loss parameters.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``; mixed precision is used on CUDA.
    schedule : str
        ``"cosine"``: the learning rate rises linearly from ``lr / 10`` over the first tenth
        of the steps, then falls along a cosine to ``lr / 100`` at the last step (computed from
        the step and ``epochs``, so a resumed run follows the schedule of its own length);
        ``"constant"``: ``lr`` throughout.
    """

    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    augment: str = "online"
    balance: str = "sampler"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    device: str = "auto"
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise DataError("schedule must be cosine or constant")
        if self.augment not in ("online", "offline", "none"):
            raise DataError("augment must be online, offline or none")
        if self.balance not in ("sampler", "none"):
            raise DataError("balance must be sampler or none")
        if self.epochs < 1 or self.batch_size < 1:
            raise DataError("epochs and batch_size must be >= 1")


SEGMENTER_TRAINING = TrainConfig(epochs=10, batch_size=8, lr=3e-3, balance="none")
"""The segmenter's defaults: small batches (more steps on small data), a higher peak rate,
ten epochs (measured on 80 synthetic lesions: docs/models.md)."""


def learning_rate(cfg: TrainConfig, fraction: float) -> float:
    """The learning rate of ``cfg``'s schedule after ``fraction`` (0..1) of the steps."""
    if cfg.schedule == "constant":
        return cfg.lr
    warm = 0.1
    if fraction < warm:
        return cfg.lr * (0.1 + 0.9 * fraction / warm)
    t = min(1.0, (fraction - warm) / (1.0 - warm))
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties counted as one half.

    Returns NaN when one class is absent.
    """
    s = np.asarray(scores, np.float64)
    positive = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_scores = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def dice_jaccard(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean Dice and Jaccard of binary masks ``(B, H, W)`` (both empty counts as 1)."""
    p = pred.reshape(pred.shape[0], -1).bool()
    g = target.reshape(target.shape[0], -1).bool()
    inter = (p & g).sum(1).double()
    total = p.sum(1).double() + g.sum(1).double()
    union = (p | g).sum(1).double()
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(dice.mean()), float(jaccard.mean())


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(name)


class _Images(torch.utils.data.Dataset):
    """Decoded, resized images (cached as uint8), augmented and normalised per access."""

    def __init__(
        self, paths, size, mean, std, *, masks=None, labels=None, augment="none", seed=0
    ) -> None:
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        images = [(load_image_tensor(p, size) * 255).round().to(torch.uint8) for p in paths]
        mask_t = (
            [load_mask_tensor(m, size) for m in masks]
            if masks is not None
            else [None] * len(images)
        )
        labels = list(labels) if labels is not None else [0] * len(images)
        self.items = list(zip(images, mask_t, labels))
        if augment == "offline":  # the paper's 7x expansion, fixed once
            expanded = []
            for image, mask, label in self.items:
                for img, msk in expand_offline(image.float() / 255, mask, self.rng):
                    expanded.append(((img * 255).round().to(torch.uint8), msk, label))
            self.items = expanded

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int]:
        return [label for _, _, label in self.items]

    def __getitem__(self, i):
        image, mask, label = self.items[i]
        image = image.float() / 255
        if self.augment == "online":
            image, mask = random_augment(image, mask, self.rng)
        image = (image - self.mean) / self.std
        return image, (mask if mask is not None else torch.zeros(0)), torch.tensor(float(label))


def _loader(
    dataset: _Images, cfg: TrainConfig, *, shuffle: bool, balance: bool
) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    if balance and cfg.balance == "sampler":
        labels = np.asarray(dataset.labels())
        counts = np.bincount(labels.astype(int), minlength=2).astype(np.float64)
        weights = 1.0 / counts[labels.astype(int)]
        sampler = torch.utils.data.WeightedRandomSampler(
            # torch annotates weights as Sequence[float]; it takes any array-like (as_tensor)
            torch.from_numpy(weights),  # type: ignore[arg-type]
            len(labels),
            generator=generator,
        )
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator
    )


def _checkpoint_path(out: Path, stage: str) -> Path:
    return out.with_name(out.name + ".checkpoints") / f"{stage}.pt"


def _append_metrics(out: Path, entry: dict) -> None:
    path = out.with_name(out.name + ".metrics.json")
    history = json.loads(path.read_text()) if path.exists() else []
    history = [
        h for h in history if not (h["stage"] == entry["stage"] and h["epoch"] == entry["epoch"])
    ]
    history.append(entry)
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(history, indent=1))


def _fit(
    stage: str,
    module: nn.Module,
    params: list[nn.Parameter],
    train: torch.utils.data.DataLoader,
    step: Callable[[tuple], torch.Tensor],
    validate: Callable[[], dict],
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    resume: bool,
    progress: bool,
) -> list[dict]:
    """The shared epoch loop: train, validate, checkpoint, record metrics; resumable."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    ckpt = _checkpoint_path(out, stage)
    start = 0
    history: list[dict] = []
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
        history = list(state["history"])
    steps = max(1, cfg.epochs * len(train))
    for epoch in range(start, cfg.epochs):
        module.train()
        losses = []
        started = time.perf_counter()
        bar = tqdm(
            train,
            desc=f"{stage} epoch {epoch + 1}/{cfg.epochs}",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        )
        for i, batch in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, (epoch * len(train) + i) / steps)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(
                device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"
            ):
                loss = step(batch)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        module.eval()
        with torch.no_grad():
            metrics = validate()
        if progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            tqdm.write(
                f"{stage} epoch {epoch + 1}/{cfg.epochs}: train_loss "
                f"{np.mean(losses) if losses else float('nan'):.4f}, {shown} "
                f"({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
        entry = {
            "stage": stage,
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **metrics,
        }
        history.append(entry)
        _append_metrics(out, entry)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt) as tmp:
            torch.save(
                {
                    "module": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                },
                tmp,
            )
    return history


def _split_items(labels, groups, cfg):
    train_idx, val_idx = split_train_val(
        labels, groups, val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    if not train_idx or not val_idx:
        raise DataError("too few images for a train/validation split")
    return train_idx, val_idx


class _MemberClassifier(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(cast(int, backbone.num_features), 1)  # a timm attribute

    def forward(self, x):
        return self.fc(self.backbone(x).mean(dim=(2, 3)))[:, 0]


class _EnsembleClassifier(nn.Module):
    def __init__(self, model: DermrisModel) -> None:
        super().__init__()
        self.extractor = model.extractor
        self.fc = nn.Linear(model.config.feature_dim, 1)

    def forward(self, x):
        features, _ = self.extractor(x)
        return self.fc(features)[:, 0]


def _classification_data(model, items: Sequence[ClassificationItem], cfg: TrainConfig):
    labels = [it.label for it in items]
    train_idx, val_idx = _split_items(labels, [it.group for it in items], cfg)
    size = model.config.image_size
    train = _Images(
        [items[i].path for i in train_idx],
        size,
        model.mean,
        model.std,
        labels=[labels[i] for i in train_idx],
        augment=cfg.augment,
        seed=cfg.seed,
    )
    val = _Images(
        [items[i].path for i in val_idx],
        size,
        model.mean,
        model.std,
        labels=[labels[i] for i in val_idx],
        augment="none",
    )
    return train, val


def _focal_step(
    net: nn.Module, cfg: TrainConfig, device: torch.device
) -> Callable[[tuple], torch.Tensor]:
    def step(batch) -> torch.Tensor:
        image, _, label = batch
        return binary_focal_loss(
            net(image.to(device)), label.to(device), alpha=cfg.focal_alpha, gamma=cfg.focal_gamma
        )

    return step


def _classifier_validation(net, val: _Images, cfg: TrainConfig, device) -> Callable[[], dict]:
    def validate() -> dict:
        scores, labels = [], []
        for image, _, label in torch.utils.data.DataLoader(val, batch_size=cfg.batch_size):
            scores += torch.sigmoid(net(image.to(device)).float()).cpu().tolist()
            labels += label.int().tolist()
        return {"val_auc": roc_auc(scores, labels), "val_images": len(labels)}

    return validate


def train_classifier(
    model: DermrisModel,
    items: Sequence[ClassificationItem],
    out: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    progress: bool = True,
    part_only: bool = False,
) -> DermrisModel:
    """Stage 1: train every ensemble member on its own with binary focal loss, then save.

    Each member gets a temporary ``Linear -> sigmoid`` head on its pooled features; only the
    backbones are kept. ``part_only`` writes only the classifier tensors.
    """
    out = Path(out)
    device = _device(cfg.device)
    train, val = _classification_data(model, items, cfg)
    model.to(device)
    for m, backbone in enumerate(model.extractor.members):
        with torch.random.fork_rng(
            devices=[]
        ):  # the temporary head is seeded, not global-RNG dependent
            torch.manual_seed(cfg.seed + m)
            net = _MemberClassifier(backbone).to(device)
        loader = _loader(train, cfg, shuffle=True, balance=True)

        _fit(
            f"member{m}",
            net,
            list(net.parameters()),
            loader,
            _focal_step(net, cfg, device),
            _classifier_validation(net, val, cfg, device),
            cfg,
            out,
            device,
            resume,
            progress,
        )
    model.cpu().eval()
    model.trained_parts = model.trained_parts | {"classifier"}
    save_model(model, out, part="classifier" if part_only else None, training=asdict(cfg))
    return model


def train_ensemble(
    model: DermrisModel,
    items: Sequence[ClassificationItem],
    out: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    progress: bool = True,
    part_only: bool = False,
) -> DermrisModel:
    """Stage 2: members frozen; train BatchNorm -> concat -> Dense 1024 SELU -> Dense 1 sigmoid.

    The ``Dense 1`` head is dropped when saving (the 1024-d SELU output is the feature).
    ``part_only`` writes only the classifier tensors.
    """
    out = Path(out)
    device = _device(cfg.device)
    train, val = _classification_data(model, items, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = _EnsembleClassifier(model).to(device)
    for p in model.extractor.members.parameters():
        p.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]

    focal = _focal_step(net, cfg, device)

    def step(batch):
        model.extractor.members.eval()  # frozen members keep their BatchNorm statistics
        return focal(batch)

    _fit(
        "ensemble",
        net,
        params,
        _loader(train, cfg, shuffle=True, balance=True),
        step,
        _classifier_validation(net, val, cfg, device),
        cfg,
        out,
        device,
        resume,
        progress,
    )
    for p in model.extractor.members.parameters():
        p.requires_grad_(True)
    model.cpu().eval()
    model.trained_parts = model.trained_parts | {"classifier"}
    save_model(model, out, part="classifier" if part_only else None, training=asdict(cfg))
    return model


def train_segmenter(
    model: DermrisModel,
    items: Sequence[SegmentationItem],
    out: str | os.PathLike,
    cfg: TrainConfig = SEGMENTER_TRAINING,
    *,
    resume: bool = False,
    progress: bool = True,
    part_only: bool = False,
) -> DermrisModel:
    """Stage 3: train the segmenter with focal Tversky loss; validation Dice and Jaccard.

    ``part_only`` writes only the segmenter tensors. The defaults (:data:`SEGMENTER_TRAINING`)
    converge on small data. The saved model records the segmenter as trained.
    """
    out = Path(out)
    device = _device(cfg.device)
    train_idx, val_idx = _split_items([0] * len(items), None, cfg)
    size = model.config.image_size
    train = _Images(
        [items[i].image for i in train_idx],
        size,
        model.mean,
        model.std,
        masks=[items[i].mask for i in train_idx],
        augment=cfg.augment,
        seed=cfg.seed,
    )
    val = _Images(
        [items[i].image for i in val_idx],
        size,
        model.mean,
        model.std,
        masks=[items[i].mask for i in val_idx],
        augment="none",
    )
    net = model.segmenter.to(device)
    threshold = model.config.segmenter.threshold

    def step(batch):
        image, mask, _ = batch
        return focal_tversky_loss(net(image.to(device))[:, 0].float(), mask.to(device))

    def validate() -> dict:
        preds, masks = [], []
        for image, mask, _ in torch.utils.data.DataLoader(val, batch_size=cfg.batch_size):
            preds.append(torch.sigmoid(net(image.to(device))[:, 0].float()).cpu() > threshold)
            masks.append(mask)
        dice, jaccard = dice_jaccard(torch.cat(preds), torch.cat(masks))
        return {"val_dice": dice, "val_jaccard": jaccard, "val_images": len(val)}

    _fit(
        "segmenter",
        net,
        list(net.parameters()),
        _loader(train, cfg, shuffle=True, balance=False),
        step,
        validate,
        cfg,
        out,
        device,
        resume,
        progress,
    )
    model.cpu().eval()
    model.trained_parts = model.trained_parts | {"segmenter"}
    save_model(model, out, part="segmenter" if part_only else None, training=asdict(cfg))
    return model
