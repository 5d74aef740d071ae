"""What the two web apps (search and judging) share: the request guard and the uvicorn runner.

The guard refuses requests whose ``Host`` or ``Origin`` is not this server (DNS rebinding and
cross-site requests) and, when a token is set, requests without it. The runner binds loopback
unless told otherwise and refuses to bind beyond loopback without a token.
"""

from __future__ import annotations

import ipaddress
import os
import secrets

from dermris.models.errors import OptionalDependencyError, QueryError

__all__ = ["TOKEN_ENV", "is_loopback", "install_guard", "run"]

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


def require_fastapi():
    """The ``fastapi`` module, or a one-line error naming the extra to install."""
    try:
        import fastapi
    except ImportError:
        raise OptionalDependencyError("the web pages need FastAPI: pip install 'dermris[serve]'") from None
    return fastapi


def install_guard(app, *, host: str, port: int, token: str | None, max_body_bytes: int | None = None) -> None:
    """Add the Host/Origin/token checks (and an optional body limit) to a FastAPI ``app``.

    Parameters
    ----------
    app : fastapi.FastAPI
        The application.
    host, port : str, int
        Where the server is reached; requests must name this host or a loopback name.
    token : str, optional
        Required on every request, as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``.
    max_body_bytes : int, optional
        Requests declaring a larger ``Content-Length`` are refused (413) before their body is read.
    """
    from fastapi import Request
    from fastapi.responses import JSONResponse

    names = {host, "127.0.0.1", "localhost", "[::1]"}
    hosts = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
    origins = {f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.headers.get("host", "") not in hosts:
            return JSONResponse({"detail": "forbidden host"}, status_code=403)
        origin = request.headers.get("origin")
        if origin is not None and origin not in origins:
            return JSONResponse({"detail": "forbidden origin"}, status_code=403)
        if token is not None:
            given = request.query_params.get("token") or ""
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a valid token is required"}, status_code=401)
        if max_body_bytes is not None:
            try:
                declared = int(request.headers.get("content-length", "0"))
            except ValueError:
                return JSONResponse({"detail": "bad Content-Length"}, status_code=400)
            if declared > max_body_bytes:
                return JSONResponse({"detail": f"request body over {max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to require (``token`` or ``$DERMRIS_TOKEN``); an error beyond loopback without one."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        raise QueryError(f"binding to {host} (beyond loopback) needs --token or {TOKEN_ENV}")
    return token


def run(app, *, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise OptionalDependencyError("the web pages need uvicorn: pip install 'dermris[serve]'") from None
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5)
