"""``dermris serve``: the search page and the HTTP API."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import DEVICES, command, main


@command(main, "serve")
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; beyond loopback a token is required.",
)
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8000, show_default=True)
@click.option(
    "--token",
    default=None,
    help="Access token required on every request [default: $DERMRIS_TOKEN].",
)
@click.option("--device", type=DEVICES, default="auto", show_default=True)
@click.option(
    "--judge",
    "judge_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also serve this judgment session (dermris judge --out) at /judge/.",
)
@click.option(
    "--allowed-host",
    "extra_hosts",
    multiple=True,
    help="Another name the server is reached by (e.g. a DNS name; repeatable).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    help="Processes answering on one socket (they share the memory-mapped store).",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append a JSON line per search to this file (fsynced, rotated at 64 MB).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a request's head may take, from its first byte.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds a request's body may take, from the end of its head.",
)
@click.option(
    "--keep-alive",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds an idle keep-alive connection is kept.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=16),
    default=1000,
    show_default=True,
    help="Open connections beyond which stalled or idle ones are closed (oldest first).",
)
@click.option(
    "--max-requests",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Requests in progress beyond which new ones get 503 (health and metrics excepted).",
)
@click.option(
    "--max-upload-pixels",
    type=click.IntRange(min=1),
    default=40_000_000,
    show_default=True,
    help="Uploads decoding to more pixels are refused (413).",
)
def serve_cmd(
    store,
    host,
    port,
    token,
    device,
    judge_dir,
    extra_hosts,
    workers,
    audit_log,
    header_timeout,
    body_timeout,
    keep_alive,
    max_connections,
    max_requests,
    max_upload_pixels,
):
    """Serve a search page and an HTTP API over STORE (OpenAPI docs at /api/docs)."""
    from dermris.app import _web
    from dermris.app._limits import ServerLimits
    from dermris.app.server import serve

    token = _web.resolve_token(host, token)
    sock = _web.listen(host, port)  # a port in use fails now, in one line
    try:
        serve(
            store,
            host=host,
            port=port,
            token=token,
            device=device,
            judge_session=judge_dir,
            extra_hosts=extra_hosts,
            workers=workers,
            limits=ServerLimits(
                header_timeout=header_timeout,
                body_timeout=body_timeout,
                keep_alive=keep_alive,
                max_connections=max_connections,
                max_requests=max_requests,
            ),
            audit_log=audit_log,
            max_upload_pixels=max_upload_pixels,
            sock=sock,
            on_ready=lambda: click.echo(
                f"dermris: http://{host}:{port}/ (API docs: /api/docs; Ctrl-C to stop)", err=True
            ),
        )
    finally:
        sock.close()
