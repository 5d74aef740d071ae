"""Operations: Prometheus metrics (``/metrics``) and the audit log of searches.

Metrics are kept by hand in the Prometheus text format (version 0.0.4): a few counters and
histograms need no client library, and with ``--workers N`` every worker writes its figures to a
shared folder (``DERMRIS_METRICS_DIR``, made by the parent) so that a scrape of any worker
answers the sum over all of them.

The audit log appends one JSON line per search (time, client address, token id, the query row
or the upload's sha256, measures, k, filter, generation, status), fsynced before the answer
goes out, and rotated by size (``PATH.1`` ... ``PATH.KEEP``) under a file lock shared by every
worker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from dermris.core.atomic import append_durably, atomic_write_bytes, rename_durably

__all__ = ["AuditLog", "Metrics", "METRICS_DIR_ENV", "token_id", "CONTENT_TYPE"]

METRICS_DIR_ENV = "DERMRIS_METRICS_DIR"
"""Folder where each worker of ``dermris serve --workers N`` writes its metrics."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's media type."""

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Histogram bucket bounds in seconds."""

_HELP = {
    "dermris_requests_total": ("counter", "HTTP requests answered, by route, method and status."),
    "dermris_request_seconds": ("histogram", "HTTP request latency by route."),
    "dermris_searches_total": ("counter", "Searches answered, by query kind (row or upload)."),
    "dermris_search_measure_seconds": (
        "histogram",
        "Time spent ranking each measure of a search (the retriever's 'rank <measure>' stage).",
    ),
    "dermris_store_rows": ("gauge", "Committed rows of the served generation (deleted included)."),
    "dermris_store_live_rows": ("gauge", "Rows not deleted."),
    "dermris_store_generation": ("gauge", "1 for the generation served (its id as a label)."),
    "dermris_store_reopens_total": (
        "counter",
        "Fresh snapshots swapped in (new rows, compaction).",
    ),
}


def token_id(token: str | None) -> str | None:
    """A short, stable id of a token for logs (a sha256 prefix; never the token)."""
    if not token:
        return None
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    items = [f'{k}="{_escape(v)}"' for k, v in pairs]
    return "{" + ",".join(items) + "}" if items else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Counters and histograms of one process, rendered in the Prometheus text format.

    Parameters
    ----------
    shared_dir : path-like, optional
        Folder where every worker writes its figures (JSON, one file a worker); a scrape sums
        them. None: this process alone.
    """

    def __init__(self, shared_dir: str | os.PathLike | None = None) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._histograms: dict[tuple[str, tuple], list[float]] = {}
        self._shared = Path(shared_dir) if shared_dir else None
        self._mine = self._shared / f"worker-{os.getpid()}.json" if self._shared else None
        self._dirty = False
        if self._shared is not None:
            threading.Thread(
                target=_publish_loop, args=(weakref.ref(self),), name="dermris-metrics", daemon=True
            ).start()

    def count(self, name: str, labels: dict[str, str], by: float = 1.0) -> None:
        """Add ``by`` to a counter."""
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += by
            self._dirty = True

    def observe(self, name: str, labels: dict[str, str], seconds: float) -> None:
        """Record one observation of a histogram."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            slots = self._histograms.setdefault(key, [0.0] * (len(BUCKETS) + 2))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    slots[i] += 1
            slots[-2] += 1  # count (also the +Inf bucket)
            slots[-1] += seconds  # sum
            self._dirty = True

    def _state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counters": [[n, list(map(list, k)), v] for (n, k), v in self._counters.items()],
                "histograms": [
                    [n, list(map(list, k)), list(v)] for (n, k), v in self._histograms.items()
                ],
            }

    def publish(self) -> None:
        """Write this worker's figures to the shared folder (every second, and on a scrape)."""
        if self._shared is None or self._mine is None:
            return
        self._dirty = False
        atomic_write_bytes(self._mine, json.dumps(self._state()).encode("utf-8"))

    def _publish(self) -> list[dict[str, Any]]:
        """Every worker's figures (this one's published first)."""
        if self._shared is None:
            return [self._state()]
        self.publish()
        states = []
        for path in sorted(self._shared.glob("worker-*.json")):
            try:
                states.append(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError):
                continue  # a worker that is being replaced
        return states

    def render(self, gauges: dict[str, list[tuple[dict[str, str], float]]]) -> str:
        """The text exposition: summed counters and histograms, and this process's gauges."""
        counters: dict[tuple[str, tuple], float] = defaultdict(float)
        histograms: dict[tuple[str, tuple], list[float]] = {}
        for state in self._publish():
            for name, labels, value in state["counters"]:
                counters[(name, tuple(map(tuple, labels)))] += value
            for name, labels, slots in state["histograms"]:
                key = (name, tuple(map(tuple, labels)))
                total = histograms.setdefault(key, [0.0] * len(slots))
                for i, v in enumerate(slots):
                    total[i] += v
        lines: list[str] = []
        names = sorted({n for n, _ in counters} | {n for n, _ in histograms} | set(gauges))
        for name in names:
            kind, text = _HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for (n, labels), value in sorted(counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {_number(value)}")
            for (n, labels), slots in sorted(histograms.items()):
                if n != name:
                    continue
                for bound, count in zip(BUCKETS, slots):
                    le = _labels((*labels, ("le", _number(bound))))
                    lines.append(f"{name}_bucket{le} {_number(count)}")
                lines.append(
                    f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {_number(slots[-2])}"
                )
                lines.append(f"{name}_count{_labels(labels)} {_number(slots[-2])}")
                lines.append(f"{name}_sum{_labels(labels)} {_number(slots[-1])}")
            for labels_dict, value in gauges.get(name, []):
                lines.append(f"{name}{_labels(sorted(labels_dict.items()))} {_number(value)}")
        return "\n".join(lines) + "\n"


def _publish_loop(ref: weakref.ref[Metrics]) -> None:
    while True:
        time.sleep(1.0)
        metrics = ref()
        if metrics is None:
            return
        if metrics._dirty:
            try:
                metrics.publish()
            except OSError:
                pass
        del metrics


class AuditLog:
    """An append-only log of searches: one JSON line each, fsynced, rotated by size.

    Parameters
    ----------
    path : path-like
        The log file (created with mode 0600; its folder must exist).
    max_bytes : int
        When the file would grow past this, it is renamed ``PATH.1`` (``PATH.1`` to ``PATH.2``,
        ..., the oldest beyond ``keep`` removed) and a new file started.
    keep : int
        Rotated files kept.
    """

    def __init__(
        self, path: str | os.PathLike, *, max_bytes: int = 64 << 20, keep: int = 10
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._file_lock = FileLock(str(self.path) + ".lock")
        with self._file_lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.close(fd)

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                rename_durably(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.keep > 0:
            rename_durably(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (``time`` is added, UTC ISO 8601) and fsync it."""
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds")} | record
        line = json.dumps(entry, sort_keys=False, ensure_ascii=True) + "\n"
        with self._lock, self._file_lock:
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(line) > self.max_bytes:
                self._rotate()
            append_durably(self.path, line, file_mode=0o600)


def now() -> float:
    """Monotonic seconds (for latencies)."""
    return time.perf_counter()


class RequestMetrics:
    """ASGI middleware: count every HTTP request and time it, labelled by route template
    (``/api/image/{row}``, never the row itself; unmatched paths are ``other``)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            labels = {"route": path, "method": scope.get("method", ""), "status": str(status)}
            self.metrics.count("dermris_requests_total", labels)
            self.metrics.observe(
                "dermris_request_seconds", {"route": path}, time.perf_counter() - started
            )
