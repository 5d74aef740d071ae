"""The work of one Dask task: a block of image files -> model outputs (runs on a worker).

:func:`embed_block` is a pure function of its arguments: it reads, hashes, decodes and embeds
the files of one block with the store's model and returns everything in memory, style vectors
already in the store's float16 form and masks bit-packed as the store keeps them. It writes
nothing, so a block that runs twice (a worker died, Dask retried it) gives the same result and
the coordinator (:mod:`.coordinator`) commits it once.

Each worker process loads the model once, from the store's ``model.safetensors`` (checked
against the manifest's sha256; safetensors, nothing is unpickled), and keeps it for every block
it runs. The store and the images must be at the same paths on every worker (a shared file
system).
"""

from __future__ import annotations

import collections
import functools
import os
import platform
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermris.core.errors import ClusterError

from .sources import ImageFile, LoadedImage, decoded_pixels, load_image
from .store import StyleCodec

__all__ = [
    "BlockOptions",
    "BlockResult",
    "ModelSettings",
    "embed_block",
    "first_batch_style",
    "warm_up",
]


@dataclass(frozen=True)
class ModelSettings:
    """How a worker runs the model: as in :func:`~dermris.indexer.index_folder`, resolved on each
    worker (``device="auto"``: its GPU when it has one)."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 16
    compile: bool = False


@dataclass(frozen=True)
class BlockOptions:
    """What every block of a run shares (travels with each task; small).

    Attributes
    ----------
    model_file : str
        The store's model file (safetensors), at a path every worker can read.
    model_sha256 : str, optional
        Its sha256 from the manifest, checked once per worker.
    images : str
        The indexed folder (checked on the worker, for a clear error without a shared file system).
    model : ModelSettings
        Device, precision, batch size, compilation.
    torch_threads : int, optional
        Torch threads per worker (None: leave the worker's setting).
    codec : StyleCodec, optional
        The store's float16 codec; None returns float32 style vectors (before the codec exists).
    """

    model_file: str
    model_sha256: str | None
    images: str
    model: ModelSettings = ModelSettings()
    torch_threads: int | None = None
    codec: StyleCodec | None = None


@dataclass
class BlockResult:
    """What a block gave: every file with its status, and the rows of the decodable ones.

    Attributes
    ----------
    index : int
        The block's number (its place in row order).
    items : list of LoadedImage
        Every file of the block, in order, with status, sha256, size and reject reason (no pixels).
    features : np.ndarray
        ``(n_ok, F)`` float32, one row per item whose status is ``"ok"``, in order.
    style : np.ndarray
        ``(n_ok, D)``: encoded with ``options.codec`` (``encoded``), else float32.
    masks : np.ndarray
        ``(n_ok, ceil(S*S/8))`` uint8, bit-packed (row-major, numpy's bit order).
    clipped : np.ndarray
        ``(n_ok,)`` style values each row's encoding clipped to float16's range.
    encoded : bool
        Whether ``style`` is in the store's stored form.
    device, precision : str
        Where and how the model ran.
    worker : str
        ``host:pid`` of the process that ran the block.
    seconds : float
        Time spent in the task.
    """

    index: int
    items: list[LoadedImage]
    features: np.ndarray
    style: np.ndarray
    masks: np.ndarray
    clipped: np.ndarray
    encoded: bool
    device: str
    precision: str
    worker: str
    seconds: float


# -- the model, once per worker process -----------------------------------------------------
_EMBEDDERS: dict[tuple, object] = {}
_LOCK = threading.Lock()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold (64-bit)


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _restore_malloc() -> bool:
    """Undo the malloc setting Dask gives its workers, for torch's sake (glibc only).

    A Dask nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory back
    to the system), which also freezes glibc's mmap threshold at 128 KiB: every activation
    tensor is then mapped and unmapped anew, and the tiny model ran 2.4x slower on a worker than
    in one process. Raising both thresholds to glibc's own dynamic ceiling restores the speed.
    Returns whether anything was changed.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False


def _embedder(options: BlockOptions):
    """The :class:`~.embed.Embedder` for ``options``, loaded once per process and kept."""
    key = (options.model_file, options.model_sha256, options.model, options.torch_threads)
    with _LOCK:
        embedder = _EMBEDDERS.get(key)
        if embedder is not None:
            return embedder
        import torch

        from dermris.core.hashing import file_sha256
        from dermris.models.weights import load_model

        from .embed import Embedder, resolve_device

        path = Path(options.model_file)
        if not path.is_file():
            raise ClusterError(
                f"worker {_where()} cannot read the model file {path}: the store must be on a file "
                "system every worker sees at the same path"
            )
        if options.model_sha256 and file_sha256(path) != options.model_sha256:
            raise ClusterError(
                f"worker {_where()}: {path} does not match the sha256 in the store's manifest"
            )
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        _restore_malloc()
        settings = options.model
        embedder = Embedder(
            load_model(path),
            device=resolve_device(settings.device),
            batch_size=settings.batch_size,
            precision=settings.precision,
            compile=settings.compile,
        )
        _EMBEDDERS.clear()  # one model per worker: a new run's model replaces the last one
        _EMBEDDERS[key] = embedder
        return embedder


def warm_up(options: BlockOptions) -> str:
    """Load the model on this worker (before the first block); returns its device and precision."""
    embedder = _embedder(options)
    return f"{embedder.device} {embedder.precision}"


# -- reading ---------------------------------------------------------------------------------
def _decode_threads(device_type: str) -> int:
    """Reader threads next to the model: one on the CPU (the model has the cores); on a GPU the
    cores this process may use shared among the GPUs it sees (dask-cuda shows each worker every
    GPU of its machine, its own first), 8 at most."""
    if device_type != "cuda":
        return 1
    import torch

    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(8, cores // max(1, torch.cuda.device_count())))


def _batches(
    files: Sequence[ImageFile],
    *,
    size: int,
    batch_size: int,
    skip_sha256: frozenset[str],
    threads: int,
) -> Iterator[list[LoadedImage]]:
    """Read, hash, decode and resize ``files`` in threads (PIL and hashlib release the GIL).

    They are read a bounded number of files ahead of the model and yielded in order,
    ``batch_size`` at a time.
    """
    load = functools.partial(load_image, size=size, skip_sha256=skip_sha256)
    ahead = max(2 * batch_size, threads)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dermris-read") as pool:
        pending: collections.deque = collections.deque()
        queued = iter(files)
        batch: list[LoadedImage] = []
        while True:
            for file in queued:
                pending.append(pool.submit(load, file))
                if len(pending) >= ahead:
                    break
            if not pending:
                break
            batch.append(pending.popleft().result())
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _check_images(options: BlockOptions) -> None:
    if not Path(options.images).is_dir():
        raise ClusterError(
            f"worker {_where()} cannot see the image folder {options.images}: "
            "workers need the images and the store at the same paths as the machine that runs "
            "`dermris index`"
        )


# -- the tasks ------------------------------------------------------------------------------
def embed_block(
    index: int,
    files: Sequence[ImageFile],
    options: BlockOptions,
    skip_sha256: frozenset[str] = frozenset(),
) -> BlockResult:
    """Embed one block of files (a Dask task; pure: it writes nothing).

    Parameters
    ----------
    index : int
        The block's number.
    files : sequence of ImageFile
        The block's files, in row order.
    options : BlockOptions
        The run's model and settings.
    skip_sha256 : frozenset of str
        Bytes in the store already or deleted from it: hashed, not decoded (``status == "known"``).

    Returns
    -------
    BlockResult
    """
    import torch

    started = time.perf_counter()
    _check_images(options)
    embedder = _embedder(options)
    device = embedder.device
    encoder = (
        options.codec.torch_encoder(device, per_row=True) if options.codec is not None else None
    )
    items: list[LoadedImage] = []
    feats, styles, masks, clipped = [], [], [], []
    for batch in _batches(
        files,
        size=embedder.image_size,
        batch_size=embedder.batch_size,
        skip_sha256=skip_sha256,
        threads=_decode_threads(device.type),
    ):
        ok = [it for it in batch if it.status == "ok"]
        if ok:
            pixels = torch.from_numpy(np.stack(decoded_pixels(ok)))
            if device.type == "cuda":
                pixels = pixels.pin_memory()
            f, s, m, c = embedder.forward_pixels(pixels, encoder=encoder)
            feats.append(f.cpu().numpy())
            styles.append(s.cpu().numpy())
            masks.append(np.packbits(m.cpu().numpy().reshape(len(ok), -1), axis=1))
            clipped.append(c.cpu().numpy() if encoder is not None else np.zeros(len(ok), np.int64))
        for it in batch:
            it.pixels = None
        items += batch
    config = embedder.model.config
    if not feats:
        mask_bytes = (config.mask_size * config.mask_size + 7) // 8
        dtype = options.codec.dtype if options.codec is not None else "float32"
        feats = [np.zeros((0, config.feature_dim), np.float32)]
        styles = [np.zeros((0, embedder.model.style_layout.dim), dtype)]
        masks = [np.zeros((0, mask_bytes), np.uint8)]
        clipped = [np.zeros(0, np.int64)]
    return BlockResult(
        index=index,
        items=items,
        features=np.concatenate(feats),
        style=np.concatenate(styles),
        masks=np.concatenate(masks),
        clipped=np.concatenate(clipped).astype(np.int64),
        encoded=encoder is not None,
        device=str(device),
        precision=embedder.precision,
        worker=_where(),
        seconds=time.perf_counter() - started,
    )


def first_batch_style(
    files: Sequence[ImageFile], options: BlockOptions, skip_sha256: frozenset[str] = frozenset()
) -> np.ndarray | None:
    """Float32 style vectors of the first batch of ``files`` that holds a decodable image (a Dask
    task): what a new store's float16 codec is fitted on, as in one process. None if no file in
    ``files`` decodes."""
    _check_images(options)
    embedder = _embedder(options)
    import torch

    for batch in _batches(
        files,
        size=embedder.image_size,
        batch_size=embedder.batch_size,
        skip_sha256=skip_sha256,
        threads=_decode_threads(embedder.device.type),
    ):
        ok = decoded_pixels(batch)
        if ok:
            _, style, _, _ = embedder.forward_pixels(torch.from_numpy(np.stack(ok)))
            return style.cpu().numpy()
    return None
