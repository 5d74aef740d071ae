"""Training data: classification sets (folder + CSV), segmentation pairs, leakage-safe splits.

* Classification: an image folder plus a CSV in any of the ISIC forms: the 2017-2020 challenge
  ground truth (``image_name``/``image``/``image_id`` + ``target``/``melanoma``/``MEL``), or the
  isic-cli metadata export (``isic_id`` + ``benign_malignant``). Several sets combine into one,
  as the paper combines ISIC 2017-2020.
* Segmentation: image/mask pairs in the ISIC 2017 layout
  (``ISIC_x.jpg`` + ``ISIC_x_segmentation.png``) or the PH2 layout
  (``IMDx/IMDx_Dermoscopic_Image/IMDx.bmp`` + ``IMDx/IMDx_lesion/IMDx_lesion.bmp``).
* :func:`split_train_val`: seeded, stratified by label, and keeping every group (patient,
  lesion) on one side.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dermris.core.errors import DataError
from dermris.core.imageio import decode_image

__all__ = [
    "DataError",
    "ClassificationItem",
    "SegmentationItem",
    "read_classification_set",
    "read_segmentation_set",
    "split_train_val",
    "load_image_tensor",
    "load_mask_tensor",
]

_IMAGE_ENDINGS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_ID_COLUMNS = ("image_name", "isic_id", "image", "image_id")
_GROUP_COLUMNS = ("patient_id", "lesion_id")
_MASK_SUFFIXES = ("_segmentation", "_lesion", "_mask", "_Segmentation")


@dataclass(frozen=True)
class ClassificationItem:
    """One labelled image."""

    path: Path
    label: int
    group: str | None = None


@dataclass(frozen=True)
class SegmentationItem:
    """One image with its lesion mask."""

    image: Path
    mask: Path


def _binary_label(row: dict, label_column: str | None) -> int | None:
    if label_column is not None:
        value = row.get(label_column)
    else:
        for column in ("target", "melanoma", "MEL", "benign_malignant"):
            if column in row and row[column] not in (None, ""):
                value = row[column]
                break
        else:
            return None
    if value in (None, ""):
        return None
    text = str(value).strip().lower()
    if text in ("malignant", "1", "1.0", "true", "yes"):
        return 1
    if text in ("benign", "0", "0.0", "false", "no"):
        return 0
    return None


def read_classification_set(
    images: str | os.PathLike,
    metadata: str | os.PathLike,
    *,
    id_column: str | None = None,
    label_column: str | None = None,
) -> list[ClassificationItem]:
    """Labelled images from a folder and a CSV (binary: malignant = 1).

    Rows without a usable label (e.g. ``indeterminate``) or without an image file are skipped.

    Raises
    ------
    DataError
        No id or label column, or no labelled image found.
    """
    images, metadata = Path(images), Path(metadata)
    files = {p.stem: p for p in images.rglob("*") if p.suffix.lower() in _IMAGE_ENDINGS}
    try:
        with open(metadata, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {metadata}: {exc}") from None
    id_column = id_column or next((c for c in _ID_COLUMNS if c in columns), None)
    if id_column is None or id_column not in columns:
        raise DataError(f"{metadata}: no image id column (columns: {', '.join(columns)})")
    if label_column is not None and label_column not in columns:
        raise DataError(f"{metadata}: no column {label_column!r}")
    group_column = next((c for c in _GROUP_COLUMNS if c in columns), None)
    items = []
    for row in rows:
        label = _binary_label(row, label_column)
        path = files.get(row[id_column])
        if label is None or path is None:
            continue
        items.append(
            ClassificationItem(
                path, label, (row.get(group_column) or None) if group_column else None
            )
        )
    if not items:
        raise DataError(f"no labelled image of {metadata} was found under {images}")
    return items


def read_segmentation_set(
    images: str | os.PathLike, masks: str | os.PathLike | None = None
) -> list[SegmentationItem]:
    """Image/mask pairs matched by file stem: ``ISIC_x.jpg`` with ``ISIC_x_segmentation.png`` or
    ``IMDx_lesion.bmp``, and, when the masks have a folder of their own, ``x.jpg`` with ``x.png``.

    Parameters
    ----------
    images : path-like
        Folder of images (searched recursively), or a PH2 root.
    masks : path-like, optional
        Folder of masks; by default masks are looked for under ``images`` too (PH2 layout).
    """
    images = Path(images)
    separate = masks is not None and Path(masks).resolve() != images.resolve()
    masks = Path(masks) if masks is not None else images
    mask_files = {}
    for p in masks.rglob("*"):
        if p.suffix.lower() in _IMAGE_ENDINGS:
            stem = p.stem
            for suffix in _MASK_SUFFIXES:
                if stem.endswith(suffix):
                    mask_files[stem[: -len(suffix)]] = p
                    break
            else:
                if separate:  # a mask folder of its own: the same file stem as the image pairs too
                    mask_files.setdefault(stem, p)
    pairs = []
    for p in sorted(images.rglob("*")):
        if p.suffix.lower() not in _IMAGE_ENDINGS or any(
            p.stem.endswith(s) for s in _MASK_SUFFIXES
        ):
            continue
        if p.stem in mask_files:
            pairs.append(SegmentationItem(p, mask_files[p.stem]))
    if not pairs:
        raise DataError(f"no image/mask pairs found (images {images}, masks {masks})")
    return pairs


def split_train_val(
    labels: Sequence[int],
    groups: Sequence[str | None] | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Seeded split of item indices, stratified by label, whole groups on one side.

    Groups (patient or lesion ids) are assigned to validation per label stratum until the
    stratum's share reaches ``val_fraction``; items without a group are their own group.
    """
    if not 0 < val_fraction < 1:
        raise DataError("val_fraction must lie strictly between 0 and 1")
    n = len(labels)
    groups = list(groups) if groups is not None else [None] * n
    keys = [g if g is not None else f"__item{i}" for i, g in enumerate(groups)]
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[str]] = {}
    for key, idx in members.items():
        majority = int(round(float(np.mean([labels[i] for i in idx]))))
        by_label.setdefault(majority, []).append(key)
    val: list[int] = []
    for _label, keys_l in sorted(by_label.items()):
        order = rng.permutation(len(keys_l))
        total = sum(len(members[keys_l[j]]) for j in order)
        taken = 0
        for j in order:
            if taken >= val_fraction * total:
                break
            val.extend(members[keys_l[j]])
            taken += len(members[keys_l[j]])
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val_set)


def load_image_tensor(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image as ``(3, size, size)`` float32 in [0, 1] (whole image resized, no crop)."""
    image = decode_image(path, draft_size=2 * size)[0].resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1).contiguous()


def load_mask_tensor(path: str | os.PathLike, size: int) -> torch.Tensor:
    """A mask file as ``(size, size)`` float32 0/1 (any non-zero pixel is lesion)."""
    image = decode_image(path)[0].convert("L").resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(image) > 127).astype(np.float32))
