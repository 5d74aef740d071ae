"""Blinded manual judgment of the nine measures (paper section 4.1) and its scoring.

``prepare_session`` samples query rows and, for each, pools the top k of all nine measures:
an image returned by several measures is judged once, the pool is shuffled per query, and every
image gets an opaque random token. What the judge sees (``tasks.json``, the page, the image
URLs) carries no measure names and no row numbers; the mapping lives in ``key.json``, read only
by :func:`score_session`. ``serve`` runs a small page on 127.0.0.1 where each click is appended
to ``judgments.jsonl`` and fsynced at once, so a closed browser loses nothing.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from dermris.indexer import decode_image
from dermris.models.atomic import append_durably, atomic_write
from dermris.models.errors import ImageDecodeError, JudgeError

from ..measures import MEASURES
from ..search import Retriever

__all__ = ["PAPER_TABLE1", "JudgeError", "prepare_session", "serve", "score_session", "JudgeScore"]

PAPER_TABLE1 = {
    "euclidean": 40.8, "cosine": 34.0, "style": 61.2, "i1_ed": 18.0, "i1_cd": 10.0,
    "i1_ecd": 18.4, "i1_se": 44.4, "i1_sc": 46.4, "i1_sd": 6.0,
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
    tasks, key = [], {"store": str(Path(retriever.store.root).resolve()), "k": k, "seed": seed, "queries": [], "images": {}}
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
        tasks.append({"query": name, "query_image": query_token, "items": [tokens[r] for r in pooled]})
        key["queries"].append({
            "query": name, "row": row, "image_id": retriever.image_ids[row],
            "items": {tokens[r]: r for r in pooled},
            "rankings": {m: [tokens[h.row] for h in hits] for m, hits in results.items()},
        })
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / KEY_FILE, key)
    _write_json(out / TASKS_FILE, {"version": 1, "k": k, "queries": tasks})
    (out / JUDGMENTS_FILE).touch()
    return out


def _load_judgments(out: Path) -> dict[tuple[str, str], bool]:
    """Latest judgment per (query, item); torn last lines (a crash mid-write) are ignored."""
    judged = {}
    path = out / JUDGMENTS_FILE
    if not path.exists():
        return judged
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            judged[(entry["query"], entry["item"])] = bool(entry["similar"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return judged


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dermris judge</title>
<style>
body{font-family:sans-serif;margin:16px;background:#fafafa}
#bar{display:flex;gap:12px;align-items:center;margin-bottom:12px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:3px solid #ddd;border-radius:6px;padding:6px;text-align:center}
.card.yes{border-color:#2a9d4b}.card.no{border-color:#c0392b}
.card img{width:200px;height:200px;object-fit:contain;display:block}
.query img{width:260px;height:260px}
button{margin:4px;padding:6px 12px;font-size:14px}
#main{display:flex;gap:24px;align-items:flex-start}
</style></head><body>
<div id="bar"><button id="prev">&larr; previous</button><span id="title"></span>
<button id="next">next &rarr;</button><span id="progress"></span></div>
<p>Is each image similar to the query lesion (colour, spread density, texture first; then shape,
size, other characteristics, background, location)? Every click is saved at once.</p>
<div id="main"><div class="card query"><img id="qimg"><div>query</div></div><div class="grid" id="grid"></div></div>
<script>
let tasks=null, judged={}, current=0;
function key(q,i){return q+'/'+i}
function done(t){return t.items.every(i=>key(t.query,i) in judged)}
function render(){
  const t=tasks.queries[current];
  document.getElementById('title').textContent='query '+(current+1)+' of '+tasks.queries.length;
  const complete=tasks.queries.filter(done).length;
  document.getElementById('progress').textContent=complete+' queries complete';
  document.getElementById('qimg').src='/image/'+t.query_image;
  const grid=document.getElementById('grid'); grid.innerHTML='';
  for(const item of t.items){
    const v=judged[key(t.query,item)];
    const card=document.createElement('div');
    card.className='card'+(v===true?' yes':v===false?' no':'');
    card.innerHTML='<img src="/image/'+item+'"><button data-v="1">similar</button><button data-v="0">not similar</button>';
    card.querySelectorAll('button').forEach(b=>b.onclick=()=>send(t.query,item,b.dataset.v==='1'));
    grid.appendChild(card);
  }
}
async function send(q,i,v){
  const r=await fetch('/judge',{method:'POST',headers:{'Content-Type':'application/json'},
    body:JSON.stringify({query:q,item:i,similar:v})});
  if(r.ok){judged[key(q,i)]=v;render();}else{alert('not saved: '+await r.text());}
}
document.getElementById('prev').onclick=()=>{current=Math.max(0,current-1);render()};
document.getElementById('next').onclick=()=>{current=Math.min(tasks.queries.length-1,current+1);render()};
fetch('/tasks').then(r=>r.json()).then(d=>{tasks=d.tasks;judged=d.judged;
  const first=tasks.queries.findIndex(t=>!done(t)); current=first<0?0:first; render();});
</script></body></html>
"""


def _handler_for(out: Path, lock: threading.Lock, request_timeout: float = 10.0):
    key = json.loads((out / KEY_FILE).read_text())
    tasks = json.loads((out / TASKS_FILE).read_text())
    images = key["images"]
    valid = {(t["query"], i) for t in tasks["queries"] for i in t["items"]}

    class Handler(BaseHTTPRequestHandler):
        timeout = request_timeout  # seconds a client may take to send its request: a short body never holds a thread

        def log_message(self, *args):  # quiet
            pass

        def _allowed_hosts(self) -> set[str]:
            host, port = self.server.server_address[:2]
            names = {"127.0.0.1", "localhost", "[::1]", str(host)}
            return {f"{n}:{port}" for n in names} | ({n for n in names} if port == 80 else set())

        def _foreign(self) -> bool:
            """A request whose Host or Origin is not this server (DNS rebinding, other sites)."""
            hosts = self._allowed_hosts()
            if self.headers.get("Host", "") not in hosts:
                return True
            origin = self.headers.get("Origin")
            return origin is not None and origin not in {f"http://{h}" for h in hosts}

        def handle_one_request(self):
            try:
                super().handle_one_request()
            except TimeoutError:
                self.close_connection = True

        def _send(self, status, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self._foreign():
                return self._send(HTTPStatus.FORBIDDEN, b"forbidden host or origin", "text/plain")
            if self.path == "/":
                return self._send(HTTPStatus.OK, _PAGE.encode(), "text/html; charset=utf-8")
            if self.path == "/tasks":
                judged = {f"{q}/{i}": v for (q, i), v in _load_judgments(out).items()}
                return self._send(HTTPStatus.OK, json.dumps({"tasks": tasks, "judged": judged}).encode(),
                                  "application/json")
            if self.path.startswith("/image/"):
                token = self.path[len("/image/"):]
                if not _TOKEN.match(token) or token not in images:
                    return self._send(HTTPStatus.NOT_FOUND, b"unknown image", "text/plain")
                try:
                    image = decode_image(images[token])[0]
                except ImageDecodeError:
                    return self._send(HTTPStatus.NOT_FOUND, b"image file unavailable", "text/plain")
                image.thumbnail((400, 400))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                return self._send(HTTPStatus.OK, buf.getvalue(), "image/jpeg")
            return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_POST(self):
            if self._foreign():
                return self._send(HTTPStatus.FORBIDDEN, b"forbidden host or origin", "text/plain")
            if self.path != "/judge":
                return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= 4096:
                    raise ValueError("bad length")
                body = self.rfile.read(length)
                if len(body) != length:
                    raise ValueError("body shorter than its Content-Length")
                try:
                    entry = json.loads(body)
                except RecursionError:
                    raise ValueError("JSON nested too deeply") from None
                if not isinstance(entry, dict):
                    raise ValueError("expected a JSON object")
                record = {"query": str(entry["query"]), "item": str(entry["item"]), "similar": bool(entry["similar"])}
                if (record["query"], record["item"]) not in valid or not isinstance(entry["similar"], bool):
                    raise ValueError("unknown query or item")
            except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
                return self._send(HTTPStatus.BAD_REQUEST, f"bad judgment: {exc}".encode(), "text/plain")
            with lock:
                append_durably(out / JUDGMENTS_FILE, json.dumps(record) + "\n")
            return self._send(HTTPStatus.OK, b'{"ok": true}', "application/json")

    return Handler


def serve(out: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8765,
          request_timeout: float = 10.0) -> ThreadingHTTPServer:
    """Return an HTTP server for the session in ``out`` (call ``serve_forever`` on it).

    It binds to ``host`` (localhost unless told otherwise) and serves only the session's page,
    its task list, thumbnails of the session's images by token, and the judgment endpoint.
    Requests whose Host or Origin is not this server are refused (403: DNS rebinding), bodies
    are limited to 4 KB of non-nested JSON, and a client that stops sending is dropped after
    ``request_timeout`` seconds.
    """
    out = Path(out)
    if not (out / KEY_FILE).exists() or not (out / TASKS_FILE).exists():
        raise JudgeError(f"{out} holds no judgment session (run dermris judge STORE --out {out})")
    return ThreadingHTTPServer((host, port), _handler_for(out, threading.Lock(), request_timeout))


@dataclass
class JudgeScore:
    """Success rate per measure (percent), over the queries whose results are all judged."""

    success: dict[str, float | None]
    complete_queries: int
    total_queries: int
    judged_items: int
    total_items: int

    def to_dict(self) -> dict:
        """JSON-ready form, with the paper's numbers beside."""
        return {
            "success_rate_percent": self.success, "paper_table1_percent": PAPER_TABLE1,
            "complete_queries": self.complete_queries, "total_queries": self.total_queries,
            "judged_items": self.judged_items, "total_items": self.total_items,
        }


def score_session(out: str | os.PathLike) -> JudgeScore:
    """Turn the judgments into Table 1: per measure, the mean over queries of similar / k."""
    out = Path(out)
    if not (out / KEY_FILE).exists():
        raise JudgeError(f"{out} holds no judgment session")
    key = json.loads((out / KEY_FILE).read_text())
    judged = _load_judgments(out)
    k = key["k"]
    rates: dict[str, list[float]] = {m: [] for m in MEASURES}
    complete = 0
    total_items = judged_items = 0
    for q in key["queries"]:
        items = list(q["items"])
        total_items += len(items)
        judged_items += sum((q["query"], i) in judged for i in items)
        if not all((q["query"], i) in judged for i in items):
            continue
        complete += 1
        for m, ranking in q["rankings"].items():
            rates[m].append(100.0 * sum(judged[(q["query"], t)] for t in ranking) / k)
    success = {m: float(np.mean(v)) if v else None for m, v in rates.items()}  # None: nothing judged yet
    return JudgeScore(success=success, complete_queries=complete, total_queries=len(key["queries"]),
                      judged_items=judged_items, total_items=total_items)
