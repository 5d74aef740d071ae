"""``dermris train``: the paper's models (members, ensemble head, segmenter) into a weights file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dermris.models.presets import list_presets

from ._common import DEVICES, command, main, progress


@main.group("train")
def train_group() -> None:
    """Train the paper's models (members, ensemble head, segmenter) into a weights file."""


SEGMENTER_DEFAULTS: dict[str, Any] = {"epochs": 10, "batch_size": 8, "lr": 3e-3}
"""``train segmenter``'s defaults (those of :data:`dermris.models.training.SEGMENTER_TRAINING`;
kept here so that ``--help`` imports no torch)."""


def _training_options(func=None, *, epochs: int = 5, batch_size: int = 16, lr: float = 1e-3):
    if func is None:
        return lambda f: _training_options(f, epochs=epochs, batch_size=batch_size, lr=lr)
    options = [
        click.option(
            "--preset",
            type=click.Choice(list_presets()),
            default="tiny",
            show_default=True,
            help="Architecture to start from (ignored with --weights).",
        ),
        click.option(
            "--weights",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Start from this dermris weights file (e.g. the previous stage's output).",
        ),
        click.option(
            "--backbone-weights",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Local timm checkpoint for the backbones.",
        ),
        click.option("--epochs", type=click.IntRange(min=1), default=epochs, show_default=True),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=batch_size, show_default=True
        ),
        click.option(
            "--lr",
            type=float,
            default=lr,
            show_default=True,
            help="Peak learning rate (warm-up over the first tenth, then a cosine decay).",
        ),
        click.option(
            "--val-fraction",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=0.2,
            show_default=True,
        ),
        click.option(
            "--augment",
            type=click.Choice(["online", "offline", "none"]),
            default="online",
            show_default=True,
            help="On-the-fly augmentation, the paper's 7x offline expansion, or none.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=DEVICES, default="auto", show_default=True),
        click.option(
            "--out",
            type=click.Path(dir_okay=False, path_type=Path),
            required=True,
            help="Weights file to write (checkpoints and metrics go beside it).",
        ),
        click.option(
            "--resume", is_flag=True, help="Continue from the last checkpoint of a crashed run."
        ),
        click.option(
            "--part-only",
            is_flag=True,
            help="Write only the trained part (applied to a preset on load).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _base_model(preset, weights, backbone_weights):
    from dermris.models import build_model, get_preset, load_model

    if weights is not None:
        return load_model(weights)
    return build_model(get_preset(preset), backbone_weights=backbone_weights)


def _train_config(epochs, batch_size, lr, val_fraction, augment, seed, device, balance="sampler"):
    from dermris.models.training import TrainConfig

    return TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        augment=augment,
        seed=seed,
        device=device,
        balance=balance,
    )


def _classification_items(images, metadata, id_column, label_column):
    from dermris.core.errors import DataError
    from dermris.models.training import read_classification_set

    if len(images) != len(metadata) or not images:
        raise DataError("give one --metadata CSV per --images folder")
    items = []
    for folder, csv_path in zip(images, metadata):
        items += read_classification_set(
            folder, csv_path, id_column=id_column, label_column=label_column
        )
    return items


def _report_training(out, stage_prefix):
    history = json.loads(Path(str(out) + ".metrics.json").read_text("utf-8"))
    for entry in history:
        if entry["stage"].startswith(stage_prefix):
            metrics = ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in entry.items()
                if k not in ("stage", "epoch")
            )
            click.echo(f"{entry['stage']} epoch {entry['epoch'] + 1}: {metrics}")
    click.echo(f"weights: {out}")


def _classification_command(name, doc, trainer_name, stage_prefix):
    @command(train_group, name, help=doc)
    @click.option(
        "--images",
        "images",
        multiple=True,
        required=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Image folder (repeatable).",
    )
    @click.option(
        "--metadata",
        "metadata",
        multiple=True,
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Its CSV (repeatable, in order).",
    )
    @click.option(
        "--id-column", help="Image id column (default: image_name, isic_id, image, image_id)."
    )
    @click.option(
        "--label-column", help="Label column (default: target, melanoma, MEL or benign_malignant)."
    )
    @click.option(
        "--balance",
        type=click.Choice(["sampler", "none"]),
        default="sampler",
        show_default=True,
        help="Draw both classes equally often.",
    )
    @_training_options
    def train_classification(
        images,
        metadata,
        id_column,
        label_column,
        balance,
        preset,
        weights,
        backbone_weights,
        epochs,
        batch_size,
        lr,
        val_fraction,
        augment,
        seed,
        device,
        out,
        resume,
        part_only,
    ):
        from dermris.models import training

        items = _classification_items(images, metadata, id_column, label_column)
        cfg = _train_config(epochs, batch_size, lr, val_fraction, augment, seed, device, balance)
        trainer = getattr(training, trainer_name)
        trainer(
            _base_model(preset, weights, backbone_weights),
            items,
            out,
            cfg,
            resume=resume,
            progress=progress(),
            part_only=part_only,
        )
        _report_training(out, stage_prefix)

    return train_classification


_classification_command(
    "classifier",
    "Stage 1: train each ensemble member with binary focal loss.",
    "train_classifier",
    "member",
)
_classification_command(
    "ensemble",
    "Stage 2: train the ensemble head (members frozen) with focal loss.",
    "train_ensemble",
    "ensemble",
)


@command(train_group, "segmenter")
@click.option(
    "--images",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Image folder (or a PH2 root).",
)
@click.option(
    "--masks",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Mask folder, matched by file stem (_segmentation / _lesion suffixes); default: --images.",
)
@_training_options(**SEGMENTER_DEFAULTS)
def train_segmenter_cmd(
    images,
    masks,
    preset,
    weights,
    backbone_weights,
    epochs,
    batch_size,
    lr,
    val_fraction,
    augment,
    seed,
    device,
    out,
    resume,
    part_only,
):
    """Stage 3: train the segmenter with focal Tversky loss."""
    from dermris.models.training import read_segmentation_set, train_segmenter

    items = read_segmentation_set(images, masks)
    cfg = _train_config(epochs, batch_size, lr, val_fraction, augment, seed, device, "none")
    train_segmenter(
        _base_model(preset, weights, backbone_weights),
        items,
        out,
        cfg,
        resume=resume,
        progress=progress(),
        part_only=part_only,
    )
    _report_training(out, "segmenter")
