"""Index a folder of images into a store: reader -> mapper -> writer, as a pipeline.

* **Reader**: worker processes read, hash, decode and resize files (:mod:`.loader`), in order.
* **Mapper**: this thread runs the model on each batch (:mod:`.embed`); on CUDA the pixels
  arrive pinned and are copied asynchronously, and the style vectors are encoded to the
  store's float16 form on the device.
* **Writer**: a thread of its own commits rows every ``commit_every`` images
  (:class:`~.store.StoreWriter`), so the model never waits for the disk.

Rows are committed in file order, so a rerun gives the same store; an interrupted run keeps what
it has committed, and running the same command again skips every image already in the store
(matched by the sha256 of its bytes, before decoding) and goes on.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from dermris.models import DermrisModel, build_model, get_preset, load_model
from dermris.models.errors import DataError, StoreMismatchError

from .embed import Embedder, resolve_device
from .loader import ImageLoader
from .sources import IMAGE_EXTENSIONS, LoadedImage, MetadataTable, list_images
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
    stages : dict of str to float
        Seconds per stage: ``read_wait`` (the model waiting for decoded batches), ``model``
        (forward passes and copies back), ``write`` (the writer thread, overlapped with the
        model), ``derived`` (FAISS and style sketch at the end), ``setup`` (model and store).
    device, precision : str
        Where and at what precision the model ran.
    """

    indexed: int = 0
    already_indexed: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    previously_deleted: list[str] = field(default_factory=list)
    without_metadata: list[str] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    device: str = ""
    precision: str = ""

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
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
            "device": self.device,
            "precision": self.precision,
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
    workers: int | None = None,
    precision: str = "auto",
    compile: bool = False,
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
    workers : int, optional
        Decoding processes (default: all cores but one, at most 16; 0 decodes in this process).
    precision : str
        ``auto`` (float32), ``float32``, ``tf32``, ``bfloat16`` or ``float16`` (the last three on
        CUDA only; see :data:`~.embed.PRECISIONS`).
    compile : bool
        ``torch.compile`` the model (CUDA; minutes of start-up, faster on long runs).
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    IndexReport
    """
    started = time.perf_counter()
    if commit_every < 1 or batch_size < 1:
        raise ValueError("commit_every and batch_size must be >= 1")
    files = list_images(images)
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) under {images}")
    table = MetadataTable(metadata, id_column=id_column) if metadata is not None else None
    torch_device = resolve_device(device)
    writer, model = _open_or_create(Path(store), preset=preset, weights=weights,
                                    backbone_weights=backbone_weights, pretrained=pretrained)
    try:
        embedder = Embedder(model, device=torch_device, batch_size=batch_size, precision=precision, compile=compile)
        report = IndexReport(device=str(torch_device), precision=embedder.precision)
        report.stages["setup"] = time.perf_counter() - started
        _run(writer, embedder, files, table, report, commit_every=commit_every, workers=workers,
             progress=progress)
        t = time.perf_counter()
        if report.indexed or not writer.has_faiss:
            writer.build_faiss()
        writer.update_sketch(dim=sketch_dim, device=torch_device)
        report.stages["derived"] = time.perf_counter() - t
        report.rows = writer.rows
        report.seconds = time.perf_counter() - started
        log.info("indexed %d images in %.1f s (%s)", report.indexed, report.seconds,
                 ", ".join(f"{k} {v:.1f} s" for k, v in report.stages.items()))
        return report
    finally:
        writer.close()


def _printable(path: str) -> str:
    """A path as text that can be printed and written to JSON (undecodable bytes escaped)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class _Chunk:
    """What the model made of one batch, on its way to the writer."""

    items: list[LoadedImage]
    features: np.ndarray | None = None
    style: np.ndarray | None = None
    masks: np.ndarray | None = None
    encoded: bool = False
    clipped: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


class _Committer:
    """The writer stage on its own thread: gathers chunks and commits every ``commit_every`` rows."""

    def __init__(self, writer: StoreWriter, table: MetadataTable | None, report: IndexReport,
                 commit_every: int) -> None:
        self.writer = writer
        self.table = table
        self.report = report
        self.commit_every = commit_every
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._aborted = False
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._loop, name="dermris-writer", daemon=True)
        self._thread.start()

    def put(self, chunk: _Chunk) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(chunk, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Commit what is left and stop; re-raise a writer error in the caller."""
        if self._thread.is_alive():
            self.put(None)  # type: ignore[arg-type]
            self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop without committing what is pending (the run failed); waits for a commit in flight."""
        self._aborted = True
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self._queue.put(None, timeout=0.1)
            except queue.Full:
                pass
            self._thread.join(timeout=0.5)

    def _loop(self) -> None:
        pending: list[_Chunk] = []
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        try:
            while True:
                chunk = self._queue.get()
                if self._aborted:
                    return
                if chunk is None:
                    break
                pending.append(chunk)
                if sum(len(c) for c in pending) >= self.commit_every:
                    self._commit(pending)
                    pending = []
            self._commit(pending)
        except BaseException as exc:  # handed to the main thread
            self.error = exc

    def _commit(self, chunks: list[_Chunk]) -> None:
        started = time.perf_counter()
        rejected = [r for c in chunks for r in c.rejected]
        chunks = [c for c in chunks if len(c)]
        if chunks:
            items = [it for c in chunks for it in c.items]
            records = pa.table({
                "image_id": pa.array([it.file.image_id for it in items], pa.string()),
                "path": pa.array([str(it.file.path) for it in items], pa.string()),
                "sha256": pa.array([it.sha256 for it in items], pa.string()),
                "width": pa.array([it.width for it in items], pa.int32()),
                "height": pa.array([it.height for it in items], pa.int32()),
            })
            if self.table is not None:
                ids = [it.file.image_id for it in items]
                self.report.without_metadata += [i for i in ids if i not in self.table]
                extra = self.table.rows_for(ids)
                for name in extra.column_names:
                    records = records.append_column(name, extra.column(name))
            features = np.concatenate([c.features for c in chunks])
            masks = np.concatenate([c.masks for c in chunks])
            style = np.concatenate([c.style for c in chunks])
            if all(c.encoded for c in chunks):
                self.writer.append(features=features, encoded_style=style, masks=masks, records=records,
                                   clipped=sum(c.clipped for c in chunks))
            else:
                self.writer.append(features=features, style=style, masks=masks, records=records)
            self.report.indexed += len(items)
        self.writer.record_rejected(rejected)
        self.seconds += time.perf_counter() - started


def _run(writer: StoreWriter, embedder: Embedder, files, table, report: IndexReport, *, commit_every: int,
         workers: int | None, progress: bool) -> None:
    # metadata columns are agreed on before any image is embedded (a mismatch fails now)
    _, missing = writer.prepare_metadata(table.schema if table is not None else None)
    if missing and writer.rows:
        log.warning("%d metadata columns of the store are not in %s; new rows get nulls there: %s",
                    len(missing), "the CSV" if table is not None else "this run (no --metadata)",
                    ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    committed = writer.committed_metadata(["image_id", "sha256", "path"])
    known_sha = set(committed.column("sha256").to_pylist())
    purged_sha = set(writer.removed_sha256)
    seen_ids = dict(zip(committed.column("image_id").to_pylist(), committed.column("path").to_pylist()))
    seen_sha: dict[str, str] = {}
    device = embedder.device
    loader = ImageLoader(files, size=embedder.image_size, batch_size=embedder.batch_size, workers=workers,
                         skip_sha256=known_sha | purged_sha, pin_memory=device.type == "cuda")
    encoder = writer.codec.torch_encoder(device) if writer.codec is not None else None
    batches = iter(loader)  # worker processes start here, before the writer thread exists
    committer = _Committer(writer, table, report, commit_every)
    bar = tqdm(total=len(files), desc="indexing", unit="img", file=sys.stderr, disable=not progress)
    read_wait = model_s = 0.0
    try:
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            read_wait += time.perf_counter() - t
            if batch is None:
                break
            chunk = _Chunk(items=[])
            keep = []
            position = -1
            for item in batch.items:
                path = _printable(str(item.file.path))
                if item.status == "ok":
                    position += 1
                if item.status == "rejected":
                    report.rejected.append((path, item.reason or "rejected"))
                    chunk.rejected.append((path, item.reason or "rejected"))
                elif item.status == "known":
                    if item.sha256 in purged_sha:
                        report.previously_deleted.append(path)
                    else:
                        report.already_indexed += 1
                elif item.sha256 in seen_sha:
                    report.duplicates.append((path, seen_sha[item.sha256]))
                    chunk.rejected.append((path, f"same bytes as {seen_sha[item.sha256]}"))
                elif item.file.image_id in seen_ids:
                    reason = f"image id {item.file.image_id!r} already used by {seen_ids[item.file.image_id]}"
                    report.rejected.append((path, reason))
                    chunk.rejected.append((path, reason))
                else:
                    seen_sha[item.sha256] = path
                    seen_ids[item.file.image_id] = path
                    chunk.items.append(item)
                    keep.append(position)
            if keep:
                t = time.perf_counter()
                pixels = batch.pixels if len(keep) == len(batch.pixels) else batch.pixels[keep]
                features, style, masks, clipped = embedder.forward_pixels(pixels, encoder=encoder)
                if encoder is None:  # the first rows of a new store fix its float16 scales
                    encoder = writer.fit_codec(style.cpu().numpy()).torch_encoder(device)
                    style, clipped = encoder(style)
                chunk.features = features.cpu().numpy()
                chunk.style = style.cpu().numpy()
                chunk.masks = masks.cpu().numpy()
                chunk.encoded, chunk.clipped = True, clipped
                model_s += time.perf_counter() - t
            committer.put(chunk)
            bar.update(len(batch.items))
        committer.close()
    except BaseException:
        committer.abort()
        raise
    finally:
        bar.close()
    report.stages.update(read_wait=read_wait, model=model_s, write=committer.seconds)
