"""Timeouts and limits for slow and hostile clients, at the connection level (uvicorn's h11
protocol, guarded) and at the request level (ASGI middleware).

uvicorn offers ``timeout_keep_alive`` (idle time between requests) and ``limit_concurrency``
(a 503 for every request beyond the limit, health checks included), but no deadline for a
request's head or body: a client trickling header lines, or a POST whose body never arrives,
holds its connection for ever. :class:`GuardedH11Protocol` adds them:

* the request head (request line and headers) must arrive within ``header_timeout`` seconds of
  its first byte (of the connection, for the first request), however slowly it trickles; then
  ``408`` and the connection is closed;
* the body within ``body_timeout`` seconds of the head; else the connection is closed (the
  application sees a disconnect);
* an idle keep-alive connection is closed after ``keep_alive`` seconds;
* beyond ``max_connections`` open connections, the connection that has waited longest without
  a request in progress (trickling its head, or idle) is closed to make room: stalled clients
  cannot keep a health check out, and the process stays below its file-descriptor limit.

:class:`dermris.app._web.InFlightLimit` answers ``503`` (with ``Retry-After``) to requests beyond
``max_requests`` in progress, except the health check and the metrics, which are always
answered (on the event loop, without the search lock).
"""

from __future__ import annotations

import asyncio
import functools
import resource
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "ServerLimits",
    "GuardedH11Protocol",
    "connection_cap",
    "protocol_for",
    "raise_fd_limit",
]


@dataclass(frozen=True)
class ServerLimits:
    """Timeouts (seconds) and caps of a server.

    Attributes
    ----------
    header_timeout : float
        Most time for a request's head, from its first byte.
    body_timeout : float
        Most time for a request's body, from the end of its head (60 s: 32 MB at 4 Mbit/s).
    keep_alive : float
        Idle time after which a keep-alive connection is closed.
    max_connections : int
        Open connections beyond which stalled or idle ones are closed, oldest first.
    max_requests : int
        Requests in progress beyond which new ones get 503 (health and metrics excepted).
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive: float = 5.0
    max_connections: int = 1000
    max_requests: int = 128


_TIMEOUT_TEXT = b"the request head took too long"
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT)
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with head and body deadlines and a connection cap (see the
    module's description)."""

    def __init__(self, *args: Any, limits: ServerLimits | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits or ServerLimits()
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "head"  # head (waiting for a request's head), body, busy, idle
        self._since = 0.0
        self._cycle_seen: object = None

    # -- phases ----------------------------------------------------------------------------
    def _enter(self, phase: str, timeout: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        self._since = self.loop.time()
        if timeout is not None and timeout > 0:
            self._timer = self.loop.call_later(timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._phase == "head" and self.conn.their_state is h11.IDLE:
            try:
                self.transport.write(_REQUEST_TIMEOUT)
            except Exception:  # noqa: BLE001 - the client is gone already
                pass
        self.transport.close()

    def _follow_events(self) -> None:
        """After h11 handled input: a new request's head arrived, or its body ended."""
        cycle = self.cycle
        if cycle is not None and cycle is not self._cycle_seen and not cycle.response_complete:
            self._cycle_seen = cycle
            if self.conn.their_state is h11.SEND_BODY:
                self._enter("body", self.limits.body_timeout)
            else:
                self._enter("busy", None)
        elif self._phase == "body" and self.conn.their_state is not h11.SEND_BODY:
            self._enter("busy", None)

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._enter("head", self.limits.header_timeout)
        self._make_room()

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # the first byte of the next request
            self._enter("head", self.limits.header_timeout)
        super().data_received(data)
        self._follow_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        if self.cycle is not None and self.cycle is not self._cycle_seen:
            self._follow_events()
        elif not self.transport.is_closing():
            self._enter("idle", self.limits.keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    # -- the connection cap ------------------------------------------------------------------
    def _make_room(self) -> None:
        if len(self.connections) <= self.limits.max_connections:
            return
        waiting = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol)
            and c is not self
            and c._phase in ("head", "idle")
            and c.transport is not None
            and not c.transport.is_closing()
        ]
        if not waiting:
            self.transport.close()  # every other connection has a request in progress
            return
        oldest = min(waiting, key=lambda c: c._since)
        oldest.transport.close()
        oldest.connections.discard(oldest)


def protocol_for(limits: ServerLimits):
    """The protocol factory uvicorn's ``http=`` takes (picklable, for ``--workers``)."""
    return functools.partial(GuardedH11Protocol, limits=limits)


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's soft limit on open files toward its hard limit; the new soft
    limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(limits: ServerLimits, *, reserve: int = 256) -> ServerLimits:
    """``limits`` with ``max_connections`` kept ``reserve`` below the open-files limit (the
    store's files, the model, logs)."""
    soft = raise_fd_limit()
    if soft == resource.RLIM_INFINITY:
        return limits
    cap = max(16, min(limits.max_connections, soft - reserve))
    return ServerLimits(
        header_timeout=limits.header_timeout,
        body_timeout=limits.body_timeout,
        keep_alive=limits.keep_alive,
        max_connections=cap,
        max_requests=limits.max_requests,
    )
