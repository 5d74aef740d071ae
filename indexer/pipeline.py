"""Index a folder of images into a store: reader -> mapper -> writer.

Rows are committed every ``commit_every`` images, so an interrupted run keeps what it has
committed, and running the same command again skips every image already in the store
(matched by the sha256 of its bytes) and goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from dermris.models import DermrisModel, build_model, get_preset, load_model
from dermris.models.errors import StoreMismatchError

from .embed import Embeddings, Embedder, resolve_device
from .sources import DecodedImage, MetadataTable, Rejected, list_images, read_images
from .store import StoreWriter, store_exists

__all__ = ["IndexReport", "index_folder"]

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What an indexing run did.

    Attributes
    ----------
    indexed : int
        Rows added by this run.
    already_indexed : int
        Files whose bytes were already in the store (skipped).
    duplicates : list of (str, str)
        ``(path, path_of_first_copy)`` for files with the same bytes as another file.
    rejected : list of (str, str)
        ``(path, reason)`` for files that could not be indexed.
    previously_deleted : list of str
        Files whose bytes were deleted from the store before (``dermris delete``): not re-added.
    without_metadata : list of str
        Image ids indexed without a row in the metadata CSV (their metadata columns are null).
    rows : int
        Committed rows in the store after the run.
    seconds : float
        Wall time.
    """

    indexed: int = 0
    already_indexed: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    previously_deleted: list[str] = field(default_factory=list)
    without_metadata: list[str] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "indexed": self.indexed,
            "already_indexed": self.already_indexed,
            "duplicates": [{"path": p, "same_as": q} for p, q in self.duplicates],
            "rejected": [{"path": p, "reason": r} for p, r in self.rejected],
            "previously_deleted": list(self.previously_deleted),
            "without_metadata": list(self.without_metadata),
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
        }


def _open_or_create(
    store: Path,
    *,
    preset: str | None,
    weights: str | os.PathLike | None,
    backbone_weights: str | os.PathLike | None,
    pretrained: bool,
) -> tuple[StoreWriter, DermrisModel]:
    if store_exists(store):
        writer = StoreWriter.open(store)
        log.info("extending %s (%d rows, preset %s)", store, writer.rows, writer.model_config.name)
        try:
            stored = writer.model_config
            if preset is not None and preset != stored.name:
                raise StoreMismatchError(
                    f"{store} was built with preset {stored.name!r}, not {preset!r}; use another store path"
                )
            model = writer.load_model()
            if weights is not None:
                writer.check_model(load_model(weights))
            return writer, model
        except BaseException:
            writer.close()
            raise
    if weights is not None:
        model = load_model(weights)
    else:
        model = build_model(get_preset(preset or "tiny"), backbone_weights=backbone_weights, pretrained=pretrained)
    writer = StoreWriter.create(store, model_config=model.config, style_layout=model.style_layout, model=model)
    log.info("created %s (preset %s, %s x %s at %d px)", store, model.config.name, model.config.members,
             model.config.backbone, model.config.image_size)
    return writer, model


def index_folder(
    images: str | os.PathLike,
    store: str | os.PathLike,
    *,
    preset: str | None = None,
    weights: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    metadata: str | os.PathLike | None = None,
    id_column: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
    commit_every: int = 256,
    sketch_dim: int = 256,
    progress: bool = True,
) -> IndexReport:
    """Index every image under ``images`` into ``store`` (created if absent).

    Parameters
    ----------
    images : path-like
        Folder walked recursively for jpg, png, bmp and tif files.
    store : path-like
        Store directory; an existing store is extended with the images it does not hold.
    preset : str, optional
        Model preset for a new store (default ``"tiny"``); must match an existing store's.
    weights : path-like, optional
        A dermris weights file (overrides ``preset``).
    backbone_weights : path-like, optional
        A local timm checkpoint loaded into every ensemble member.
    pretrained : bool
        Use timm's hub weights (network).
    metadata : path-like, optional
        CSV with one row per image; joined on ``id_column`` = file stem.
    id_column : str, optional
        Id column of the CSV (default: isic_id, image_name, image_id or image).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    batch_size : int
        Images per forward pass.
    commit_every : int
        Rows per commit (Parquet part + manifest rewrite).
    sketch_dim : int
        Dimension of the style sketch the retriever bounds style losses with.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    IndexReport
    """
    started = time.perf_counter()
    if commit_every < 1:
        raise ValueError("commit_every must be >= 1")
    files = list_images(images)
    table = MetadataTable(metadata, id_column=id_column) if metadata is not None else None
    torch_device = resolve_device(device)
    writer, model = _open_or_create(Path(store), preset=preset, weights=weights,
                                    backbone_weights=backbone_weights, pretrained=pretrained)
    try:
        return _run(writer, model, files, table, torch_device, batch_size, commit_every, sketch_dim, progress, started)
    finally:
        writer.close()


def _run(writer, model, files, table, torch_device, batch_size, commit_every, sketch_dim, progress, started) -> IndexReport:
    embedder = Embedder(model, device=torch_device, batch_size=batch_size)
    report = IndexReport()
    committed = writer.committed_metadata(["image_id", "sha256", "path"])
    known_sha = set(committed.column("sha256").to_pylist())
    purged_sha = writer.removed_sha256
    seen_ids = dict(zip(committed.column("image_id").to_pylist(), committed.column("path").to_pylist()))
    seen_sha: dict[str, str] = {}
    to_embed: list[DecodedImage] = []
    buffered: list[tuple[list[DecodedImage], Embeddings]] = []
    rejected_since_commit: list[tuple[str, str]] = []

    def embed_pending() -> None:
        if to_embed:
            buffered.append((list(to_embed), embedder.embed([d.image for d in to_embed])))
            to_embed.clear()

    def commit() -> None:
        embed_pending()
        if buffered:
            items = [d for chunk, _ in buffered for d in chunk]
            records = pa.table({
                "image_id": pa.array([d.file.image_id for d in items], pa.string()),
                "path": pa.array([str(d.file.path) for d in items], pa.string()),
                "sha256": pa.array([d.sha256 for d in items], pa.string()),
                "width": pa.array([d.width for d in items], pa.int32()),
                "height": pa.array([d.height for d in items], pa.int32()),
            })
            if table is not None:
                report.without_metadata += [d.file.image_id for d in items if d.file.image_id not in table]
                extra = table.rows_for([d.file.image_id for d in items])
                for name in extra.column_names:
                    records = records.append_column(name, extra.column(name))
            writer.append(
                features=np.concatenate([e.features for _, e in buffered]),
                style=np.concatenate([e.style for _, e in buffered]),
                masks=np.concatenate([e.masks for _, e in buffered]),
                records=records,
            )
            report.indexed += len(items)
            buffered.clear()
        writer.record_rejected(rejected_since_commit)
        rejected_since_commit.clear()

    bar = tqdm(total=len(files), desc="indexing", unit="img", file=sys.stderr, disable=not progress)
    draft = 2 * model.config.image_size
    for item in read_images(files, draft_size=draft):
        bar.update(1)
        if isinstance(item, Rejected):
            report.rejected.append((item.path, item.reason))
            rejected_since_commit.append((item.path, item.reason))
            continue
        path = str(item.file.path)
        if item.sha256 in purged_sha:
            report.previously_deleted.append(path)
            continue
        if item.sha256 in known_sha:
            report.already_indexed += 1
            continue
        if item.sha256 in seen_sha:
            report.duplicates.append((path, seen_sha[item.sha256]))
            rejected_since_commit.append((path, f"same bytes as {seen_sha[item.sha256]}"))
            continue
        if item.file.image_id in seen_ids:
            reason = f"image id {item.file.image_id!r} already used by {seen_ids[item.file.image_id]}"
            report.rejected.append((path, reason))
            rejected_since_commit.append((path, reason))
            continue
        seen_sha[item.sha256] = path
        seen_ids[item.file.image_id] = path
        to_embed.append(item)
        if len(to_embed) >= batch_size:
            embed_pending()
        if sum(len(e) for _, e in buffered) >= commit_every:
            commit()
    commit()
    bar.close()
    if report.indexed or not writer.has_faiss:
        writer.build_faiss()
    writer.update_sketch(dim=sketch_dim)
    report.rows = writer.rows
    report.seconds = time.perf_counter() - started
    return report
