"""Training: losses, augmentations, data readers, splits, AUC, and the three stages end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dermris.app.cli import main
from dermris.models import load_model
from dermris.models.training.augment import (
    AUGMENTATIONS,
    augment,
    expand_offline,
    grid_mask,
    random_augment,
)
from dermris.models.training.data import (
    DataError,
    read_classification_set,
    read_segmentation_set,
    split_train_val,
)
from dermris.models.training.losses import binary_focal_loss, focal_tversky_loss
from dermris.models.training.train import TrainConfig, dice_jaccard, roc_auc, train_segmenter
from dermris.models.weights import weights_part


def test_binary_focal_loss_by_hand():
    logits = torch.tensor([2.0, -1.0])
    targets = torch.tensor([1.0, 0.0])
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    # positive: -0.25 (1-p)^2 log p ; negative: -0.75 p^2 log(1-p)
    expected = (
        -0.25 * (1 - p[0]) ** 2 * math.log(p[0]) - 0.75 * p[1] ** 2 * math.log(1 - p[1])
    ) / 2
    assert float(binary_focal_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)
    ce = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))
    assert float(binary_focal_loss(logits, targets, alpha=-1, gamma=0)) == pytest.approx(
        ce, rel=1e-6
    )


def test_focal_tversky_loss_by_hand():
    logits = torch.tensor([[[10.0, -10.0], [10.0, -10.0]]])  # predicts the left column
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # truth: the top row
    p = torch.sigmoid(logits).flatten()
    g = mask.flatten()
    tp, fn, fp = float((p * g).sum()), float(((1 - p) * g).sum()), float((p * (1 - g)).sum())
    ti = (tp + 1) / (tp + 0.7 * fn + 0.3 * fp + 1)
    assert float(focal_tversky_loss(logits, mask)) == pytest.approx((1 - ti) ** 0.75, rel=1e-6)
    assert float(focal_tversky_loss(torch.full((1, 4, 4), 20.0), torch.ones(1, 4, 4))) < 1e-3


def test_augmentations_move_masks_only_when_geometric():
    rng = np.random.default_rng(0)
    image = torch.rand(3, 32, 32)
    mask = torch.zeros(32, 32)
    mask[:, :8] = 1
    for name in AUGMENTATIONS:
        out, out_mask = augment(image, mask, name, rng)
        assert out.shape == image.shape and 0 <= float(out.min()) and float(out.max()) <= 1
        if name == "hflip":
            assert torch.equal(out_mask, mask.flip(-1)) and torch.equal(out, image.flip(-1))
        elif name == "vflip":
            assert torch.equal(out_mask, mask.flip(-2))
        else:
            assert torch.equal(out_mask, mask) and not torch.equal(out, image)
    dropped = grid_mask(torch.ones(3, 100, 100), np.random.default_rng(1), ratio=0.6)
    assert 0.05 < float((dropped == 0).float().mean()) < 0.3  # about (1 - r)^2 = 0.16
    assert len(expand_offline(image, mask, rng)) == 8
    out, out_mask = random_augment(image, mask, rng)
    assert out.shape == image.shape and out_mask.shape == mask.shape


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 5, n).astype(float)  # many ties
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            assert math.isnan(roc_auc(scores, labels))
            continue
        pos, neg = scores[labels == 1], scores[labels == 0]
        slow = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (
            len(pos) * len(neg)
        )
        assert roc_auc(scores, labels) == pytest.approx(slow)


def test_dice_jaccard():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    true = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    dice, jac = dice_jaccard(pred, true)
    assert dice == pytest.approx((2 / 3 + 1) / 2) and jac == pytest.approx((1 / 2 + 1) / 2)


def test_split_keeps_groups_together_and_stratifies():
    rng = np.random.default_rng(0)
    labels = [int(x) for x in rng.random(200) < 0.1]
    groups = [f"P{i // 4}" for i in range(200)]
    train, val = split_train_val(labels, groups, val_fraction=0.25, seed=3)
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert 0.15 < len(val) / 200 < 0.35
    assert any(labels[i] for i in val) and any(labels[i] for i in train)
    assert split_train_val(labels, groups, val_fraction=0.25, seed=3) == (train, val)


def test_readers_for_isic_and_ph2_layouts(tmp_path):
    img = Image.new("RGB", (20, 20), (120, 80, 60))
    mask = Image.new("L", (20, 20), 0)
    isic_images, isic_masks = tmp_path / "isic", tmp_path / "isic_masks"
    isic_images.mkdir()
    isic_masks.mkdir()
    for i in range(3):
        img.save(isic_images / f"ISIC_{i:07d}.jpg")
        mask.save(isic_masks / f"ISIC_{i:07d}_segmentation.png")
    pairs = read_segmentation_set(isic_images, isic_masks)
    assert [p.image.stem for p in pairs] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    ph2 = tmp_path / "PH2"
    for name in ("IMD002", "IMD003"):
        (ph2 / name / f"{name}_Dermoscopic_Image").mkdir(parents=True)
        (ph2 / name / f"{name}_lesion").mkdir(parents=True)
        img.save(ph2 / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
        mask.save(ph2 / name / f"{name}_lesion" / f"{name}_lesion.bmp")
    pairs = read_segmentation_set(ph2)
    assert [p.image.name for p in pairs] == ["IMD002.bmp", "IMD003.bmp"]
    assert pairs[0].mask.name == "IMD002_lesion.bmp"

    with open(tmp_path / "challenge.csv", "w") as fh:
        fh.write(
            "image_name,patient_id,target\nISIC_0000000,P1,0\nISIC_0000001,P1,1\nISIC_0000009,P2,1\n"
        )
    items = read_classification_set(isic_images, tmp_path / "challenge.csv")
    assert [(i.path.stem, i.label, i.group) for i in items] == [
        ("ISIC_0000000", 0, "P1"),
        ("ISIC_0000001", 1, "P1"),
    ]
    with open(tmp_path / "isic_cli.csv", "w") as fh:
        fh.write(
            "isic_id,benign_malignant,lesion_id\nISIC_0000000,malignant,L1\nISIC_0000002,indeterminate,L2\n"
        )
    items = read_classification_set(isic_images, tmp_path / "isic_cli.csv")
    assert [(i.label, i.group) for i in items] == [(1, "L1")]
    with pytest.raises(DataError, match="no image id column"):
        with open(tmp_path / "bad.csv", "w") as fh:
            fh.write("name,target\nx,1\n")
        read_classification_set(isic_images, tmp_path / "bad.csv")


@pytest.fixture(scope="module")
def segmentation_data(tmp_path_factory):
    from dermris.indexer.synthetic import write_synthetic_set

    root = tmp_path_factory.mktemp("segdata")
    write_synthetic_set(root, per_class=10, size=128, seed=5)
    return root / "images", root / "masks"


@pytest.mark.slow  # trains, resumes, indexes
def test_segmenter_training_beats_untrained_resumes_and_indexes(
    tmp_path, segmentation_data, tiny_model
):
    images, masks = segmentation_data
    items = read_segmentation_set(images, masks)
    out = tmp_path / "seg.safetensors"
    cfg = TrainConfig(epochs=1, batch_size=8, lr=3e-3, seed=0, augment="online", device="cpu")
    import copy

    model = copy.deepcopy(tiny_model)
    train_segmenter(model, items, out, cfg, progress=False)
    history = json.loads((tmp_path / "seg.safetensors.metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0]
    # resume: a longer run continues from the checkpoint (epoch 0 is not run again)
    cfg3 = TrainConfig(epochs=4, batch_size=8, lr=3e-3, seed=0, augment="online", device="cpu")
    model = load_model(out)
    train_segmenter(model, items, out, cfg3, resume=True, progress=False)
    history = json.loads((tmp_path / "seg.safetensors.metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # held-out Dice: trained beats untrained (validation images were never trained on)
    trained_dice = history[-1]["val_dice"]
    untrained = copy.deepcopy(tiny_model)
    from dermris.models.training.data import load_image_tensor, load_mask_tensor
    from dermris.models.training.train import split_train_val

    _, val_idx = split_train_val([0] * len(items), None, val_fraction=0.2, seed=0)
    mean, std = (
        torch.tensor(untrained.mean).view(3, 1, 1),
        torch.tensor(untrained.std).view(3, 1, 1),
    )
    x = torch.stack([(load_image_tensor(items[i].image, 128) - mean) / std for i in val_idx])
    y = torch.stack([load_mask_tensor(items[i].mask, 128) for i in val_idx])
    with torch.no_grad():
        base_dice, _ = dice_jaccard(untrained(x).mask_probability > 0.5, y)
    assert trained_dice > base_dice + 0.1, (trained_dice, base_dice)

    # the written weights load in dermris index, and a segmenter-only file applies to the preset
    runner = CliRunner()
    result = runner.invoke(
        main, ["index", str(images), str(tmp_path / "store"), "--weights", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    part = tmp_path / "seg-only.safetensors"
    result = runner.invoke(
        main,
        [
            "train",
            "segmenter",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--weights",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            str(part),
            "--part-only",
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "segmenter epoch 1: train_loss" in result.output and "val_dice" in result.output
    assert weights_part(part) == "segmenter"
    applied = load_model(part)
    trained = load_model(out)
    assert not torch.equal(
        applied.segmenter.head.weight, trained.segmenter.head.weight
    )  # one more epoch
    for (name, a), b in zip(
        applied.extractor.state_dict().items(), tiny_model.extractor.state_dict().values()
    ):
        assert torch.equal(a, b), name  # the classifier part is the preset's


def _label_csv(images, path):
    # a learnable task: dark pigment (globular, streaks) = 1, light (homogeneous, reticular) = 0
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_name", "patient_id", "target"])
        for i, p in enumerate(sorted(images.iterdir())):
            texture = p.stem.split("_")[1]
            writer.writerow([p.stem, f"P{i // 2}", int(texture in ("globular", "streaks"))])
    return path


@pytest.mark.slow  # two training runs through the CLI
def test_classifier_and_ensemble_training_cli(tmp_path, segmentation_data):
    images, _ = segmentation_data
    csv_path = _label_csv(images, tmp_path / "labels.csv")
    runner = CliRunner()
    stage1 = tmp_path / "members.safetensors"
    result = runner.invoke(
        main,
        [
            "train",
            "classifier",
            "--images",
            str(images),
            "--metadata",
            str(csv_path),
            "--preset",
            "lite0",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--val-fraction",
            "0.4",
            "--out",
            str(stage1),
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "members.safetensors.metrics.json").read_text())
    assert {h["stage"] for h in history} == {"member0"}  # lite0: one member with ImageNet weights
    best = max(h["val_auc"] for h in history)
    print("member AUCs:", [round(h["val_auc"], 3) for h in history])
    assert best > 0.75, history
    stage2 = tmp_path / "ensemble.safetensors"
    result = runner.invoke(
        main,
        [
            "train",
            "ensemble",
            "--images",
            str(images),
            "--metadata",
            str(csv_path),
            "--weights",
            str(stage1),
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--val-fraction",
            "0.4",
            "--out",
            str(stage2),
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "ensemble.safetensors.metrics.json").read_text())
    assert [h["stage"] for h in history] == ["ensemble"] * 3
    print("ensemble AUCs:", [round(h["val_auc"], 3) for h in history])
    assert max(h["val_auc"] for h in history) > 0.75, history
    members_before = load_model(stage1).extractor.members.state_dict()
    members_after = load_model(stage2).extractor.members.state_dict()
    for name, value in members_before.items():
        assert torch.equal(value, members_after[name]), name  # members frozen in stage 2
    result = runner.invoke(
        main, ["index", str(images), str(tmp_path / "store"), "--weights", str(stage2), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    bad = runner.invoke(
        main,
        [
            "train",
            "ensemble",
            "--images",
            str(images),
            "--metadata",
            str(csv_path),
            "--label-column",
            "nope",
            "--out",
            str(tmp_path / "x"),
            "--quiet",
        ],
    )
    assert bad.exit_code == 1 and "no column 'nope'" in bad.output


def test_resume_uses_the_checkpoint_weights_and_epoch(tmp_path, segmentation_data, tiny_model):
    """A resumed run starts from the checkpoint's weights and epoch, whatever model it is given."""
    import copy

    images, masks = segmentation_data
    items = read_segmentation_set(images, masks)
    out = tmp_path / "seg.safetensors"
    cfg = TrainConfig(epochs=1, batch_size=8, lr=3e-3, seed=0, augment="none", device="cpu")
    train_segmenter(copy.deepcopy(tiny_model), items, out, cfg, progress=False)
    trained = load_model(out).segmenter.state_dict()
    fresh = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in fresh.segmenter.parameters():
            p.mul_(0.5)  # a model that is not the checkpoint's
    train_segmenter(
        fresh, items, out, cfg, resume=True, progress=False
    )  # epoch 0 is done: nothing to train
    resumed = load_model(out).segmenter.state_dict()
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)
    history = json.loads((tmp_path / "seg.safetensors.metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0]
