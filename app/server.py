"""``dermris serve``: one process that keeps a store's Retriever and model loaded, with an HTTP
API (FastAPI, OpenAPI docs at ``/api/docs``) and a search page for clinicians.

Safety: binds 127.0.0.1 unless told otherwise; requests whose ``Host`` or ``Origin`` is not this
server are refused (DNS rebinding); a token (``--token`` or ``DERMRIS_TOKEN``), required when
binding beyond loopback, is checked on every request; uploads are limited in bytes and, through
PIL's decompression-bomb limit, in pixels; images are served by row, never by path.

Needs the ``serve`` extra: ``pip install 'dermris[serve]'`` (fastapi, uvicorn, python-multipart).
"""

import base64
import io
import os
import threading
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import numpy as np
from PIL import Image

from dermris.core.errors import (
    DermrisError,
    ImageDecodeError,
    ModelUnavailableError,
    QueryError,
    StoreChangedError,
    UnknownMeasureError,
)
from dermris.core.imageio import decode_image, decode_image_bytes
from dermris.retriever import LesionQuery, QueryVectors, Retriever
from dermris.retriever.explain import mask_outline, style_stages
from dermris.retriever.measures import MEASURES

from . import _web
from ._web import TOKEN_ENV, is_loopback

__all__ = ["create_app", "serve", "is_loopback", "MAX_UPLOAD_BYTES", "TOKEN_ENV"]

MAX_UPLOAD_BYTES = 32 << 20
"""Largest upload accepted (a full-size ISIC JPEG is a few MB)."""

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
    """
    _web.require_fastapi()
    from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, Response

    retriever = Retriever.open(store, device=device)
    lock = (
        threading.Lock()
    )  # one search at a time: the retriever and the model are not shared state-safe

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

    def fail(exc: DermrisError):
        if isinstance(exc, (QueryError, UnknownMeasureError, ImageDecodeError)):
            raise HTTPException(400, str(exc).splitlines()[0])
        if isinstance(exc, (ModelUnavailableError, StoreChangedError)):
            raise HTTPException(409, str(exc).splitlines()[0])
        raise HTTPException(500, str(exc).splitlines()[0])

    def live_row(row: int) -> int:
        if not 0 <= row < len(retriever) or not retriever.live[row]:
            raise HTTPException(404, f"no row {row}")
        return row

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(_PAGE.read_text("utf-8"), headers={"Cache-Control": "no-store"})

    @app.get("/api/docs", include_in_schema=False)
    def docs(request: Request):
        # the page fetches the schema itself: it carries the token the page was opened with
        given = request.query_params.get("token")
        schema = "/api/openapi.json" + (f"?token={quote(given, safe='')}" if given else "")
        return get_swagger_ui_html(openapi_url=schema, title="dermris API")

    @app.get("/api/health", summary="Liveness and store size")
    def health():
        return {"status": "ok", "rows": len(retriever), "version": __version__}

    @app.get("/api/info", summary="What the store holds")
    def info():
        summary = retriever.store.describe()
        summary.pop("store", None)  # no server paths
        summary["metadata_columns"] = [
            c for c in summary.get("metadata_columns", []) if c not in _PRIVATE_COLUMNS
        ]
        summary["measures"] = list(MEASURES)
        return summary

    @app.post("/api/search", summary="Search by uploaded images or stored rows")
    def search(
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
        try:
            with lock:
                images = [_upload_image(f) for f in files]
                query: QueryVectors | LesionQuery
                if row is not None:
                    # the row's vectors carry it: it is excluded from its results
                    query = retriever.vectors(int(row))
                elif lesion:
                    query = LesionQuery([*images, *(int(r) for r in rows or ())])
                else:
                    query = retriever.embed(images[0])
                result = retriever.search(
                    query,
                    measures=measures or list(MEASURES),
                    k=k,
                    where=where or None,
                    columns=columns or (),
                    exclude=exclude or (),
                    explain=explain,
                    group_by=group_by or None,
                )
        except DermrisError as exc:
            fail(exc)
        payload = result.to_dict(paths=False)  # no server paths: images are served by row
        payload["query"] = {
            "row": row,
            "image_id": retriever.image_ids[row] if row is not None else None,
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
        return payload

    def _upload_image(upload) -> Image.Image:
        data = upload.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload over {max_upload_bytes} bytes")
        draft = 2 * retriever.store.model_config.image_size
        return decode_image_bytes(data, name=upload.filename or "upload", draft_size=draft)[0]

    @app.get("/api/image/{row}", summary="An indexed image by row (never by path)")
    def image(row: int, size: Annotated[int | None, Query(ge=16, le=4096)] = None):
        with lock:
            live_row(row)
            path = retriever.paths[row]
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
            headers={"Cache-Control": "private, max-age=3600"},
        )

    @app.get("/api/mask/{row}", summary="The outline of a row's lesion mask (transparent PNG)")
    def mask(row: int):
        with lock:
            live_row(row)
            packed = retriever.store.mask_rows([row])[0]
        return Response(_outline_png(packed, retriever.store.mask_size), media_type="image/png")

    @app.get(
        "/api/explain", summary="Which style stages make up the style loss between two stored rows"
    )
    def explain_rows(a: int, b: int):
        with lock:
            live_row(a)
            live_row(b)
            sa, sb = retriever.store.style_rows([a, b])
        stages = style_stages(retriever.store.layout, sa, sb)
        return {
            "a": a,
            "b": b,
            "style_loss": sum(s.loss for s in stages),
            "stages": [s.to_dict() for s in stages],
        }

    return app


def serve(
    store: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str = "auto",
    judge_session: str | os.PathLike | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> None:
    """Run the server until interrupted (uvicorn); beyond loopback a token is required."""
    token = _web.resolve_token(host, token)
    app = create_app(
        store,
        host=host,
        port=port,
        token=token,
        device=device,
        judge_session=judge_session,
        extra_hosts=extra_hosts,
    )
    _web.run(app, host=host, port=port)
