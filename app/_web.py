"""What the two web apps (search and judging) share: the request guard and the uvicorn runner.

The guard refuses requests whose ``Host`` or ``Origin`` is not this server (DNS rebinding and
cross-site requests) and, when a token is set, requests without it. The runner binds loopback
unless told otherwise and refuses to bind beyond loopback without a token.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from dermris.core.errors import ConfigError, OptionalDependencyError, QueryError

__all__ = [
    "TOKEN_ENV",
    "BodyLimit",
    "InFlightLimit",
    "allowed_hosts",
    "install_guard",
    "is_loopback",
    "public_message",
    "resolve_token",
    "run",
]

TOKEN_ENV = "DERMRIS_TOKEN"
"""Environment variable holding the access token (instead of ``--token``)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\",;:()]+(?:/[^\s'\",;:()]*)*")


def public_message(exc: BaseException, root: str | os.PathLike | None = None) -> str:
    """``exc``'s first line for a client: the store's path becomes "the store", and any other
    absolute path on the server becomes ``<path>``."""
    lines = str(exc).splitlines()
    message = lines[0] if lines else type(exc).__name__
    if root is not None:
        for form in {str(root), os.path.abspath(root), str(Path(root).resolve())}:
            message = message.replace(form, "the store")
    return _ABSOLUTE_PATH.sub("<path>", message)


def require_fastapi():
    """The ``fastapi`` module, or a one-line error naming the extra to install."""
    try:
        import fastapi
    except ImportError:
        raise OptionalDependencyError(
            "the web pages need FastAPI: pip install 'dermris[serve]'"
        ) from None
    return fastapi


_WILDCARDS = {"0.0.0.0", "::", "[::]", ""}


def _host_name(host: str) -> str:
    """``host`` as it appears in a ``Host`` header (IPv6 literals bracketed)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> set[str] | None:
    """The ``Host`` header values a server bound to ``host:port`` answers; None: any (a wildcard
    bind, where every request must carry the token instead)."""
    if host in _WILDCARDS:
        return None
    names = {_host_name(host), "127.0.0.1", "localhost", "[::1]"} | {_host_name(n) for n in extra}
    return {f"{n}:{port}" for n in names} | (names if port == 80 else set())


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, whether they declare a
    ``Content-Length`` (refused before reading) or arrive chunked (refused as the count passes the
    limit; nothing beyond it is read)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send) -> None:
        body = b'{"detail":"request body over %d bytes"}' % self.max_bytes
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = self.max_bytes + 1
        if declared > self.max_bytes:
            return await self._refuse(send)
        received = 0
        refused = False
        started = False

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:  # the app's answer to the aborted read is replaced by the 413
                return
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if refused and not started:
            await self._refuse(send)


class InFlightLimit:
    """ASGI middleware: 503 beyond ``max_requests`` requests in progress, except ``exempt``
    paths (the health check and the metrics are always answered)."""

    def __init__(
        self,
        app,
        max_requests: int,
        exempt: tuple[str, ...] = ("/api/health", "/metrics"),
    ) -> None:
        self.app = app
        self.max_requests = max_requests
        self.exempt = frozenset(exempt)
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_requests:
            body = b'{"detail":"the server is busy; try again in a moment"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def router_app(
    router,
    *,
    prefix: str,
    title: str,
    host: str,
    port: int,
    token: str | None,
    max_body_bytes: int,
    extra_hosts: tuple[str, ...] = (),
):
    """A guarded FastAPI application serving only ``router`` at ``prefix`` (``/`` redirects
    there, keeping ``?token=``): no API docs, the guard of :func:`install_guard`."""
    require_fastapi()
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    install_guard(
        app,
        host=host,
        port=port,
        token=token,
        max_body_bytes=max_body_bytes,
        extra_hosts=tuple(extra_hosts),
    )
    app.include_router(router, prefix=prefix)

    async def root(request):  # a plain Starlette endpoint: it is given the request
        query = request.url.query  # keeps ?token=
        return RedirectResponse(f"{prefix}/" + (f"?{query}" if query else ""))

    app.router.add_route("/", root, methods=["GET"], include_in_schema=False)
    return app


def install_guard(
    app,
    *,
    host: str,
    port: int,
    token: str | None,
    max_body_bytes: int | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> None:
    """Add the Host/Origin/token checks (and an optional body limit) to a FastAPI ``app``.

    Parameters
    ----------
    app : fastapi.FastAPI
        The application.
    host, port : str, int
        Where the server is bound. Requests must name this host, a loopback name or one of
        ``extra_hosts`` in ``Host``; bound to a wildcard address (``0.0.0.0``, ``::``) any
        ``Host`` is accepted, and a token is then required. An ``Origin``, when sent, must be this
        same server (scheme and the request's own ``Host``).
    token : str, optional
        Required on every request, as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``.
    max_body_bytes : int, optional
        Larger request bodies are refused (413): from ``Content-Length`` before any is read, and
        chunked bodies as soon as they pass the limit.
    extra_hosts : tuple of str
        Further names the server is reached by (e.g. its DNS name behind a proxy).
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse

    hosts = allowed_hosts(host, port, extra_hosts)
    if hosts is None and token is None:
        raise QueryError(f"binding to {host or 'every address'} needs a token")
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        seen = request.headers.get("host", "")
        if not seen or (hosts is not None and seen not in hosts):
            return JSONResponse({"detail": "forbidden host"}, status_code=403)
        origin = request.headers.get("origin")
        if origin is not None and origin not in (f"http://{seen}", f"https://{seen}"):
            return JSONResponse({"detail": "forbidden origin"}, status_code=403)
        if token is not None:
            given = request.query_params.get("token") or ""
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a valid token is required"}, status_code=401)
        return await call_next(request)


def presented_token(request) -> str | None:
    """The token a request carries (``Authorization: Bearer`` or ``?token=``), if any."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.query_params.get("token") or None


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to require (``token`` or ``$DERMRIS_TOKEN``).

    Binding beyond loopback without one is an error.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        raise QueryError(f"binding to {host} (beyond loopback) needs --token or {TOKEN_ENV}")
    return token


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening (connections wait in its backlog).

    Raises
    ------
    ConfigError
        The address cannot be bound (the port is in use, the host is not this machine's), in
        one line.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = (
            "; is another server running? pass another --port"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    sock.set_inheritable(True)
    return sock


def run(
    app,
    *,
    host: str,
    port: int,
    sock: socket.socket | None = None,
    on_ready: Callable[[], None] | None = None,
    limits=None,
    workers: int = 1,
) -> None:
    """Serve ``app`` with uvicorn until interrupted, with the timeouts and caps of
    :class:`~dermris.app._limits.ServerLimits` (``limits``; defaults when None).

    Parameters
    ----------
    app : ASGI application
        What to serve.
    host, port : str, int
        Where (bound here unless ``sock`` is given).
    sock : socket.socket, optional
        A socket from :func:`listen` (bind first, to fail before slow set-up).
    on_ready : callable, optional
        Called once the server accepts requests (e.g. to print its address).
    limits : ServerLimits, optional
        Header, body and keep-alive timeouts, connection and request caps.
    workers : int
        With more than one, ``app`` must be an import string of an application factory:
        that many processes answer on the one socket.

    Raises
    ------
    ConfigError
        The address cannot be bound, or the server did not start.
    """
    try:
        import uvicorn
    except ImportError:
        raise OptionalDependencyError(
            "the web pages need uvicorn: pip install 'dermris[serve]'"
        ) from None
    from uvicorn.supervisors import Multiprocess

    from ._limits import ServerLimits, connection_cap, protocol_for

    limits = connection_cap(limits or ServerLimits())

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit and on_ready is not None:
                on_ready()

    sock = sock if sock is not None else listen(host, port)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=protocol_for(limits),
        timeout_keep_alive=max(1, round(limits.keep_alive)),
        workers=workers if workers > 1 else None,
        factory=workers > 1,
    )
    try:
        if workers > 1:
            if on_ready is not None:
                on_ready()  # the socket listens; each worker answers once it has started
            Multiprocess(config, sockets=[sock]).run()
            return
        server = _Server(config)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ConfigError(f"the server on {host}:{port} did not start")
