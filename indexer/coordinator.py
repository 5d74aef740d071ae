"""Index on a Dask cluster: many workers embed, one coordinator writes.

The process that runs ``dermris index --cluster ...`` is the coordinator. It

1. lists the files, opens the store (holding its writer lock, as in one process) and agrees on
   the metadata columns;
2. connects to the cluster (:mod:`.cluster`) and has every worker load the store's model once
   (:func:`~.blocks.warm_up`); for a new store, one task embeds the first batch and the
   float16 codec is fitted on it, as in one process;
3. splits the files, in row order, into blocks (by default a whole number of the store's style
   shards, at least 256 files, fewer when the workers would otherwise go short) and submits one
   pure task per block (:func:`~.blocks.embed_block`), a bounded window of them at a time,
   earlier blocks first;
4. takes results as they come and commits the blocks strictly in order through the store's
   single :class:`~.store.StoreWriter` (:class:`~.commit.Committer`, every ``commit_every``
   rows, at block boundaries), applying exactly the rules of one process
   (:class:`~.commit.Admission`): first copy of its bytes, unused image id, rejects recorded.

Only the coordinator writes the store, one append after another, so no two writers ever touch
one zarr shard (zarr-python #3682: concurrent writes to parts of a shard lose data) and the
store format, the commit point (the manifest rename) and every reader are exactly those of a
run in one process. Workers write nothing.

Faults: a block whose worker dies is recomputed by Dask on another worker (the task is pure);
a block that raises is retried ``retries`` times; blocks are committed once each, in order, so
no row is lost or duplicated. A killed coordinator loses only uncommitted blocks: the same
command resumes from the last commit (committed bytes are hashed on the workers and skipped).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dermris.core.errors import ClusterError

from .blocks import (
    BlockOptions,
    BlockResult,
    ModelSettings,
    embed_block,
    first_batch_style,
    warm_up,
)
from .cluster import ClusterSession
from .commit import Admission, Chunk, Committer
from .report import IndexReport
from .sources import ImageFile, MetadataTable
from .store import StoreWriter

__all__ = ["ClusterRun", "default_block_size", "index_on_cluster"]

log = logging.getLogger(__name__)

_MIN_BLOCK_FILES = 256
_BLOCKS_PER_WORKER = 4


@dataclass(frozen=True)
class ClusterRun:
    """The settings of a cluster run (see :func:`~.pipeline.index_folder`).

    Attributes
    ----------
    images : str
        The indexed folder (absolute).
    model : ModelSettings
        How every worker runs the model.
    block_size : int, optional
        Files per task (None: :func:`default_block_size`).
    commit_every : int
        Rows per commit (commits fall on block boundaries).
    retries : int
        Times a block that raised is tried again before the run fails.
    commit_seconds : float
        Also commit when this long has passed since the last commit.
    """

    images: str
    model: ModelSettings = ModelSettings()
    block_size: int | None = None
    commit_every: int = 256
    retries: int = 2
    commit_seconds: float = 30.0


def default_block_size(*, shard_rows: int, files: int, workers: int, batch_size: int) -> int:
    """Files per block: a whole number of style shards and at least 256 files, unless that would
    leave fewer than about four blocks per worker (then smaller, but at least a batch).

    Parameters
    ----------
    shard_rows : int
        Rows per shard file of the store's style array.
    files : int
        Files to index.
    workers : int
        Workers in the cluster now.
    batch_size : int
        Images per forward pass.
    """
    aligned = shard_rows * math.ceil(_MIN_BLOCK_FILES / shard_rows)
    spread = math.ceil(files / (_BLOCKS_PER_WORKER * max(1, workers)))
    return max(1, min(aligned, max(batch_size, spread)))


def _split(files: Sequence[ImageFile], size: int) -> list[list[ImageFile]]:
    return [list(files[i : i + size]) for i in range(0, len(files), size)]


def _failure(exc: BaseException, index: int, block: Sequence[ImageFile]) -> BaseException:
    """A one-line error for a block that failed for good (dermris's own errors pass unchanged)."""
    where = f"block {index} ({block[0].path} ... {block[-1].path})"
    failure = _died(exc, where, _DIED_ADVICE + "; the rows committed before it are kept")
    return exc if failure is None else failure


def _died(exc: BaseException, what: str, advice: str) -> ClusterError | None:
    """A one-line :class:`ClusterError` for work whose workers kept dying (``KilledWorker``)
    or that the scheduler lost; None for any other error."""
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        tries = getattr(exc, "allowed_failures", None)
        times = f"{tries + 1} times" if isinstance(tries, int) else "each time it was tried"
        return ClusterError(f"{what}: the worker running it died {times}; {advice}")
    if type(exc).__name__ in ("CancelledError", "FutureCancelledError"):
        return ClusterError(f"{what} was cancelled: the scheduler lost it ({exc})")
    return None


_DIED_ADVICE = (
    "a file may crash the image decoder or the model, or the workers run out of memory: "
    "give each worker more memory (fewer workers, e.g. --cluster local:1, or a smaller "
    "--batch-size), or index the files without --cluster to find the one that fails"
)


class _Window:
    """Blocks submitted but not yet committed, kept at about twice the workers (bounds memory)."""

    def __init__(self, session: ClusterSession) -> None:
        self.session = session
        self._size = 0
        self._checked = 0.0

    @property
    def size(self) -> int:
        now = time.monotonic()
        if now - self._checked > 2.0:  # workers come and go (adaptive clusters, restarts)
            self._size = max(2, 2 * self.session.workers + 1)
            self._checked = now
        return self._size


def _commit_block(
    result: BlockResult, admission: Admission, writer: StoreWriter, committer: Committer
) -> None:
    """Apply the rules of one process to a block's files, in order.

    Hands its rows to the writer.
    """
    chunk = Chunk(items=[])
    keep = admission.admit_all(result.items, chunk)
    if keep:
        n_ok = len(result.features)
        take = slice(None) if len(keep) == n_ok else np.asarray(keep)
        style = result.style[take]
        if result.encoded:
            clipped = int(result.clipped[take].sum())
        else:
            # the block ran before the store had its float16 scales: fit (first rows), encode here
            style, clipped = writer.fit_codec(style).encode(style)
        chunk.features, chunk.style, chunk.masks = result.features[take], style, result.masks[take]
        chunk.encoded, chunk.clipped = True, clipped
    committer.put(chunk)


def index_on_cluster(
    writer: StoreWriter,
    files: Sequence[ImageFile],
    table: MetadataTable | None,
    report: IndexReport,
    *,
    session: ClusterSession,
    run: ClusterRun,
    progress: bool,
) -> None:
    """Embed ``files`` on a Dask cluster and commit their rows to ``writer`` in order.

    Parameters
    ----------
    writer : StoreWriter
        The store, opened for writing by this process.
    files : sequence of ImageFile
        Every file of the run, in row order.
    table : MetadataTable, optional
        User metadata joined on the image id.
    report : IndexReport
        Filled in: counts, rejects, duplicates, stages, devices, the cluster.
    session : ClusterSession
        The connected cluster (:func:`~.cluster.connect`).
    run : ClusterRun
        The run's settings.
    progress : bool
        A progress bar over blocks on stderr, and the dashboard's address.

    Raises
    ------
    ClusterError
        A block failed for good (rows committed before stay), or a worker cannot read the model
        or the images.
    """
    started = time.perf_counter()
    admission = Admission(writer, table, report)
    model_file, model_sha256 = writer.reader().model_file()
    client = session.client
    dashboard = session.dashboard
    log.info(
        "Dask cluster %s: %d workers; dashboard %s",
        session.name,
        session.workers,
        dashboard or "none",
    )
    if progress and dashboard:
        print(f"Dask dashboard: {dashboard}", file=sys.stderr, flush=True)
    options = BlockOptions(
        model_file=str(model_file),
        model_sha256=model_sha256,
        images=run.images,
        model=run.model,
        torch_threads=session.torch_threads,
        codec=writer.codec,
    )
    token = uuid.uuid4().hex[:8]
    skip = admission.skip_sha256
    skip_arg = client.scatter([skip], broadcast=True, hash=False)[0] if skip else skip
    _warm_up(session, options, token)
    size = run.block_size or default_block_size(
        shard_rows=writer.manifest.arrays.style_shard_rows,
        files=len(files),
        workers=session.workers,
        batch_size=run.model.batch_size,
    )
    blocks = _split(files, size)
    if (
        writer.codec is None
    ):  # a new store: its float16 scales come from the first batch, as in one process
        try:
            style = client.submit(
                first_batch_style,
                list(files),
                options,
                skip_arg,
                key=f"dermris-codec-{token}",
                pure=False,
                retries=run.retries,
            ).result()
        except Exception as exc:  # noqa: BLE001 - re-raised, in one line where it is the cluster's
            first = files[0].path if files else "?"
            failure = _died(
                exc,
                f"the first batch of the new store (from {first}; it sets the store's float16 "
                "scales) was never embedded",
                _DIED_ADVICE + "; no rows were committed",
            )
            if failure is None:
                raise
            raise failure from exc
        if style is not None:
            options = dataclasses.replace(options, codec=writer.fit_codec(style))
    report.stages["cluster"] = time.perf_counter() - started
    report.cluster = {
        "cluster": session.name,
        "dashboard": dashboard,
        "blocks": len(blocks),
        "block_size": size,
    }
    t = time.perf_counter()
    _embed_blocks(
        session,
        blocks,
        options,
        skip_arg,
        admission,
        writer,
        table,
        report,
        run=run,
        token=token,
        progress=progress,
    )
    report.stages["embed"] = time.perf_counter() - t


def _warm_up(session: ClusterSession, options: BlockOptions, token: str) -> None:
    """Load the model on every worker now, in parallel (a worker that cannot read it fails here)."""
    client = session.client
    workers = list(client.scheduler_info(n_workers=-1).get("workers", {}))
    futures = [
        client.submit(
            warm_up,
            options,
            key=f"dermris-warm-up-{token}-{i}",
            workers=[w],
            allow_other_workers=True,
            pure=False,
        )
        for i, w in enumerate(workers)
    ]
    try:
        loaded = client.gather(futures)
    except Exception as exc:  # noqa: BLE001 - re-raised, in one line where it is the cluster's
        failure = _died(
            exc,
            "loading the model on the workers",
            "the workers may run out of memory loading it: give each worker more memory "
            "(fewer workers, e.g. --cluster local:1)",
        )
        if failure is None:
            raise
        raise failure from exc
    log.info("model loaded on %d workers: %s", len(loaded), ", ".join(sorted(set(loaded))))


def _embed_blocks(
    session: ClusterSession,
    blocks: list[list[ImageFile]],
    options: BlockOptions,
    skip_arg: Any,
    admission: Admission,
    writer: StoreWriter,
    table: MetadataTable | None,
    report: IndexReport,
    *,
    run: ClusterRun,
    token: str,
    progress: bool,
) -> None:
    from distributed import as_completed

    client = session.client
    window = _Window(session)
    committer = Committer(
        writer, table, report, run.commit_every, commit_seconds=run.commit_seconds
    )
    bar = tqdm(
        total=len(blocks), desc="indexing", unit="block", file=sys.stderr, disable=not progress
    )
    in_flight: dict[Any, int] = {}
    done: dict[int, BlockResult] = {}
    devices: set[str] = set()
    precisions: set[str] = set()
    ran_on: set[str] = set()
    next_submit = next_commit = 0
    pending = as_completed()
    # results come straight from the workers (not through the scheduler) unless configured otherwise
    direct = client.direct_to_workers if client.direct_to_workers is not None else True

    def fill() -> None:
        nonlocal next_submit, options
        if writer.codec is not None and options.codec is None:
            options = dataclasses.replace(options, codec=writer.codec)
        while next_submit < len(blocks) and next_submit - next_commit < window.size:
            future = client.submit(
                embed_block,
                next_submit,
                blocks[next_submit],
                options,
                skip_arg,
                key=f"dermris-block-{token}-{next_submit:06d}",
                pure=False,
                retries=run.retries,
                priority=-next_submit,
            )
            in_flight[future] = next_submit
            pending.add(future)
            next_submit += 1

    try:
        fill()
        for future in pending:
            index = in_flight.pop(future)
            try:
                result = client.gather(future, direct=direct)
            except Exception as exc:  # noqa: BLE001 - re-raised, in one line where it is the cluster's
                failure = _failure(exc, index, blocks[index])
                if failure is exc:
                    raise
                raise failure from exc
            future.release()
            done[index] = result
            devices.add(result.device)
            precisions.add(result.precision)
            ran_on.add(result.worker)
            bar.update(1)
            while next_commit in done:  # row order: a block waits for every block before it
                _commit_block(done.pop(next_commit), admission, writer, committer)
                next_commit += 1
            fill()
        committer.close()
    except BaseException:
        if in_flight:
            client.cancel(list(in_flight))
        committer.abort()
        raise
    finally:
        bar.close()
    report.device = ", ".join(sorted(devices))
    report.precision = ", ".join(sorted(precisions))
    report.cluster["workers"] = len(ran_on)
    report.stages["write"] = committer.seconds
