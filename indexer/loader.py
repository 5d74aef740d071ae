"""Parallel reading: files -> batches of model-ready pixels, in worker processes.

A :class:`torch.utils.data.DataLoader` runs :func:`~.sources.load_image` (read, hash, decode,
resize) in ``workers`` processes and hands back batches in file order, so the rows a run
writes are deterministic. Batches carry uint8 pixels (4x smaller than float input), pinned for
asynchronous copies when the model runs on CUDA; normalisation happens on the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dermris.core.imageio import MAX_FILE_BYTES

from .sources import ImageFile, LoadedImage, decoded_pixels, load_image

__all__ = ["LoadedBatch", "ImageLoader", "default_workers"]


def default_workers() -> int:
    """Decoding processes to use: every core but one for the model's own threads, at most 16."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(16, cores - 1))


@dataclass
class LoadedBatch:
    """A batch of files after the reader stage.

    Attributes
    ----------
    items : list of LoadedImage
        Every file of the batch, in order, whatever its status (pixels dropped).
    pixels : torch.Tensor
        ``(n_ok, S, S, 3)`` uint8: the pixels of the items whose status is ``"ok"``, in order.
    """

    items: list[LoadedImage]
    pixels: torch.Tensor

    def pin_memory(self) -> "LoadedBatch":
        """Pinned copy of the pixels (called by the DataLoader's pinning thread)."""
        return LoadedBatch(self.items, self.pixels.pin_memory())


def _collate(items: list[LoadedImage]) -> LoadedBatch:
    ok = decoded_pixels(items)
    if ok:
        pixels = torch.from_numpy(np.stack(ok))
    else:
        pixels = torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
    for it in items:
        it.pixels = None
    return LoadedBatch(items, pixels)


def _forkserver():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is single-threaded; leave the cores to the model
    try:
        os.nice(5)  # decoding runs ahead (prefetch): where cores are scarce, the model goes first
    except OSError:
        pass


class _Files(torch.utils.data.Dataset):
    def __init__(
        self,
        files: Sequence[ImageFile],
        size: int,
        draft_size: int | None,
        skip_sha256: frozenset[str],
        max_bytes: int,
    ) -> None:
        self.files = list(files)
        self.size = size
        self.draft_size = draft_size
        self.skip = skip_sha256
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> LoadedImage:
        return load_image(
            self.files[i],
            size=self.size,
            draft_size=self.draft_size,
            skip_sha256=self.skip,
            max_bytes=self.max_bytes,
        )


class ImageLoader:
    """Iterate over files in batches of decoded, resized pixels (parallel, in order).

    Parameters
    ----------
    files : sequence of ImageFile
        The files, in the order rows are to be written.
    size : int
        Model input side.
    batch_size : int
        Files per batch (the model's batch size).
    workers : int, optional
        Decoding processes; ``0`` decodes in this process (default :func:`default_workers`).
    draft_size : int, optional
        JPEG draft size (default ``2 * size``).
    skip_sha256 : set of str
        Bytes already in (or deleted from) the store: not decoded.
    pin_memory : bool
        Pin the pixel batches (for asynchronous copies to CUDA).
    prefetch : int
        Batches each worker prepares ahead.
    """

    def __init__(
        self,
        files: Sequence[ImageFile],
        *,
        size: int,
        batch_size: int,
        workers: int | None = None,
        draft_size: int | None = None,
        skip_sha256: frozenset[str] | set[str] = frozenset(),
        pin_memory: bool = False,
        prefetch: int = 4,
        max_bytes: int = MAX_FILE_BYTES,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        self.dataset = _Files(files, size, draft_size, frozenset(skip_sha256), max_bytes)
        self.batch_size = batch_size
        kwargs: dict[str, Any] = {}
        if self.workers > 0:
            kwargs = {
                "prefetch_factor": prefetch,
                "worker_init_fn": _worker_init,
                "persistent_workers": False,
            }
            if torch.cuda.is_initialized():
                # A process that holds CUDA (and its threads) must not fork: workers come from a
                # fork server that imported this module once (seconds, once per process).
                kwargs["multiprocessing_context"] = _forkserver()
        self._loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=pin_memory and torch.cuda.is_available(),
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[LoadedBatch]:
        return iter(self._loader)
