"""A real uvicorn server on a free loopback port, in a thread, for tests that need sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(make_app, *, timeout: float = 20.0, limits=None):
    """Run ``make_app(port)`` under uvicorn on 127.0.0.1; yields the base URL.

    With ``limits`` (a :class:`dermris.app._limits.ServerLimits`), under the guarded protocol
    ``dermris serve`` uses.
    """
    import uvicorn

    port = free_port()
    extra = {}
    if limits is not None:
        from dermris.app._limits import protocol_for

        keep = max(1, round(limits.keep_alive))
        extra = {"http": protocol_for(limits), "timeout_keep_alive": keep}
    else:
        extra = {"timeout_keep_alive": 5}
    server = uvicorn.Server(
        uvicorn.Config(make_app(port), host="127.0.0.1", port=port, log_level="warning", **extra)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
