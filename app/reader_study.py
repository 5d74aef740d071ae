"""A reader study in crossover: each case diagnosed with and without the retrieved images.

``prepare_reader_study`` samples labelled query rows (the cases) and retrieves, for each, the
top k of one measure (leaving the query's lesion out when the store has ``lesion_id``), with
their labels: what a reader sees in the *with retrieval* arm. The labels of the cases and the
rows stay in ``reader_key.json``; ``reader_study.json`` holds only opaque image tokens, the
retrieved images' labels and the diagnoses to choose from.

Crossover, randomised per rater (:func:`schedule`, seeded by the study's seed and the rater id):
every case is assigned to the order *with, then without* or *without, then with*; period 1
shows every case once in its first arm, in a random order, period 2 every case in its other
arm, in another random order. Each reading (diagnosis, confidence 1-5, seconds spent) is
appended to ``readings.jsonl`` and fsynced (:func:`record_reading`); the last reading of a
(rater, case, arm) counts.

:func:`score_reader_study` gives per rater (and pooled) the accuracy with and without
retrieval on the cases read in both arms, the mean confidence and time per arm, and the exact
McNemar test of the paired outcomes (two-sided binomial test of the discordant pairs).
"""

import hashlib
import json
import math
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dermris.core.atomic import append_durably, atomic_write
from dermris.core.errors import JudgeError
from dermris.retriever import Retriever

__all__ = [
    "ARMS",
    "READER_STUDY_FILE",
    "READER_KEY_FILE",
    "READINGS_FILE",
    "ReaderScore",
    "RaterOutcome",
    "mcnemar_exact",
    "prepare_reader_study",
    "schedule",
    "record_reading",
    "score_reader_study",
    "reader_router",
    "create_reader_app",
    "serve_reader",
]

ARMS = ("with", "without")
"""The two arms: the retrieved images (with their diagnoses) shown, or not."""
READER_STUDY_FILE = "reader_study.json"
READER_KEY_FILE = "reader_key.json"
READINGS_FILE = "readings.jsonl"


def _write_json(path: Path, payload) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(payload, indent=1))


def prepare_reader_study(
    retriever: Retriever,
    out: str | os.PathLike,
    *,
    label_column: str,
    cases: int = 20,
    k: int = 5,
    measure: str = "style",
    seed: int = 0,
) -> Path:
    """Sample the cases, retrieve their images, and write the study folder.

    Parameters
    ----------
    retriever : Retriever
        The store.
    out : path-like
        A new folder.
    label_column : str
        The diagnosis column (the answer of each case; the choices are its values).
    cases : int
        Labelled rows sampled as cases (seeded).
    k : int
        Retrieved images shown in the *with* arm.
    measure : str
        The measure that retrieves them.
    seed : int
        Seed of the sample and of every rater's schedule.
    """
    out = Path(out)
    if (out / READER_KEY_FILE).exists():
        raise JudgeError(f"{out} already holds a reader study")
    meta = retriever.metadata()
    if label_column not in meta.column_names:
        raise JudgeError(f"no metadata column {label_column!r}")
    labels = meta.column(label_column).to_pylist()
    live = retriever.live
    labelled = [r for r, v in enumerate(labels) if v is not None and live[r]]
    choices = sorted({str(labels[r]) for r in labelled})
    if len(labelled) < 2 or len(choices) < 2:
        raise JudgeError(f"a reader study needs rows of at least two {label_column} values")
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(labelled, size=min(cases, len(labelled)), replace=False).tolist())
    group = "lesion_id" if "lesion_id" in meta.column_names else None
    paths = retriever.paths
    images: dict[str, str] = {}
    public, secret = [], {}
    for i, row in enumerate(rows, start=1):
        lesion = meta.column(group)[row].as_py() if group else None
        exclude = retriever.group_rows(group, lesion) if group and lesion is not None else []
        hits = retriever.search(row, measures=measure, k=k, exclude=exclude)[measure]
        name = f"C{i:03d}"
        query_token = secrets.token_hex(8)
        images[query_token] = paths[row]
        shown = []
        for h in hits:
            token = secrets.token_hex(8)
            images[token] = paths[h.row]
            shown.append({"image": token, "diagnosis": str(labels[h.row])})
        public.append({"case": name, "image": query_token, "retrieved": shown})
        secret[name] = {
            "row": int(row),
            "image_id": retriever.image_ids[row],
            "diagnosis": str(labels[row]),
            "retrieved_rows": [int(h.row) for h in hits],
        }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        out / READER_KEY_FILE,
        {
            "store": str(Path(retriever.store.root).resolve()),
            "label_column": label_column,
            "measure": measure,
            "k": k,
            "cases": secret,
            "images": images,
        },
    )
    _write_json(
        out / READER_STUDY_FILE,
        {"seed": seed, "label_column": label_column, "choices": choices, "cases": public},
    )
    (out / READINGS_FILE).touch()
    return out


def _load(out: str | os.PathLike) -> tuple[Path, dict, dict]:
    out = Path(out)
    if not (out / READER_STUDY_FILE).exists() or not (out / READER_KEY_FILE).exists():
        raise JudgeError(f"{out} holds no reader study (dermris judge STORE --reader-study)")
    study = json.loads((out / READER_STUDY_FILE).read_text())
    key = json.loads((out / READER_KEY_FILE).read_text())
    return out, study, key


def _rater_rng(seed: int, rater: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{rater}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def schedule(out: str | os.PathLike, rater: str) -> list[dict[str, Any]]:
    """The crossover order of ``rater``: ``[{"case", "arm", "period"}, ...]`` (two periods,
    every case once per period, its arms in a random order; the same list on every call)."""
    _, study, _ = _load(out)
    names = [c["case"] for c in study["cases"]]
    rng = _rater_rng(int(study.get("seed", 0)), rater)
    first = {n: ARMS[int(b)] for n, b in zip(names, rng.integers(0, 2, len(names)))}
    other = {n: ARMS[1 - ARMS.index(a)] for n, a in first.items()}
    out_list = []
    for period, arm_of in ((1, first), (2, other)):
        for i in rng.permutation(len(names)):
            out_list.append({"case": names[i], "arm": arm_of[names[i]], "period": period})
    return out_list


def record_reading(
    out: str | os.PathLike,
    *,
    rater: Any,
    case: Any,
    arm: Any,
    diagnosis: Any,
    confidence: Any,
    seconds: Any,
) -> dict[str, Any]:
    """Validate one reading and append it (fsynced) to ``readings.jsonl``; returns the record.

    ``rater`` an id (letters, digits, ``_ . @ -``), ``case`` a case name, ``arm`` one of
    :data:`ARMS`, ``diagnosis`` one of the study's choices, ``confidence`` an integer 1-5,
    ``seconds`` the time spent on the case (0 to 86400); anything else raises JudgeError."""
    from .judge import rater_problem

    out, study, _ = _load(out)
    problem = rater_problem(rater)
    if problem is not None:
        raise JudgeError(problem)
    if not isinstance(case, str) or case not in {c["case"] for c in study["cases"]}:
        raise JudgeError(f"unknown case {case!r}")
    if not isinstance(arm, str) or arm not in ARMS:
        raise JudgeError(f"arm must be one of {', '.join(ARMS)}")
    if not isinstance(diagnosis, str) or diagnosis not in study["choices"]:
        raise JudgeError(f"diagnosis must be one of {', '.join(study['choices'])}")
    if isinstance(confidence, bool) or not isinstance(confidence, int) or not 1 <= confidence <= 5:
        raise JudgeError("confidence must be an integer from 1 to 5")
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or not 0 <= seconds <= 86400
    ):
        raise JudgeError("seconds must be a number from 0 to 86400")
    record = {
        "rater": rater,
        "case": case,
        "arm": arm,
        "diagnosis": diagnosis,
        "confidence": int(confidence),
        "seconds": float(seconds),
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    with _LOCK:
        append_durably(out / READINGS_FILE, json.dumps(record) + "\n")
    return record


_LOCK = threading.Lock()


def _readings(out: Path) -> dict[tuple[str, str, str], dict]:
    """The last reading per (rater, case, arm); torn lines are ignored."""
    latest: dict[tuple[str, str, str], dict] = {}
    path = out / READINGS_FILE
    if not path.exists():
        return latest
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            latest[(str(entry["rater"]), str(entry["case"]), str(entry["arm"]))] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return latest


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` pairs right only with retrieval, ``c`` only
    without (binomial test of ``min(b, c)`` in ``b + c`` at 1/2; 1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class RaterOutcome:
    """One rater's (or the pooled) paired outcome.

    Attributes
    ----------
    paired : int
        Cases read in both arms.
    accuracy_with, accuracy_without : float or None
        Share of those cases diagnosed correctly in each arm.
    only_with, only_without : int
        Discordant pairs: right only with retrieval, right only without.
    p_value : float
        Exact McNemar (two-sided).
    confidence_with, confidence_without, seconds_with, seconds_without : float or None
        Mean confidence and time per case in each arm (paired cases).
    """

    paired: int
    accuracy_with: float | None
    accuracy_without: float | None
    only_with: int
    only_without: int
    p_value: float
    confidence_with: float | None
    confidence_without: float | None
    seconds_with: float | None
    seconds_without: float | None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass
class ReaderScore:
    """The reader study's outcome per rater and pooled over raters (pairs pooled)."""

    cases: int
    per_rater: dict[str, RaterOutcome] = field(default_factory=dict)
    pooled: RaterOutcome | None = None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "cases": self.cases,
            "per_rater": {r: o.to_dict() for r, o in self.per_rater.items()},
            "pooled": self.pooled.to_dict() if self.pooled else None,
        }


def _outcome(pairs: Iterable[tuple[dict, dict, str]]) -> RaterOutcome:
    pairs = list(pairs)

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    right_with = [w["diagnosis"] == truth for w, _, truth in pairs]
    right_without = [o["diagnosis"] == truth for _, o, truth in pairs]
    b = sum(1 for x, y in zip(right_with, right_without) if x and not y)
    c = sum(1 for x, y in zip(right_with, right_without) if y and not x)
    return RaterOutcome(
        paired=len(pairs),
        accuracy_with=mean([float(x) for x in right_with]),
        accuracy_without=mean([float(y) for y in right_without]),
        only_with=b,
        only_without=c,
        p_value=mcnemar_exact(b, c),
        confidence_with=mean([w["confidence"] for w, _, _ in pairs]),
        confidence_without=mean([o["confidence"] for _, o, _ in pairs]),
        seconds_with=mean([w["seconds"] for w, _, _ in pairs]),
        seconds_without=mean([o["seconds"] for _, o, _ in pairs]),
    )


def score_reader_study(out: str | os.PathLike, *, rater: str | None = None) -> ReaderScore:
    """Accuracy with vs without retrieval per rater (cases read in both arms), exact McNemar."""
    out, study, key = _load(out)
    readings = _readings(out)
    raters = sorted({r for r, _, _ in readings} if rater is None else {rater})
    score = ReaderScore(cases=len(study["cases"]))
    pooled = []
    for who in raters:
        pairs = []
        for case in study["cases"]:
            name = case["case"]
            w, o = readings.get((who, name, "with")), readings.get((who, name, "without"))
            if w is not None and o is not None:
                pairs.append((w, o, key["cases"][name]["diagnosis"]))
        if pairs:
            score.per_rater[who] = _outcome(pairs)
            pooled += pairs
    score.pooled = _outcome(pooled) if pooled else None
    return score


def reader_router(out: str | os.PathLike):
    """The reader-study endpoints as a FastAPI router: ``GET /api/schedule?rater=`` (the
    rater's crossover order, the choices), ``GET /api/case/{case}?arm=`` (the case's image token
    and, in the *with* arm, the retrieved images with their diagnoses), ``POST /api/readings``
    (JSON ``{rater, case, arm, diagnosis, confidence, seconds}``, fsynced before the answer) and
    ``GET /image/{token}``."""
    import io

    from fastapi import APIRouter, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response

    from dermris.core.errors import ImageDecodeError
    from dermris.indexer import decode_image

    from .judge import rater_problem

    out, study, key = _load(out)
    cases = {c["case"]: c for c in study["cases"]}
    images = key["images"]
    router = APIRouter(tags=["reader study"])

    @router.get("/api/schedule", summary="One rater's crossover order")
    def rater_schedule(rater: str):
        problem = rater_problem(rater)
        if problem is not None:
            raise HTTPException(400, problem)
        done = sorted(
            f"{c}/{a}" for (r, c, a) in _readings(out) if r == rater
        )  # resume where the rater stopped
        return {"schedule": schedule(out, rater), "choices": study["choices"], "done": done}

    @router.get("/api/case/{case}", summary="What a reader sees of one case in one arm")
    def case_view(case: str, arm: str):
        if case not in cases or arm not in ARMS:
            raise HTTPException(404, "unknown case or arm")
        view = {"case": case, "arm": arm, "image": cases[case]["image"]}
        if arm == "with":
            view["retrieved"] = cases[case]["retrieved"]
        return view

    @router.post("/api/readings", summary="Record one reading (fsynced before the answer)")
    async def reading(request: Request):
        body = await request.body()
        if len(body) > 4096:
            raise HTTPException(413, "a reading is a JSON object of at most 4096 bytes")
        try:
            entry = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise HTTPException(400, "bad reading: not JSON") from None
        if not isinstance(entry, dict):
            raise HTTPException(400, "bad reading: expected a JSON object")
        try:
            record = await run_in_threadpool(
                lambda: record_reading(
                    out,
                    rater=entry.get("rater"),
                    case=entry.get("case"),
                    arm=entry.get("arm"),
                    diagnosis=entry.get("diagnosis"),
                    confidence=entry.get("confidence"),
                    seconds=entry.get("seconds"),
                )
            )
        except JudgeError as exc:
            raise HTTPException(400, f"bad reading: {exc}") from None
        return {"ok": True, "time": record["time"]}

    @router.get("/image/{token}", summary="A study image by its opaque token")
    def image(token: str):
        if token not in images:
            raise HTTPException(404, "unknown image")
        try:
            picture = decode_image(images[token])[0]
        except ImageDecodeError:
            raise HTTPException(404, "image file unavailable") from None
        picture.thumbnail((800, 800))
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=90)
        return Response(buf.getvalue(), media_type="image/jpeg")

    return router


_PAGE = Path(__file__).with_name("reader_page.html")


def create_reader_app(
    out: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    extra_hosts: tuple[str, ...] = (),
):
    """A FastAPI application serving only the reader study of ``out`` at ``/reader/`` (the
    same guards as the judging page: Host/Origin checks, a token when given, 4 KB bodies)."""
    from . import _web

    _web.require_fastapi()
    from fastapi.responses import HTMLResponse

    router = reader_router(out)

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(_PAGE.read_text("utf-8"), headers={"Cache-Control": "no-store"})

    return _web.router_app(
        router,
        prefix="/reader",
        title="dermris reader study",
        host=host,
        port=port,
        token=token,
        max_body_bytes=4096,
        extra_hosts=extra_hosts,
    )


def serve_reader(
    out: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> None:
    """Serve the reader study of ``out`` until interrupted (loopback unless told otherwise)."""
    from . import _web

    token = _web.resolve_token(host, token)
    _web.run(
        create_reader_app(out, host=host, port=port, token=token, extra_hosts=extra_hosts),
        host=host,
        port=port,
    )
