"""The writer stage and the rules of what becomes a row, shared by one process and a cluster.

* :class:`Admission` decides, file by file in row order, whether a loaded file becomes a row
  (decoded; bytes not in the store, not deleted from it, not seen earlier in the run; image id
  unused) and records every other outcome in the run's report.
* :class:`Committer` is the writer stage on a thread of its own: it gathers :class:`Chunk` objects
  and commits every ``commit_every`` rows through the store's one :class:`~.store.StoreWriter`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from .report import IndexReport
from .sources import LoadedImage, MetadataTable
from .store import StoreWriter
from .store.schema import core_records

__all__ = ["Admission", "Chunk", "Committer", "printable"]

log = logging.getLogger(__name__)


def printable(path: str) -> str:
    """A path as text that can be printed and written to JSON (undecodable bytes escaped)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class Chunk:
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


class Committer:
    """The writer stage on its own thread.

    It gathers chunks and commits every ``commit_every`` rows, and whatever it holds when a
    chunk arrives ``commit_seconds`` or more after the last commit (so a short or slow run
    keeps its work when interrupted). ``clock`` (seconds, monotonic) is replaceable for tests.
    """

    def __init__(
        self,
        writer: StoreWriter,
        table: MetadataTable | None,
        report: IndexReport,
        commit_every: int,
        *,
        commit_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.table = table
        self.report = report
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.clock = clock
        self.commits = 0
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._aborted = False
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._loop, name="dermris-writer", daemon=True)
        self._thread.start()

    def put(self, chunk: Chunk) -> None:
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
        """Stop without committing what is pending (the run failed).

        Waits for a commit in flight.
        """
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
        pending: list[Chunk] = []
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        last = self.clock()
        try:
            while True:
                chunk = self._queue.get()
                if self._aborted:
                    return
                if chunk is None:
                    break
                pending.append(chunk)
                rows = sum(len(c) for c in pending)
                if rows >= self.commit_every or (
                    rows and self.clock() - last >= self.commit_seconds
                ):
                    self._commit(pending)
                    pending = []
                    last = self.clock()
            self._commit(pending)
        except BaseException as exc:  # handed to the main thread
            self.error = exc

    def _commit(self, chunks: list[Chunk]) -> None:
        started = time.perf_counter()
        rejected = [r for c in chunks for r in c.rejected]
        chunks = [c for c in chunks if len(c)]
        if chunks:
            items = [it for c in chunks for it in c.items]
            records = core_records(
                image_ids=[it.file.image_id for it in items],
                paths=[str(it.file.path) for it in items],
                sha256=cast("list[str]", [it.sha256 for it in items]),  # decoded: hashed
                widths=[it.width for it in items],
                heights=[it.height for it in items],
            )
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
                self.writer.append(
                    features=features,
                    encoded_style=style,
                    masks=masks,
                    records=records,
                    clipped=sum(c.clipped for c in chunks),
                )
            else:
                self.writer.append(features=features, style=style, masks=masks, records=records)
            self.report.indexed += len(items)
            self.commits += 1
        self.writer.record_rejected(rejected)
        self.seconds += time.perf_counter() - started


class Admission:
    """What becomes a row, decided file by file in row order (one process and a cluster alike).

    A file becomes a row when it decoded, its bytes are neither in the store nor deleted from
    it, no earlier file of this run had the same bytes, and its image id is not used yet.
    Creating the admission also agrees on the metadata columns of the new rows, before any image
    is embedded (a mismatch fails now).
    """

    def __init__(
        self, writer: StoreWriter, table: MetadataTable | None, report: IndexReport
    ) -> None:
        _, missing = writer.prepare_metadata(table.schema if table is not None else None)
        if missing and writer.rows:
            log.warning(
                "%d metadata columns of the store are not in %s; new rows get nulls there: %s",
                len(missing),
                "the CSV" if table is not None else "this run (no --metadata)",
                ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
            )
        committed = writer.committed_metadata(["image_id", "sha256", "path"])
        self.known_sha = set(committed.column("sha256").to_pylist())
        self.purged_sha = set(writer.removed_sha256)
        self.seen_ids = dict(
            zip(committed.column("image_id").to_pylist(), committed.column("path").to_pylist())
        )
        self.seen_sha: dict[str, str] = {}
        self.seen_known: dict[str, str] = {}  # sha256 of this run's files already in the store
        self.report = report

    @property
    def skip_sha256(self) -> frozenset[str]:
        """Bytes not to decode: in the store already, or deleted from it."""
        return frozenset(self.known_sha | self.purged_sha)

    def admit_all(self, items: list[LoadedImage], chunk: Chunk) -> list[int]:
        """:meth:`admit` every item in order; returns the positions, among the decoded items
        (``status == "ok"``), of those that become rows."""
        keep = []
        position = -1
        for item in items:
            if item.status == "ok":
                position += 1
            if self.admit(item, chunk):
                keep.append(position)
        return keep

    def admit(self, item: LoadedImage, chunk: Chunk) -> bool:
        """Record what happens to ``item``; True when it becomes a row (the caller appends it)."""
        report = self.report
        path = printable(str(item.file.path))
        if item.status == "rejected":
            report.rejected.append((path, item.reason or "rejected"))
            chunk.rejected.append((path, item.reason or "rejected"))
        elif item.status == "known":
            if item.sha256 in self.purged_sha:
                report.previously_deleted.append(path)
            elif item.sha256 in self.seen_known:  # a second copy: the store holds one row
                first = self.seen_known[item.sha256]
                report.duplicates.append((path, first))
                chunk.rejected.append((path, f"same bytes as {first}"))
            else:
                assert item.sha256 is not None  # known by its hash
                self.seen_known[item.sha256] = path
                report.already_indexed += 1
        elif item.sha256 in self.seen_sha:
            report.duplicates.append((path, self.seen_sha[item.sha256]))
            chunk.rejected.append((path, f"same bytes as {self.seen_sha[item.sha256]}"))
        elif item.file.image_id in self.seen_ids:
            image_id = item.file.image_id
            reason = f"image id {image_id!r} already used by {self.seen_ids[image_id]}"
            report.rejected.append((path, reason))
            chunk.rejected.append((path, reason))
        else:
            assert item.sha256 is not None  # a decoded item is hashed
            self.seen_sha[item.sha256] = path
            self.seen_ids[item.file.image_id] = path
            chunk.items.append(item)
            return True
        return False
