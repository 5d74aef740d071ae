"""``dermris serve``: one process that keeps a store's Retriever and model loaded, with an HTTP
API (FastAPI, OpenAPI docs at ``/api/docs``) and a search page for clinicians.

Safety: binds 127.0.0.1 unless told otherwise; requests whose ``Host`` or ``Origin`` is not this
server are refused (DNS rebinding); a token (``--token`` or ``DERMRIS_TOKEN``), required when
binding beyond loopback, is checked on every request; uploads are limited in bytes and, through
PIL's decompression-bomb limit and a per-request budget, in pixels (decoded before the search
lock is taken); images are served by row, never by path; messages name no server path.

The server follows the store (:mod:`dermris.app._follow`): deletions are seen by every
endpoint at once, new rows within about a second, and a compaction by another process is
followed by reopening the new generation; answers carry ``generation``. Slow and hostile clients
meet deadlines and caps (:mod:`dermris.app._limits`); ``/metrics`` and the audit log are in
:mod:`dermris.app._ops`. See docs/operations.md.

Needs the ``serve`` extra: ``pip install 'dermris[serve]'`` (fastapi, uvicorn, python-multipart,
and fastapi-offline, whose Swagger UI files ``/api/docs`` serves itself: no third-party script).
"""

import base64
import hashlib
import io
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from dermris.core.errors import (
    DermrisError,
    ImageDecodeError,
    ModelUnavailableError,
    PixelBudgetError,
    QueryError,
    StoreChangedError,
    UnknownMeasureError,
)
from dermris.core.imageio import decode_image, decode_image_bytes
from dermris.retriever import LesionQuery, QueryVectors, Retriever
from dermris.retriever.explain import mask_outline, style_stages
from dermris.retriever.measures import DICE_MEASURES, MEASURES

from . import _ops, _web
from ._follow import FollowedStore, Snapshot
from ._web import TOKEN_ENV, is_loopback, public_message

__all__ = [
    "create_app",
    "serve",
    "is_loopback",
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_PIXELS",
    "TOKEN_ENV",
    "GENERATION_HEADER",
]

DOCS_STATIC = "/api/docs/static/"
"""Where the docs page's Swagger UI files are served from (only the names in ``_DOCS_FILES``)."""

_DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
# the docs page loads nothing from elsewhere, and its inline start-up script is the only one
_DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def _docs_folder() -> Path | None:
    """The folder of Swagger UI files that fastapi-offline ships (None when not installed)."""
    from importlib.util import find_spec

    spec = find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if all((folder / name).is_file() for name in _DOCS_FILES) else None


MAX_UPLOAD_BYTES = 32 << 20
"""Largest upload accepted (a full-size ISIC JPEG is a few MB)."""

MAX_UPLOAD_PIXELS = 40_000_000
"""Most pixels an upload may decode to (after a JPEG's draft shrink): 40 MP, above the largest
dermoscopy photographs; a 7000 x 7000 image is refused (413) before its pixels are decoded."""

GENERATION_HEADER = "X-Dermris-Generation"
"""Response header of ``/api/image`` and ``/api/mask``: the store generation the row is of."""

_PAGE = Path(__file__).with_name("search_page.html")
_PRIVATE_COLUMNS = frozenset({"path"})
"""Metadata the server never returns (where the images live on the server)."""


def _outline_png(packed: np.ndarray, size: int, colour=(255, 230, 0, 255)) -> bytes:
    outline = mask_outline(packed, size)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[outline] = colour
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def create_app(
    store: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str = "auto",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    judge_session: str | os.PathLike | None = None,
    extra_hosts: tuple[str, ...] = (),
    max_upload_pixels: int | None = MAX_UPLOAD_PIXELS,
    poll_seconds: float = 1.0,
    audit_log: str | os.PathLike | None = None,
    metrics_dir: str | os.PathLike | None = None,
    max_requests: int = 128,
):
    """The FastAPI application serving ``store``.

    Parameters
    ----------
    store : path-like
        The store.
    host, port : str, int
        Where the server is reached: requests must name this host (or loopback) in ``Host``.
    token : str, optional
        Required on every request (``Authorization: Bearer TOKEN`` or ``?token=TOKEN``).
    device : str
        Where queries are embedded and ranked.
    max_upload_bytes : int
        Larger uploads are refused (413).
    judge_session : path-like, optional
        A judgment session folder (``dermris judge --out``) to serve at ``/judge/`` as well.
    extra_hosts : tuple of str
        Further names the server is reached by (``--allowed-host``), besides ``host`` and loopback.
    max_upload_pixels : int, optional
        Uploads decoding to more pixels are refused (413) before their pixels are decoded.
    poll_seconds : float
        How often the store's manifest is looked at for new rows and compactions by other
        processes (0: only when a request meets a compacted store).
    audit_log : path-like, optional
        Append a JSON line per search here (fsynced, rotated by size).
    metrics_dir : path-like, optional
        Folder shared by the workers of one server for ``/metrics`` (default:
        ``$DERMRIS_METRICS_DIR``, else this process alone).
    max_requests : int
        Requests in progress beyond which new ones get 503 (``/api/health`` and ``/metrics``
        are always answered).
    """
    _web.require_fastapi()
    from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import FileResponse, HTMLResponse, Response

    follow = FollowedStore(store, device=device, poll_seconds=poll_seconds)
    root = follow.root

    from dermris.retriever import __version__

    app = FastAPI(
        title="dermris",
        version=__version__,
        docs_url=None,
        openapi_url="/api/openapi.json",
        redoc_url=None,
        description="Content-based image retrieval for dermoscopy: nine exact similarity measures.",
    )

    # multipart framing around the file: a little over the upload limit
    _web.install_guard(
        app,
        host=host,
        port=port,
        token=token,
        max_body_bytes=max_upload_bytes + (1 << 20),
        extra_hosts=tuple(extra_hosts),
    )
    if judge_session is not None:
        from .judge import judge_router

        app.include_router(judge_router(judge_session), prefix="/judge")

    app.state.follow = follow
    metrics = _ops.Metrics(metrics_dir or os.environ.get(_ops.METRICS_DIR_ENV) or None)
    audit = _ops.AuditLog(audit_log) if audit_log is not None else None
    app.add_middleware(_web.InFlightLimit, max_requests=max_requests)
    app.add_middleware(_ops.RequestMetrics, metrics=metrics)

    def observe_search(
        request: Request,
        *,
        status: int,
        row: int | None,
        measures: tuple[str, ...],
        k: int,
        where: str | None,
        stage_seconds: dict[str, float],
        upload_sha256: str | None = None,
        generation: str | None = None,
    ) -> None:
        """Metrics and the audit line of one search."""
        if status == 200:
            kind = "row" if row is not None else "upload"
            metrics.count("dermris_searches_total", {"kind": kind})
            for m in measures:
                if f"rank {m}" in stage_seconds:
                    metrics.observe(
                        "dermris_search_measure_seconds", {"measure": m}, stage_seconds[f"rank {m}"]
                    )
        if audit is not None:
            audit.write(
                {
                    "client": request.client.host if request.client else None,
                    "token_id": _ops.token_id(_web.presented_token(request)),
                    "status": status,
                    "row": row,
                    "upload_sha256": upload_sha256,
                    "measures": list(measures),
                    "k": k,
                    "where": where,
                    "generation": generation,
                }
            )

    def fail(exc: DermrisError):
        message = public_message(exc, root)  # one line, no server paths
        if isinstance(exc, (QueryError, UnknownMeasureError, ImageDecodeError)):
            raise HTTPException(400, message)
        if isinstance(exc, (ModelUnavailableError, StoreChangedError)):
            raise HTTPException(409, message)
        raise HTTPException(500, message)

    def live_row(retriever: Retriever, row: int) -> int:
        """``row`` if it is committed and not deleted (as of now), else 404."""
        if not 0 <= row < len(retriever):
            raise HTTPException(404, f"no row {row} (the store has {len(retriever)} rows)")
        if not retriever.live[row]:
            raise HTTPException(404, f"row {row} was deleted")
        return row

    def same_generation(retriever: Retriever, generation: str | None) -> None:
        """Row numbers a client got from another generation name other images: 409."""
        if generation is not None and generation != (retriever.generation or ""):
            raise HTTPException(
                409,
                f"row numbers of generation {generation} are out of date: the store was "
                f"compacted (now generation {retriever.generation}); search again",
            )

    def on_store(work):
        """``work(retriever)`` on one generation of the store, with clear errors."""
        try:
            return follow.run(work)
        except DermrisError as exc:
            fail(exc)
            raise  # unreachable: fail raises

    def generation_headers(snap: Snapshot) -> dict[str, str]:
        return {GENERATION_HEADER: snap.generation or ""}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(_PAGE.read_text("utf-8"), headers={"Cache-Control": "no-store"})

    docs_folder = _docs_folder()

    @app.get("/api/docs", include_in_schema=False)
    def docs(request: Request):
        # the page fetches the schema and Swagger UI from this server, with the page's token
        if docs_folder is None:
            raise HTTPException(
                503, "the API docs need fastapi-offline: pip install 'dermris[serve]'"
            )
        given = request.query_params.get("token")
        carry = f"?token={quote(given, safe='')}" if given else ""
        page = get_swagger_ui_html(
            openapi_url="/api/openapi.json" + carry,
            title="dermris API",
            swagger_js_url=f"{DOCS_STATIC}swagger-ui-bundle.js{carry}",
            swagger_css_url=f"{DOCS_STATIC}swagger-ui.css{carry}",
            swagger_favicon_url=f"{DOCS_STATIC}favicon.png{carry}",
            swagger_ui_parameters={"validatorUrl": None},  # no badge from swagger.io
        )
        page.headers["Content-Security-Policy"] = _DOCS_CSP
        page.headers["Referrer-Policy"] = "no-referrer"
        page.headers["Cache-Control"] = "no-store"
        return page

    @app.get(DOCS_STATIC + "{name}", include_in_schema=False)
    def docs_static(name: str):
        # only the known names: the request never names a path
        media = _DOCS_FILES.get(name)
        if media is None or docs_folder is None:
            raise HTTPException(404, "no such docs file")
        return FileResponse(
            docs_folder / name,
            media_type=media,
            headers={
                "Cache-Control": "private, max-age=86400",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get("/metrics", include_in_schema=False)
    def prometheus():
        snap = follow.current
        live = int(snap.retriever.live.sum())
        body = metrics.render(
            {
                "dermris_store_rows": [({}, snap.rows)],
                "dermris_store_live_rows": [({}, live)],
                "dermris_store_generation": [({"generation": snap.generation or ""}, 1)],
                "dermris_store_reopens_total": [({}, follow.reopens)],
            }
        )
        return Response(body, media_type=_ops.CONTENT_TYPE)

    @app.get("/api/health", summary="Liveness, store size and generation")
    async def health():
        # on the event loop, without the search lock: answers while searches queue
        snap = follow.current
        return {
            "status": "ok",
            "rows": snap.rows,
            "version": __version__,
            "generation": snap.generation,
        }

    @app.get("/api/info", summary="What the store holds")
    def info():
        def describe(retriever: Retriever):
            return retriever.store.describe()

        summary, snap = on_store(describe)
        summary["generation"] = snap.generation
        summary.pop("store", None)  # no server paths
        summary["metadata_columns"] = [
            c for c in summary.get("metadata_columns", []) if c not in _PRIVATE_COLUMNS
        ]
        summary["measures"] = list(MEASURES)
        summary["segmenter_trained"] = snap.retriever.segmenter_trained
        summary["preset"] = snap.retriever.store.model_config.name
        return summary

    @app.post("/api/search", summary="Search by uploaded images or stored rows")
    def search(
        request: Request,
        file: Annotated[
            list[UploadFile] | None,
            File(
                description=(
                    "A dermoscopy image (JPEG, PNG, BMP, TIFF); several file parts are one "
                    "lesion query"
                )
            ),
        ] = None,
        row: Annotated[
            int | None, Form(description="A stored row as the query (excluded from its results)")
        ] = None,
        rows: Annotated[
            list[int] | None,
            Form(description="Stored rows of one lesion, asked (with any files) as one query"),
        ] = None,
        measures: Annotated[
            list[str] | None, Form(description="Measures (default: all nine)")
        ] = None,
        k: Annotated[int, Form(ge=1, le=1000)] = 5,
        where: Annotated[
            str | None, Form(description="Metadata filter, e.g. diagnosis == 'melanoma'")
        ] = None,
        columns: Annotated[list[str] | None, Form(description="Metadata columns to return")] = None,
        exclude: Annotated[list[int] | None, Form(description="Rows never returned")] = None,
        explain: Annotated[
            bool, Form(description="Add style-stage breakdowns and mask outlines")
        ] = False,
        group_by: Annotated[
            str | None,
            Form(description="One hit per group of this column (e.g. lesion_id), its best row"),
        ] = None,
        generation: Annotated[
            str | None,
            Form(description="The generation `row` and `exclude` come from (409 if out of date)"),
        ] = None,
    ):
        files = [f for f in (file or []) if f is not None]
        lesion = len(files) + len(rows or ()) > 1 or bool(rows)
        if row is not None and (files or rows):
            raise HTTPException(400, "give either a row, or image files and rows")
        if row is None and not files and not rows:
            raise HTTPException(400, "give either an image file or a row")
        hidden = sorted((set(columns or ()) | {group_by or ""}) & _PRIVATE_COLUMNS)
        if hidden:
            raise HTTPException(
                400, f"column {hidden[0]!r} is not served (images are served by row)"
            )
        images = []
        upload_sha256 = None
        audit_line: dict[str, Any] = {
            "row": row,
            "measures": tuple(measures or MEASURES),
            "k": k,
            "where": where,
            "stage_seconds": {},
        }
        draft = 2 * follow.retriever.store.model_config.image_size
        for upload in files:
            # read and decoded before the search lock is taken, within a pixel budget
            data = upload.file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise HTTPException(413, f"upload over {max_upload_bytes} bytes")
            digest = hashlib.sha256(data).hexdigest()
            upload_sha256 = digest if upload_sha256 is None else f"{upload_sha256},{digest}"
            try:
                images.append(
                    decode_image_bytes(
                        data,
                        name=upload.filename or "upload",
                        draft_size=draft,
                        max_pixels=max_upload_pixels,
                    )[0]
                )
            except PixelBudgetError as exc:
                observe_search(request, status=413, upload_sha256=upload_sha256, **audit_line)
                raise HTTPException(413, public_message(exc, root)) from None
            except DermrisError as exc:
                observe_search(request, status=400, upload_sha256=upload_sha256, **audit_line)
                fail(exc)
            del data

        def run_search(retriever: Retriever):
            query: QueryVectors | LesionQuery
            if row is not None:
                same_generation(retriever, generation)
                # the row's vectors carry it: it is excluded from its results
                query = retriever.vectors(int(row))
            elif lesion:
                if rows:
                    same_generation(retriever, generation)
                query = LesionQuery([*images, *(int(r) for r in rows or ())])
            else:
                query = retriever.embed(images[0])
            if exclude and row is None:
                same_generation(retriever, generation)
            retriever.sync()
            deleted = len(retriever.store.deleted_rows)  # as the search starts
            result = retriever.search(
                query,
                measures=measures or list(MEASURES),
                k=k,
                where=where or None,
                columns=columns or (),
                exclude=exclude or (),
                explain=explain,
                group_by=group_by or None,
                hidden_columns=_PRIVATE_COLUMNS,  # never filtered on, like never returned
            )
            image_id = retriever.image_ids[row] if row is not None else None
            return result, image_id, deleted, retriever.segmenter_trained

        try:
            (result, image_id, deleted, segmenter_trained), snap = on_store(run_search)
        except HTTPException as exc:
            observe_search(
                request,
                status=exc.status_code,
                upload_sha256=upload_sha256,
                generation=None,
                **audit_line,
            )
            raise
        payload = result.to_dict(paths=False)  # no server paths: images are served by row
        payload["generation"] = snap.generation
        payload["deleted"] = deleted
        if not segmenter_trained:  # the Dice part of these measures is noise
            for measure in set(payload["results"]) & set(DICE_MEASURES):
                for hit in payload["results"][measure]:
                    hit["untrained_masks"] = True
        payload["query"] = {
            "row": row,
            "image_id": image_id,
            "filename": files[0].filename if len(files) == 1 and not lesion else None,
        }
        if lesion:
            payload["query"]["lesion"] = {
                "rows": [int(r) for r in rows or ()],
                "filenames": [f.filename for f in files],
            }
        why = result.explanation
        if why is not None:
            payload["query"]["mask_outline_png"] = base64.b64encode(
                _outline_png(why.query_mask, why.mask_size)
            ).decode()
        audit_line["stage_seconds"] = result.stats.stage_seconds
        observe_search(
            request,
            status=200,
            upload_sha256=upload_sha256,
            generation=snap.generation,
            **audit_line,
        )
        return payload

    @app.get("/api/image/{row}", summary="An indexed image by row (never by path)")
    def image_of_row(
        row: int,
        size: Annotated[int | None, Query(ge=16, le=4096)] = None,
        generation: Annotated[str | None, Query(description="409 if out of date")] = None,
    ):
        def path_of(retriever: Retriever) -> str:
            same_generation(retriever, generation)
            return retriever.paths[live_row(retriever, row)]

        path, snap = on_store(path_of)
        try:
            picture = decode_image(path)[0]
        except ImageDecodeError:
            raise HTTPException(404, f"the image file of row {row} is not available") from None
        if size is not None:
            picture.thumbnail((size, size))
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=90)
        return Response(
            buf.getvalue(),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600"} | generation_headers(snap),
        )

    @app.get("/api/mask/{row}", summary="The outline of a row's lesion mask (transparent PNG)")
    def mask(
        row: int,
        generation: Annotated[str | None, Query(description="409 if out of date")] = None,
    ):
        def mask_of(retriever: Retriever):
            same_generation(retriever, generation)
            packed = retriever.store.mask_rows([live_row(retriever, row)])[0]
            return packed, retriever.store.mask_size

        (packed, size), snap = on_store(mask_of)
        return Response(
            _outline_png(packed, size), media_type="image/png", headers=generation_headers(snap)
        )

    @app.get(
        "/api/explain", summary="Which style stages make up the style loss between two stored rows"
    )
    def explain_rows(
        a: int,
        b: int,
        generation: Annotated[str | None, Query(description="409 if out of date")] = None,
    ):
        def stages_of(retriever: Retriever):
            same_generation(retriever, generation)
            sa, sb = retriever.store.style_rows([live_row(retriever, a), live_row(retriever, b)])
            return style_stages(retriever.store.layout, sa, sb)

        stages, snap = on_store(stages_of)
        return {
            "a": a,
            "b": b,
            "generation": snap.generation,
            "style_loss": sum(s.loss for s in stages),
            "stages": [s.to_dict() for s in stages],
        }

    return app


SERVE_ENV = "DERMRIS_SERVE_APP"
"""Environment variable carrying the app's settings (JSON) to the workers of ``--workers N``."""


def app_from_environment():
    """The application of one worker of ``dermris serve --workers N`` (an app factory for
    uvicorn): settings from ``$DERMRIS_SERVE_APP``, the token from ``$DERMRIS_TOKEN``."""
    settings = json.loads(os.environ[SERVE_ENV])
    settings["extra_hosts"] = tuple(settings.get("extra_hosts", ()))
    return create_app(settings.pop("store"), token=os.environ.get(TOKEN_ENV) or None, **settings)


def serve(
    store: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str = "auto",
    judge_session: str | os.PathLike | None = None,
    extra_hosts: tuple[str, ...] = (),
    workers: int = 1,
    limits=None,
    audit_log: str | os.PathLike | None = None,
    max_upload_pixels: int | None = MAX_UPLOAD_PIXELS,
    sock: socket.socket | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the server until interrupted (uvicorn); beyond loopback a token is required.

    Parameters
    ----------
    workers : int
        Processes answering on one socket; each maps the store (the page cache shares it) and
        loads the model only when it gets an image query.
    limits : ServerLimits, optional
        Timeouts and caps (:class:`dermris.app._limits.ServerLimits`; defaults when None).
    audit_log : path-like, optional
        Append a JSON line per search here (fsynced, rotated by size).
    sock : socket.socket, optional
        A listening socket (:func:`dermris.app._web.listen`): bind first, so that a port in use
        fails before the store is opened.
    on_ready : callable, optional
        Called once the server accepts requests (e.g. to print its address).
    """
    from ._limits import ServerLimits

    token = _web.resolve_token(host, token)
    limits = limits or ServerLimits()
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "device": device,
        "judge_session": str(judge_session) if judge_session is not None else None,
        "extra_hosts": list(extra_hosts),
        "audit_log": str(audit_log) if audit_log is not None else None,
        "max_upload_pixels": max_upload_pixels,
        "max_requests": limits.max_requests,
    }
    if workers <= 1:
        app = create_app(store, token=token, **settings)
        _web.run(app, host=host, port=port, limits=limits, sock=sock, on_ready=on_ready)
        return
    Retriever.open(store, device="cpu")  # a store that cannot be opened fails here, once
    with tempfile.TemporaryDirectory(prefix="dermris-metrics-") as metrics_dir:
        os.environ[SERVE_ENV] = json.dumps({"store": str(store), **settings})
        os.environ[_ops.METRICS_DIR_ENV] = metrics_dir
        if token is not None:
            os.environ[TOKEN_ENV] = token
        _web.run(
            "dermris.app.server:app_from_environment",
            host=host,
            port=port,
            limits=limits,
            workers=workers,
            sock=sock,
            on_ready=on_ready,
        )
