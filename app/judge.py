"""Blinded manual judgment of the nine measures (paper section 4.1) and its scoring.

``prepare_session`` samples query rows and, for each, pools the top k of all nine measures:
an image returned by several measures is judged once, the pool is shuffled per query, and every
image gets an opaque random token. What the judge sees (``tasks.json``, the page, the image
URLs) carries no measure names and no row numbers; the mapping lives in ``key.json``, read only
by :func:`score_session`. The judging page (:func:`judge_router`, on ``dermris judge`` or
``dermris serve --judge``) asks each rater for an id; every click is appended to
``judgments.jsonl`` with the rater id and a UTC timestamp and fsynced at once, so a closed
browser loses nothing, and agreement between raters can be measured (:class:`RaterAgreement`).
"""

import io
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np

from dermris.core.atomic import append_durably, atomic_write
from dermris.core.errors import ImageDecodeError, JudgeError
from dermris.indexer import decode_image
from dermris.retriever import Retriever
from dermris.retriever.measures import MEASURES

from . import _web

__all__ = [
    "PAPER_TABLE1",
    "JudgeError",
    "JudgeScore",
    "RaterAgreement",
    "create_judge_app",
    "judge_router",
    "prepare_session",
    "score_session",
    "serve",
]

PAPER_TABLE1 = {
    "euclidean": 40.8,
    "cosine": 34.0,
    "style": 61.2,
    "i1_ed": 18.0,
    "i1_cd": 10.0,
    "i1_ecd": 18.4,
    "i1_se": 44.4,
    "i1_sc": 46.4,
    "i1_sd": 6.0,
}
"""Success rates (%) of the paper's Table 1 (50 queries, top 5, one judge)."""

TASKS_FILE = "tasks.json"
KEY_FILE = "key.json"
JUDGMENTS_FILE = "judgments.jsonl"
_TOKEN = re.compile(r"^[0-9a-f]{16}$")


def _write_json(path: Path, payload) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(payload, indent=1))


def prepare_session(
    retriever: Retriever, out: str | os.PathLike, *, queries: int = 50, seed: int = 0, k: int = 5
) -> Path:
    """Sample queries, pool and blind their results, and write the session folder.

    Returns
    -------
    Path
        The session folder (``tasks.json``, ``key.json``, ``judgments.jsonl``).
    """
    out = Path(out)
    if (out / KEY_FILE).exists():
        raise JudgeError(f"{out} already holds a judgment session; use another folder or serve it")
    live = np.flatnonzero(retriever.live)
    if len(live) < 2:
        raise JudgeError("the store needs at least two images")
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(live, size=min(queries, len(live)), replace=False).tolist())
    paths = retriever.paths
    tasks: list[dict[str, Any]] = []
    key: dict[str, Any] = {
        "store": str(Path(retriever.store.root).resolve()),
        "k": k,
        "seed": seed,
        "queries": [],
        "images": {},
    }
    for qi, row in enumerate(rows, start=1):
        results = retriever.search(row, measures="all", k=k)
        pooled = sorted({h.row for hits in results.values() for h in hits})
        rng.shuffle(pooled)
        tokens = {r: secrets.token_hex(8) for r in pooled}
        query_token = secrets.token_hex(8)
        key["images"][query_token] = paths[row]
        for r, t in tokens.items():
            key["images"][t] = paths[r]
        name = f"Q{qi:03d}"
        tasks.append(
            {"query": name, "query_image": query_token, "items": [tokens[r] for r in pooled]}
        )
        key["queries"].append(
            {
                "query": name,
                "row": row,
                "image_id": retriever.image_ids[row],
                "items": {tokens[r]: r for r in pooled},
                "rankings": {m: [tokens[h.row] for h in hits] for m, hits in results.items()},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / KEY_FILE, key)
    _write_json(out / TASKS_FILE, {"version": 1, "k": k, "queries": tasks})
    (out / JUDGMENTS_FILE).touch()
    return out


RATER_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
"""What a rater id may be (matched in full): letters, digits and ``_ . @ -``, up to 64
characters."""


def rater_problem(value: object) -> str | None:
    """Why ``value`` is not a rater id, in one line, or None when it is one.

    The whole value must match :data:`RATER_PATTERN` (``re.fullmatch``: a ``$`` anchor would
    let ``"alice\n"`` through as a second rater ``alice``).
    """
    rule = "letters, digits and _ . @ - only, 1 to 64 characters"
    if not isinstance(value, str) or not value:
        return f"a rater id is required ({rule})"
    if len(value) > 64:
        return f"the rater id is {len(value)} characters long ({rule})"
    if any(ch.isspace() for ch in value):
        return f"the rater id {value!r} contains whitespace ({rule})"
    if any(not ch.isprintable() for ch in value):
        return f"the rater id {value!r} contains control characters ({rule})"
    if not RATER_PATTERN.fullmatch(value):
        return f"the rater id {value!r} is not allowed ({rule})"
    return None


ANONYMOUS = ""
"""The rater of judgments recorded before rater ids existed."""


def _load_judgments(out: Path) -> dict[tuple[str, str, str], bool]:
    """Latest judgment per (rater, query, item); torn last lines (a crash mid-write) are ignored."""
    judged: dict[tuple[str, str, str], bool] = {}
    path = out / JUDGMENTS_FILE
    if not path.exists():
        return judged
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            judged[(str(entry.get("rater", ANONYMOUS)), entry["query"], entry["item"])] = bool(
                entry["similar"]
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    return judged


def _session(out: str | os.PathLike) -> Path:
    out = Path(out)
    if not (out / KEY_FILE).exists() or not (out / TASKS_FILE).exists():
        raise JudgeError(f"{out} holds no judgment session (run dermris judge STORE --out {out})")
    return out


_PAGE = Path(__file__).with_name("judge_page.html")
MAX_JUDGMENT_BYTES = 4096
"""Largest judgment request body."""
FULL_SIZE_LIMIT = 4096
"""Longest side of an image shown at full resolution (larger ones are scaled down to it)."""


def judge_router(out: str | os.PathLike):
    """The judging page and its endpoints, as a FastAPI router (mounted at ``/judge``).

    Serves only the session's page, its task list, the session's images by opaque token (a
    thumbnail, or the full resolution with ``?full=true``), and the judgment endpoint. Each
    judgment is appended to ``judgments.jsonl`` with the rater id and the server's UTC time, and
    fsynced before the answer, so a closed browser loses nothing.
    """
    from datetime import datetime

    from fastapi import APIRouter, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, Response

    out = _session(out)
    key = json.loads((out / KEY_FILE).read_text())
    tasks = json.loads((out / TASKS_FILE).read_text())
    images = key["images"]
    valid = {(t["query"], i) for t in tasks["queries"] for i in t["items"]}
    lock = threading.Lock()
    router = APIRouter(tags=["judging"])

    def append(line: str) -> None:
        with lock:
            append_durably(out / JUDGMENTS_FILE, line)

    def rater_id(value) -> str:
        problem = rater_problem(value)
        if problem is not None:
            raise HTTPException(400, problem)
        assert isinstance(value, str)
        return value

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(_PAGE.read_text("utf-8"), headers={"Cache-Control": "no-store"})

    @router.get("/api/tasks", summary="The blinded tasks and one rater's judgments so far")
    def session_tasks(rater: str):
        rater = rater_id(rater)
        judged = {f"{q}/{i}": v for (r, q, i), v in _load_judgments(out).items() if r == rater}
        return Response(
            json.dumps({"tasks": tasks, "judged": judged}),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    @router.post("/api/judgments", summary="Record one judgment (fsynced before the answer)")
    async def record(request: Request):
        body = b""
        async for (
            part
        ) in request.stream():  # read no further than the limit, whatever the server's body limit
            body += part
            if len(body) > MAX_JUDGMENT_BYTES:
                raise HTTPException(
                    413, f"a judgment is a JSON object of at most {MAX_JUDGMENT_BYTES} bytes"
                )
        if not body:
            raise HTTPException(400, "a judgment is a JSON object: {query, item, similar, rater}")
        try:
            entry = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise HTTPException(400, "bad judgment: not JSON (or nested too deeply)") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("similar"), bool):
            raise HTTPException(
                400, "bad judgment: expected {query, item, similar: true|false, rater}"
            )
        query, item = entry.get("query"), entry.get("item")
        if not isinstance(query, str) or not isinstance(item, str) or (query, item) not in valid:
            raise HTTPException(400, "bad judgment: unknown query or item")
        record = {
            "rater": rater_id(entry.get("rater")),
            "query": query,
            "item": item,
            "similar": entry["similar"],
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        await run_in_threadpool(
            append, json.dumps(record) + "\n"
        )  # the fsync does not hold up the event loop
        return {"ok": True, "time": record["time"]}

    @router.get("/image/{token}", summary="A session image by its opaque token")
    def image(token: str, full: bool = False):
        if not _TOKEN.match(token) or token not in images:
            raise HTTPException(404, "unknown image")
        try:
            picture = decode_image(images[token])[0]
        except ImageDecodeError:
            raise HTTPException(404, "image file unavailable") from None
        picture.thumbnail((FULL_SIZE_LIMIT, FULL_SIZE_LIMIT) if full else (400, 400))
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=92 if full else 90)
        return Response(
            buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store"}
        )

    return router


def create_judge_app(
    out: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    extra_hosts: tuple[str, ...] = (),
):
    """A FastAPI application serving only the judging page of session ``out`` at ``/judge/``.

    Requests whose Host or Origin is not this server are refused (403: DNS rebinding), bodies are
    limited to 4 KB of JSON, and ``token`` (when given) is required on every request.
    """
    return _web.router_app(
        judge_router(out),
        prefix="/judge",
        title="dermris judge",
        host=host,
        port=port,
        token=token,
        max_body_bytes=MAX_JUDGMENT_BYTES,
        extra_hosts=extra_hosts,
    )


def serve(
    out: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> None:
    """Serve the judging page of session ``out`` until interrupted (uvicorn).

    It binds to ``host`` (loopback unless told otherwise; beyond loopback a token is required).
    """
    token = _web.resolve_token(host, token)
    _web.run(
        create_judge_app(out, host=host, port=port, token=token, extra_hosts=extra_hosts),
        host=host,
        port=port,
    )


@dataclass(frozen=True)
class RaterAgreement:
    """How two raters agree on the images both judged.

    Attributes
    ----------
    raters : tuple of str
        The two rater ids.
    items : int
        Images (query, image pairs) both judged.
    percent : float or None
        Share of those on which they agree (percent); None when they judged none in common.
    kappa : float or None
        Cohen's kappa (agreement beyond chance); None when undefined (no common items, or both
        raters gave one answer throughout).
    """

    raters: tuple[str, str]
    items: int
    percent: float | None
    kappa: float | None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "raters": list(self.raters),
            "items": self.items,
            "percent": self.percent,
            "kappa": self.kappa,
        }


def _agreement(a: str, b: str, ja: dict, jb: dict) -> RaterAgreement:
    common = sorted(set(ja) & set(jb))
    if not common:
        return RaterAgreement((a, b), 0, None, None)
    x = np.array([ja[c] for c in common], bool)
    y = np.array([jb[c] for c in common], bool)
    observed = float(np.mean(x == y))
    chance = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean()))
    kappa = (observed - chance) / (1 - chance) if chance < 1 else None
    return RaterAgreement((a, b), len(common), 100.0 * observed, kappa)


@dataclass
class JudgeScore:
    """Success rate per measure (percent), over the queries whose results are all judged.

    With several raters, every (rater, query) whose results that rater judged completely counts
    once: ``success`` is the mean over those; ``per_rater`` gives each rater's own rates and
    ``agreement`` each pair's agreement. With one rater this is the paper's Table 1 protocol.

    Attributes
    ----------
    success : dict of str to float or None
        Per measure; None while nothing is complete.
    complete_queries : int
        Queries complete for at least one rater.
    total_queries, judged_items, total_items : int
        Queries in the session; (query, image) pairs judged by anyone; pairs in the session.
    per_rater : dict of str to dict
        Rater id (``""`` for judgments recorded before rater ids) -> ``success``,
        ``complete_queries``, ``judged_items``.
    agreement : list of RaterAgreement
        One per pair of raters.
    """

    success: dict[str, float | None]
    complete_queries: int
    total_queries: int
    judged_items: int
    total_items: int
    per_rater: dict[str, dict] = field(default_factory=dict)
    agreement: list[RaterAgreement] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form, with the paper's numbers beside."""
        return {
            "success_rate_percent": self.success,
            "paper_table1_percent": PAPER_TABLE1,
            "complete_queries": self.complete_queries,
            "total_queries": self.total_queries,
            "judged_items": self.judged_items,
            "total_items": self.total_items,
            "per_rater": self.per_rater,
            "agreement": [a.to_dict() for a in self.agreement],
        }


def score_session(out: str | os.PathLike, *, rater: str | None = None) -> JudgeScore:
    """Turn the judgments into Table 1: per measure, the mean over queries of similar / k.

    Parameters
    ----------
    out : path-like
        The session folder.
    rater : str, optional
        Score only this rater's judgments (default: every rater, see :class:`JudgeScore`).
    """
    out = Path(out)
    if not (out / KEY_FILE).exists():
        raise JudgeError(f"{out} holds no judgment session")
    key = json.loads((out / KEY_FILE).read_text())
    by_rater: dict[str, dict[tuple[str, str], bool]] = {}
    for (r, q, i), v in _load_judgments(out).items():
        by_rater.setdefault(r, {})[(q, i)] = v
    if rater is not None:
        if rater not in by_rater:
            raise JudgeError(
                f"no judgments by rater {rater!r} (raters: {', '.join(sorted(by_rater)) or 'none'})"
            )
        by_rater = {rater: by_rater[rater]}
    k = key["k"]

    def rates_of(judged: dict) -> tuple[dict[str, list[float]], set[str]]:
        rates: dict[str, list[float]] = {m: [] for m in MEASURES}
        complete = set()
        for q in key["queries"]:
            if not all((q["query"], i) in judged for i in q["items"]):
                continue
            complete.add(q["query"])
            for m, ranking in q["rankings"].items():
                rates[m].append(100.0 * sum(judged[(q["query"], t)] for t in ranking) / k)
        return rates, complete

    def mean(values: list[float]) -> float | None:
        return (
            float(np.mean(values)) if values else None
        )  # None: nothing judged yet (valid JSON, no NaN)

    pooled: dict[str, list[float]] = {m: [] for m in MEASURES}
    complete_any: set[str] = set()
    per_rater = {}
    for r, judged in sorted(by_rater.items()):
        rates, complete = rates_of(judged)
        complete_any |= complete
        for m in MEASURES:
            pooled[m] += rates[m]
        per_rater[r] = {
            "success_rate_percent": {m: mean(v) for m, v in rates.items()},
            "complete_queries": len(complete),
            "judged_items": len(judged),
        }
    names = sorted(by_rater)
    agreement = [
        _agreement(a, b, by_rater[a], by_rater[b])
        for x, a in enumerate(names)
        for b in names[x + 1 :]
    ]
    total_items = sum(len(q["items"]) for q in key["queries"])
    judged_any = set().union(*by_rater.values()) if by_rater else set()
    return JudgeScore(
        success={m: mean(v) for m, v in pooled.items()},
        complete_queries=len(complete_any),
        total_queries=len(key["queries"]),
        judged_items=len(judged_any),
        total_items=total_items,
        per_rater=per_rater,
        agreement=agreement,
    )
