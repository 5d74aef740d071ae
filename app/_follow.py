"""A server's view of a store that follows it: deletions, new rows and compactions by other
processes.

:class:`FollowedStore` keeps one :class:`~dermris.retriever.Retriever` (a snapshot of one
*generation* of the store's arrays) and

* checks deletions on every request (one ``stat`` of the manifest; a deleted row is gone at
  once);
* polls the manifest in a background thread (every ``poll_seconds``) and, when rows were
  committed or another process compacted the store, opens a fresh retriever *outside* the
  search lock and swaps it in under the lock (searches wait only for the swap);
* runs every request's reads against one generation and checks afterwards that the arrays
  they read were still that generation's (a compaction renames a new ``arrays.zarr`` into
  place); a request that raced a compaction is run again on the new generation, so an answer
  never mixes rows of two generations.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dermris.core.errors import StoreChangedError, StoreError
from dermris.indexer.store._files import manifest_stamp, read_manifest
from dermris.indexer.store._format import ARRAYS_DIR
from dermris.retriever import Retriever
from dermris.retriever.types import SearchOptions

__all__ = ["FollowedStore", "Snapshot", "POLL_SECONDS"]

POLL_SECONDS = 1.0
"""How often the background thread looks at the manifest for new rows or a new generation."""

_ATTEMPTS = 4
_T = TypeVar("_T")


def _arrays_inode(root: Path) -> tuple[int, int] | None:
    """Device and inode of ``arrays.zarr`` (a compaction renames a new directory into place)."""
    try:
        info = os.stat(root / ARRAYS_DIR)
    except OSError:
        return None
    return info.st_dev, info.st_ino


@dataclass(frozen=True)
class Snapshot:
    """One opened generation of the store: the retriever and the ``arrays.zarr`` it reads."""

    retriever: Retriever
    arrays: tuple[int, int] | None
    opened: float

    @property
    def generation(self) -> str | None:
        """The generation of the arrays (None for stores written before generations)."""
        return self.retriever.generation

    @property
    def rows(self) -> int:
        """Committed rows of the snapshot (deleted ones included)."""
        return len(self.retriever)

    def replaced(self) -> bool:
        """Whether the arrays on disk are no longer this snapshot's (a compaction switched)."""
        return _arrays_inode(self.retriever.store.root) != self.arrays


def _open_snapshot(
    root: Path, previous: Retriever | None, *, device: str, options: SearchOptions | None
) -> Snapshot:
    """Open the store's current generation; the arrays directory is the same before and after
    (else a compaction switched meanwhile, and it is opened again)."""
    for _ in range(_ATTEMPTS):
        before = _arrays_inode(root)
        retriever = (
            previous.reopened()
            if previous is not None
            else Retriever.open(root, device=device, options=options)
        )
        if _arrays_inode(root) == before:
            # metadata read now: later requests (where=, columns=) never read another
            # generation's metadata files
            retriever.metadata()
            return Snapshot(retriever, before, time.monotonic())
    raise StoreChangedError("the store is being compacted; try again in a moment")


class FollowedStore:
    """The store a server answers from, kept in step with other processes' writes.

    Parameters
    ----------
    root : path-like
        The store.
    device : str
        Where image queries are embedded.
    options : SearchOptions, optional
        How to search.
    poll_seconds : float
        How often the background thread looks at the manifest; 0 starts no thread (requests
        still see deletions and reopen after compactions themselves).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        device: str = "auto",
        options: SearchOptions | None = None,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.root = Path(root)
        self._device = device
        self._options = options
        self.lock = threading.Lock()
        """One search at a time: the retriever and the model are not shared-state safe."""
        self._reopen_lock = threading.Lock()
        self._current = _open_snapshot(self.root, None, device=device, options=options)
        self._seen_stamp = manifest_stamp(self.root)
        self.reopens = 0
        """How many times a fresh generation or new rows were swapped in."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll_seconds > 0:
            self._thread = threading.Thread(
                target=_poll_loop,
                args=(weakref.ref(self), poll_seconds, self._stop),
                name="dermris-follow",
                daemon=True,
            )
            self._thread.start()

    # -- what is served ------------------------------------------------------------------
    @property
    def current(self) -> Snapshot:
        """The snapshot requests are answered from now (read without the lock)."""
        return self._current

    @property
    def retriever(self) -> Retriever:
        """The current snapshot's retriever."""
        return self._current.retriever

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    # -- keeping up ----------------------------------------------------------------------
    def poll(self) -> bool:
        """Look at the manifest once; reopen when rows were committed or the generation changed.

        Returns
        -------
        bool
            Whether a fresh snapshot was swapped in.
        """
        stamp = manifest_stamp(self.root)
        if stamp is None or stamp == self._seen_stamp:
            return False
        try:
            manifest = read_manifest(self.root)
        except StoreError:
            return False  # being switched or damaged: the next poll looks again
        snap = self._current
        if manifest.generation == snap.generation and manifest.rows == snap.rows:
            self._seen_stamp = stamp
            return False  # a deletion or a derived file: requests pick deletions up themselves
        swapped = self.reopen(snap)  # raises when it fails: the next poll tries again
        self._seen_stamp = stamp
        return swapped

    def reopen(self, stale: Snapshot) -> bool:
        """Replace ``stale`` by a fresh snapshot (unless another thread already did).

        The store is opened outside the search lock; searches wait only for the swap.
        """
        with self._reopen_lock:
            if self._current is not stale:
                return False
            fresh = _open_snapshot(
                self.root, stale.retriever, device=self._device, options=self._options
            )
            with self.lock:
                self._current = fresh
            self.reopens += 1
            return True

    def run(self, work: Callable[[Retriever], _T]) -> tuple[_T, Snapshot]:
        """``work(retriever)`` under the search lock, on one generation of the store.

        Deletions committed since the last request are picked up first. When a compaction
        switched the arrays before or during the call, the answer is thrown away and the call
        made again on the new generation.

        Returns
        -------
        (result, Snapshot)
            What ``work`` returned, and the snapshot it ran on (its generation).

        Raises
        ------
        StoreChangedError
            The store kept changing under every attempt.
        """
        for _ in range(_ATTEMPTS):
            snap = self._current
            with self.lock:
                if snap is self._current:
                    try:
                        snap.retriever.sync()
                        if not snap.replaced():
                            result = work(snap.retriever)
                            snap.retriever.sync()
                            if not snap.replaced():
                                return result, snap
                    except StoreChangedError:
                        pass
                    except Exception:
                        if not self._changed(snap):
                            raise
                else:
                    continue  # swapped while waiting for the lock
            self.reopen(snap)
        raise StoreChangedError("the store is being compacted; try again in a moment")

    def _changed(self, snap: Snapshot) -> bool:
        """Whether the store moved on from ``snap``'s generation (then an error reading it is
        the race, not the answer)."""
        if snap.replaced():
            return True
        try:
            return read_manifest(self.root).generation != snap.generation
        except StoreError:
            return True


def _poll_loop(ref: weakref.ref[FollowedStore], seconds: float, stop: threading.Event) -> None:
    """The background thread: poll until stopped or the followed store is garbage."""
    while not stop.wait(seconds):
        follower = ref()
        if follower is None:
            return
        try:
            follower.poll()
        except Exception:  # noqa: BLE001 - keep following; requests report their own errors
            pass
        del follower
