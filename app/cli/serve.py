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
def serve_cmd(store, host, port, token, device, judge_dir, extra_hosts):
    """Serve a search page and an HTTP API over STORE (OpenAPI docs at /api/docs)."""
    from dermris.app import _web
    from dermris.app.server import create_app

    token = _web.resolve_token(host, token)
    sock = _web.listen(host, port)  # a port in use fails now, in one line
    try:
        app = create_app(
            store,
            host=host,
            port=port,
            token=token,
            device=device,
            judge_session=judge_dir,
            extra_hosts=extra_hosts,
        )
    except BaseException:
        sock.close()
        raise
    _web.run(
        app,
        host=host,
        port=port,
        sock=sock,
        on_ready=lambda: click.echo(
            f"dermris: http://{host}:{port}/ (API docs: /api/docs; Ctrl-C to stop)", err=True
        ),
    )
