"""The archive-scale benchmark stores: ~3k, ~20k and ~100k rows of real pixels, built once.

Images are variations of scikit-image's photographs (``photos.py``: crops, flips, rotations,
colour jitter, a share with a synthetic lesion blended in), indexed with the ``lite0`` preset
(EfficientNet-Lite0 with its real ImageNet weights, the untrained R2U-Net every user without
trained weights has). A metadata CSV gives every image a diagnosis (three classes, unbalanced),
a lesion (1 to 5 consecutive images) and a patient, so filters and grouping have real columns.

One store grows in ``ROOT/store-grow``; when it reaches each size, a snapshot is taken by hard
links (``ROOT/store-<n>``: the store replaces files by renaming new ones into place, so a
snapshot never changes afterwards). Every step is resumable: rerun the same command after an
interruption and it goes on (photos already written are kept, rows already committed too).
On the 2-core machine the 100k store takes about two hours (the lite0 pipeline indexes about
14 images/s) and 17 GB of disk.

Example::

    nice -n 19 python benchmarks/scale_stores.py --root /data/bench --sizes 3000 20000 100000
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dermris.indexer import Store, index_folder, store_exists  # noqa: E402

from photos import write_photo_set  # noqa: E402

DIAGNOSES = ("nevus", "melanoma", "seborrheic keratosis")
PHOTO_SIZE = 320


def write_metadata(path: Path, n: int, *, seed: int = 0) -> Path:
    """A CSV for images ``PHOTO_000000 .. PHOTO_<n-1>``: diagnosis_1, lesion_id, patient_id."""
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            if sum(1 for _ in fh) - 1 >= n:
                return path
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["image_id", "diagnosis_1", "lesion_id", "patient_id", "age_approx"])
        i = lesion = 0
        while i < n:
            size = int(rng.integers(1, 6))
            diagnosis = DIAGNOSES[int(rng.choice(3, p=[0.7, 0.2, 0.1]))]
            patient = f"IP_{lesion // 3:07d}"
            age = int(rng.integers(2, 18)) * 5
            for _ in range(min(size, n - i)):
                out.writerow([f"PHOTO_{i:06d}", diagnosis, f"IL_{lesion:07d}", patient, age])
                i += 1
            lesion += 1
    os.replace(tmp, path)
    return path


def _snapshot(source: Path, target: Path) -> None:
    """A hard-link copy of a store (its files are replaced by renames, never changed in place)."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["cp", "-al", str(source), str(tmp)], check=True)
    (tmp / ".writer.lock").unlink(missing_ok=True)
    os.replace(tmp, target)


def build(root: Path, sizes: list[int], *, preset: str = "lite0") -> dict[int, Path]:
    """Build (or finish) the stores of ``sizes`` rows under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = sorted(sizes)
    csv_path = write_metadata(root / "metadata.csv", sizes[-1])
    photos = root / "photos"
    grow = root / "store-grow"
    out = {}
    done = 0
    for part, n in enumerate(sizes):
        target = root / f"store-{n}"
        out[n] = target
        if store_exists(target) and Store.open(target).rows == n:
            done = n
            continue
        # photos [done, n) in a folder of their own: the store's folder holds exactly n images
        folder = photos / f"part-{part:02d}"
        write_photo_set(folder, n - done, size=PHOTO_SIZE, seed=0, first=done)
        index_folder(
            photos,
            grow,
            preset=preset,
            metadata=csv_path,
            id_column="image_id",
            progress=True,
            batch_size=32,
            commit_every=512,
        )
        rows = Store.open(grow).rows
        if rows != n:
            raise SystemExit(f"{grow} has {rows} rows after indexing, expected {n}")
        _snapshot(grow, target)
        done = n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 20000, 100000])
    args = parser.parse_args()
    for n, path in build(args.root, args.sizes).items():
        print(f"{n:>7} rows: {path}")


if __name__ == "__main__":
    main()
