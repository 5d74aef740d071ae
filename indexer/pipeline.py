"""Index a folder of images into a store: reader -> mapper -> writer, as a pipeline.

* **Reader**: worker processes read, hash, decode and resize files (:mod:`.loader`), in order.
* **Mapper**: this thread runs the model on each batch (:mod:`.embed`); on CUDA the pixels
  arrive pinned and are copied asynchronously, and the style vectors are encoded to the
  store's float16 form on the device.
* **Writer**: a thread of its own commits rows every ``commit_every`` images, or every
  ``commit_seconds`` (:class:`~.store.StoreWriter`), so the model never waits for the disk.

Rows are committed in file order, so a rerun gives the same store; an interrupted run keeps what
it has committed, and running the same command again skips every image already in the store
(matched by the sha256 of its bytes, before decoding) and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dermris.core.errors import ConfigError, DataError, StoreMismatchError
from dermris.models import DermrisModel, build_model, get_preset, load_model

from .commit import Admission, Chunk, Committer
from .embed import Embedder, resolve_device, resolve_precision
from .loader import ImageLoader
from .progress import StageProgress
from .report import IndexReport
from .sources import IMAGE_EXTENSIONS, MetadataTable, list_images
from .store import StoreWriter, store_exists

__all__ = ["IndexReport", "index_folder", "UNTRAINED_SEGMENTER"]

log = logging.getLogger(__name__)

UNTRAINED_SEGMENTER = (
    "masks come from an untrained segmenter: the Dice part of the i1_ed, i1_cd, i1_ecd and "
    "i1_sd measures is meaningless until you train one (dermris train segmenter --images "
    "IMAGES --masks MASKS --out seg.safetensors, then index into a new store with --weights "
    "seg.safetensors; see docs/models.md)"
)
"""The warning of a store whose masks come from an untrained segmenter."""


def _open_or_create(
    store: Path,
    *,
    preset: str | None,
    weights: str | os.PathLike | None,
    backbone_weights: str | os.PathLike | None,
    pretrained: bool,
    need_model: bool = True,
    stage: StageProgress | None = None,
) -> tuple[StoreWriter, DermrisModel | None]:
    """The store's writer, and its model (None for an existing store when ``need_model`` is
    False: cluster workers load the model from the store themselves)."""
    if store_exists(store):
        writer = StoreWriter.open(store)
        log.info("extending %s (%d rows, preset %s)", store, writer.rows, writer.model_config.name)
        try:
            stored = writer.model_config
            if preset is not None and preset != stored.name:
                raise StoreMismatchError(
                    f"{store} was built with preset {stored.name!r}, not {preset!r}; "
                    "use another store path"
                )
            model = writer.load_model(progress=stage) if need_model or weights is not None else None
            if weights is not None:
                writer.check_model(load_model(weights, progress=stage))
            return writer, model
        except BaseException:
            writer.close()
            raise
    if weights is not None:
        model = load_model(weights, progress=stage)
    else:
        model = build_model(
            get_preset(preset or "tiny"),
            backbone_weights=backbone_weights,
            pretrained=pretrained,
            progress=stage,
        )
    writer = StoreWriter.create(
        store, model_config=model.config, style_layout=model.style_layout, model=model
    )
    log.info(
        "created %s (preset %s, %s x %s at %d px)",
        store,
        model.config.name,
        model.config.members,
        model.config.backbone,
        model.config.image_size,
    )
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
    commit_seconds: float = 30.0,
    sketch_dim: int = 256,
    workers: int | None = None,
    precision: str = "auto",
    compile: bool = False,
    progress: bool = True,
    cluster=None,
    block_size: int | None = None,
    faiss_files: bool = False,
    setup_progress: StageProgress | None = None,
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
    commit_seconds : float
        Also commit what is ready when this many seconds have passed since the last commit,
        so an interrupted run keeps its work. On ``KeyboardInterrupt`` the rows already
        embedded are committed before the exception propagates; running the same call again
        resumes.
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
    cluster : str, ClusterSpec, distributed.Client or Dask cluster, optional
        Embed on a Dask cluster (:mod:`.coordinator`): ``"local[:N]"``, ``"cuda[:N]"``, a
        scheduler address ``"tcp://HOST:PORT"``, a scheduler file ``*.json``, or a client or
        cluster object. None (the default) runs in this process. ``device``, ``precision``,
        ``batch_size`` and ``compile`` then apply on every worker; ``workers`` does not.
    block_size : int, optional
        Files per Dask task (default: a multiple of the store's style shard rows, smaller when
        there are few files for the workers). Only with ``cluster``.
    faiss_files : bool
        Keep FAISS files of the features in the store (``faiss/``, for other tools; the
        retriever builds its own indexes). Once asked, every later run appends the new rows as
        a new part.
    setup_progress : StageProgress, optional
        The bar of the model stage (building or loading the model, BatchNorm calibration);
        default: a new one when ``progress``. Closed once the model is ready.

    Returns
    -------
    IndexReport
    """
    started = time.perf_counter()
    if commit_every < 1 or batch_size < 1:
        raise ValueError("commit_every and batch_size must be >= 1")
    if not commit_seconds > 0:
        raise ValueError("commit_seconds must be > 0")
    stage = setup_progress if setup_progress is not None else StageProgress(enabled=progress)
    try:
        return _index_folder(
            images,
            store,
            preset=preset,
            weights=weights,
            backbone_weights=backbone_weights,
            pretrained=pretrained,
            metadata=metadata,
            id_column=id_column,
            device=device,
            batch_size=batch_size,
            commit_every=commit_every,
            commit_seconds=commit_seconds,
            sketch_dim=sketch_dim,
            workers=workers,
            precision=precision,
            compile=compile,
            progress=progress,
            cluster=cluster,
            block_size=block_size,
            faiss_files=faiss_files,
            stage=stage,
            started=started,
        )
    finally:
        stage.close()


def _index_folder(
    images,
    store,
    *,
    preset,
    weights,
    backbone_weights,
    pretrained,
    metadata,
    id_column,
    device,
    batch_size,
    commit_every,
    commit_seconds,
    sketch_dim,
    workers,
    precision,
    compile,
    progress,
    cluster,
    block_size,
    faiss_files,
    stage: StageProgress,
    started: float,
) -> IndexReport:
    files = list_images(images)
    if not files:
        raise DataError(
            f"no image files ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) under {images}"
        )
    table = MetadataTable(metadata, id_column=id_column) if metadata is not None else None
    if cluster is not None:
        if block_size is not None and block_size < 1:
            raise ValueError("block_size must be >= 1")
        resolve_precision(precision, torch.device("cpu"))
        torch_device = _client_device(device)
    else:
        torch_device = resolve_device(device)
    writer = None
    try:
        with contextlib.ExitStack() as on_cluster:
            session = None
            if cluster is not None:  # reached (or started) before the store is touched
                from .cluster import connect

                t = time.perf_counter()
                session = on_cluster.enter_context(connect(cluster))
                connect_s = time.perf_counter() - t
            writer, model = _open_or_create(
                Path(store),
                preset=preset,
                weights=weights,
                backbone_weights=backbone_weights,
                pretrained=pretrained,
                need_model=session is None,
                stage=stage,
            )
            trained = bool(writer.manifest.model.segmenter_trained)
            if session is not None:
                from .blocks import ModelSettings
                from .coordinator import ClusterRun, index_on_cluster

                del model  # the workers load the store's copy
                _started(stage, trained)
                report = IndexReport()
                report.stages["setup"] = time.perf_counter() - started - connect_s
                settings = ModelSettings(
                    device=device, precision=precision, batch_size=batch_size, compile=compile
                )
                index_on_cluster(
                    writer,
                    files,
                    table,
                    report,
                    session=session,
                    progress=progress,
                    run=ClusterRun(
                        images=os.path.abspath(images),
                        model=settings,
                        block_size=block_size,
                        commit_every=commit_every,
                        commit_seconds=commit_seconds,
                    ),
                )
                report.stages["cluster"] += connect_s
            else:
                assert model is not None  # need_model was True
                embedder = Embedder(
                    model,
                    device=torch_device,
                    batch_size=batch_size,
                    precision=precision,
                    compile=compile,
                )
                report = IndexReport(device=str(torch_device), precision=embedder.precision)
                report.stages["setup"] = time.perf_counter() - started
                _started(stage, trained)
                _run(
                    writer,
                    embedder,
                    files,
                    table,
                    report,
                    commit_every=commit_every,
                    commit_seconds=commit_seconds,
                    workers=workers,
                    progress=progress,
                )
        report.segmenter_trained = trained
        t = time.perf_counter()
        writer.update_faiss_files(enable=faiss_files)  # only when asked (now, or once before)
        writer.update_sketch(dim=sketch_dim, device=torch_device)
        report.stages["derived"] = time.perf_counter() - t
        report.rows = writer.rows
        report.seconds = time.perf_counter() - started
        log.info(
            "indexed %d images in %.1f s (%s)",
            report.indexed,
            report.seconds,
            ", ".join(f"{k} {v:.1f} s" for k, v in report.stages.items()),
        )
        return report
    finally:
        if writer is not None:
            writer.close()


def _started(stage: StageProgress, segmenter_trained: bool) -> None:
    """The model is ready: end its stage's bar, and warn of an untrained segmenter."""
    stage.close()
    if not segmenter_trained:
        log.warning(UNTRAINED_SEGMENTER)


def _client_device(device: str):
    """Where this process builds the derived data when the model runs on a cluster's workers:
    ``device`` names the workers' device, which this machine may not have (then the CPU)."""
    try:
        return resolve_device(device)
    except ConfigError:
        if device == "cuda" or device.startswith("cuda:"):
            return torch.device("cpu")
        raise


def _run(
    writer: StoreWriter,
    embedder: Embedder,
    files,
    table,
    report: IndexReport,
    *,
    commit_every: int,
    commit_seconds: float,
    workers: int | None,
    progress: bool,
) -> None:
    admission = Admission(writer, table, report)
    device = embedder.device
    loader = ImageLoader(
        files,
        size=embedder.image_size,
        batch_size=embedder.batch_size,
        workers=workers,
        skip_sha256=admission.skip_sha256,
        pin_memory=device.type == "cuda",
    )
    encoder = writer.codec.torch_encoder(device) if writer.codec is not None else None
    batches = iter(loader)  # worker processes start here, before the writer thread exists
    committer = Committer(writer, table, report, commit_every, commit_seconds=commit_seconds)
    bar = tqdm(total=len(files), desc="indexing", unit="img", file=sys.stderr, disable=not progress)
    read_wait = model_s = 0.0
    try:
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            read_wait += time.perf_counter() - t
            if batch is None:
                break
            chunk = Chunk(items=[])
            keep = admission.admit_all(batch.items, chunk)
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
    except KeyboardInterrupt:
        _keep_on_interrupt(committer)
        raise
    except BaseException:
        committer.abort()
        raise
    finally:
        bar.close()
    report.stages.update(read_wait=read_wait, model=model_s, write=committer.seconds)


def _keep_on_interrupt(committer: Committer) -> None:
    """Commit the rows already embedded (Ctrl-C); a second interrupt or an error drops them."""
    try:
        committer.close()
    except BaseException:
        committer.abort()
