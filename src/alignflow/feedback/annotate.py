"""`alignflow annotate`: a local web page where people rank sampled responses or A/B-test two models.

    alignflow annotate rank                    # rank the samples of paths.samples: http://127.0.0.1:8765/
    alignflow annotate ab dpo                  # dpo's answers vs the reference model's (evaluate@dpo, evaluate@sft)
    alignflow annotate rank --host 0.0.0.0     # for colleagues on the network: prints a URL with a token
    alignflow annotate rank --limit 20         # a batch of the first 20 items (the same seeded order for everyone)

Reads:  rank: `paths.samples` (the samples stage); ab: `<paths.evaluation>/<model>.jsonl` of the two models.
Writes: one append-only log per annotator, `<paths.annotations>/<name>.jsonl` (rank) or
        `<paths.ab_annotations>/<name>.jsonl` (ab); the format is in alignflow.core.annotation_log. Each answer, skip and
        undo is appended and fsynced before the page hears back, so closing the browser or killing the server
        loses nothing, and a restart resumes each annotator where they stopped. Commit these files: they are
        DVC dependencies of the `preferences` (judge: human) and `compare` stages.

Every annotator sees the items in one seeded order (so their answers overlap and agreement can be measured)
and each item's responses (rank) or sides (ab) in an order of their own, seeded by (seed, name, item).
Bound to 127.0.0.1 only the local machine can connect (and the Host header must name it, against DNS
rebinding); bound elsewhere, every request needs the token. Bad requests get a 4xx with a message and
write nothing. The server is the standard library's; the page is one file, annotate.html, beside this one.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from alignflow.core.annotation_log import ANSWERS, NAME, Replayed, replay, same_models, text_hash
from alignflow.core.io import InputError, read_jsonl
from alignflow.core.params import Params

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes; an answer is well under 1 KB
PAGE = Path(__file__).with_name("annotate.html")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Item:
    id: str
    prompt: list[dict[str, str]]   # chat messages, the last one the user's request
    options: dict[str, str]        # rank: response id -> text; ab: model name -> response


@dataclass(frozen=True)
class Batch:
    mode: str                      # rank | ab
    items: list[Item]              # in the seeded order every annotator follows
    folder: Path                   # where the annotators' logs go
    seed: int
    models: tuple[str, str] | None = None  # ab: (model, reference)

    def shown(self, annotator: str, item: Item) -> list[str]:
        """The option keys in the order this annotator sees them (rank: responses; ab: [A's model, B's model])."""
        keys = sorted(item.options)
        random.Random(f"{self.seed}/{annotator}/{item.id}").shuffle(keys)
        return keys


def rank_batch(params: Params, limit: int | None) -> Batch:
    """The samples with at least two non-empty responses, in a seeded order."""
    items = []
    for _, record in read_jsonl(params.paths.samples, {"prompt_id": str, "prompt": list, "responses": list}):
        options = {r["id"]: r["text"] for r in record["responses"] if r["text"].strip()}
        if len(options) >= 2:
            items.append(Item(record["prompt_id"], record["prompt"], options))
    return Batch("rank", _ordered(items, params.seed, limit), Path(params.paths.annotations), params.seed)


def ab_batch(params: Params, model: str, reference: str, limit: int | None) -> Batch:
    """The held-out prompts on which the two models answered differently (identical answers are a tie unasked)."""
    runs = {}
    for name in (model, reference):
        path = Path(params.paths.evaluation) / f"{name}.jsonl"
        if not path.is_file():
            raise InputError(f"{path}: missing; run evaluate@{name} first (dvc repro evaluate@{name})")
        runs[name] = {r["id"]: r for _, r in read_jsonl(path, {"id": str, "prompt": str, "response": str})}
    items = [Item(pid, [{"role": "user", "content": r["prompt"]}], {model: r["response"], reference: runs[reference][pid]["response"]})
             for pid, r in runs[model].items() if pid in runs[reference] and r["response"] != runs[reference][pid]["response"]]
    return Batch("ab", _ordered(items, params.seed, limit), Path(params.paths.ab_annotations), params.seed, (model, reference))


def _ordered(items: list[Item], seed: int, limit: int | None) -> list[Item]:
    items = sorted(items, key=lambda i: i.id)
    random.Random(seed).shuffle(items)
    return items[:limit] if limit else items


class Annotations:
    """The batch, the logs on disk and each annotator's replayed state; one lock serialises every change."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.by_id = {item.id: item for item in batch.items}
        self.lock = threading.Lock()
        batch.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, annotator: str) -> Path:
        return self.batch.folder / f"{annotator}.jsonl"

    def _state(self, annotator: str) -> Replayed:
        """Replayed from the annotator's file every time: the file is the only state, so a restart resumes."""
        file = self._file(annotator)
        if not file.is_file() or not file.stat().st_size:
            return Replayed()
        events = [(f"{file}:{n}", r) for n, r in read_jsonl(file)]
        if self.batch.models:
            events = [(w, r) for w, r in events if same_models(r, *self.batch.models)]
        return replay(events, self.batch.mode).get(annotator, Replayed())

    def _current(self, state: Replayed) -> str | None:
        if state.reopened in self.by_id and state.reopened not in state.answers:
            return state.reopened
        for item in self.batch.items:
            if item.id not in state.answers and item.id not in state.skipped:
                return item.id
        return next((i for i in state.skipped if i in self.by_id and i not in state.answers), None)

    def view(self, annotator: str) -> dict[str, Any]:
        """What the page shows this annotator now: progress and the current item (None when all are done)."""
        state = self._state(annotator)
        current = self._current(state)
        view: dict[str, Any] = {
            "mode": self.batch.mode, "annotator": annotator, "total": len(self.batch.items),
            "done": sum(i.id in state.answers for i in self.batch.items),
            "skipped": sum(i in self.by_id and i not in state.answers for i in state.skipped),
            "can_undo": bool(state.undo_stack), "item": None,
        }
        if current is not None:
            item = self.by_id[current]
            shown = self.batch.shown(annotator, item)
            keys = shown if self.batch.mode == "rank" else ["A", "B"]  # A/B hides which model is which
            view["item"] = {"id": item.id, "prompt": item.prompt,
                            "options": [{"key": k, "text": item.options[s]} for k, s in zip(keys, shown)]}
        return view

    def _append(self, annotator: str, record: dict[str, Any]) -> None:
        file = self._file(annotator)
        lines = sum(1 for _ in file.open("rb")) if file.is_file() else 0
        record = {"event": record.pop("event"), "mode": self.batch.mode, "id": f"{annotator}-{lines + 1}",
                  "annotator": annotator, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
        if self.batch.models:
            record["models"] = list(self.batch.models)
        with file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        log.info("%s: %s %s", annotator, record["event"], record.get("item") or record.get("undoes"))

    def _open_item(self, body: dict[str, Any], state: Replayed) -> Item:
        item = self.by_id.get(body.get("item"))  # type: ignore[arg-type]
        if item is None:
            raise RequestError(404, f"field 'item': {body.get('item')!r} is not an item of this batch")
        if item.id in state.answers:
            raise RequestError(409, f"item {item.id} is already answered by {body['annotator']}; undo it first")
        return item

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        annotator = body["annotator"]
        with self.lock:
            state = self._state(annotator)
            item = self._open_item(body, state)
            shown = self.batch.shown(annotator, item)
            seconds = body.get("seconds")
            if seconds is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < 1e6):
                raise RequestError(400, "field 'seconds': expected a number of seconds")
            if self.batch.mode == "rank":
                record = self._ranking(body, item, shown)
            else:
                if body.get("answer") not in ANSWERS:
                    raise RequestError(400, f"field 'answer': expected one of {', '.join(ANSWERS)}")
                sides = dict(zip("AB", shown))
                record = {"shown": sides, "texts": {m: text_hash(item.options[m]) for m in shown}, "answer": body["answer"],
                          "winner": None if body["answer"] == "tie" else sides[body["answer"]]}
            self._append(annotator, {"event": "answer", "item": item.id, **record,
                                     **({"seconds": round(seconds, 1)} if seconds is not None else {})})
            return self.view(annotator)

    @staticmethod
    def _ranking(body: dict[str, Any], item: Item, shown: list[str]) -> dict[str, Any]:
        ranking, unacceptable = body.get("ranking"), body.get("unacceptable", [])
        if not isinstance(ranking, list) or not all(isinstance(r, str) for r in ranking) or sorted(ranking) != sorted(item.options):
            raise RequestError(400, f"field 'ranking': must order each of the {len(item.options)} responses of item "
                                    f"{item.id} exactly once (a permutation of their ids)")
        if not isinstance(unacceptable, list) or not set(unacceptable) <= set(ranking) or len(set(unacceptable)) != len(unacceptable):
            raise RequestError(400, "field 'unacceptable': must be distinct ids of this item's responses")
        if set(ranking[len(ranking) - len(unacceptable):]) != set(unacceptable):
            raise RequestError(400, "field 'unacceptable': unacceptable responses must come last in the ranking")
        acceptable = ranking[: len(ranking) - len(unacceptable)]
        return {"shown": shown, "ranking": [*acceptable, *([unacceptable] if unacceptable else [])], "unacceptable": unacceptable}

    def skip(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            item = self._open_item(body, self._state(body["annotator"]))
            self._append(body["annotator"], {"event": "skip", "item": item.id})
            return self.view(body["annotator"])

    def undo(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            state = self._state(body["annotator"])
            if not state.undo_stack:
                raise RequestError(409, f"{body['annotator']} has no answer to undo")
            self._append(body["annotator"], {"event": "undo", "undoes": state.undo_stack[-1]})
            return self.view(body["annotator"])


class Handler(BaseHTTPRequestHandler):
    server: "AnnotateServer"
    server_version = "alignflow-annotate"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _check_access(self, query: dict[str, list[str]]) -> None:
        token = self.server.token
        if token is not None:
            if not hmac.compare_digest(query.get("token", [""])[0], token):
                raise RequestError(403, "missing or wrong token: open the URL the server printed")
        elif self.headers.get("Host", "").rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]"):
            raise RequestError(403, "this server answers only requests addressed to 127.0.0.1 or localhost")

    def _annotator(self, value: Any) -> str:
        if not isinstance(value, str) or not NAME.match(value):
            raise RequestError(400, "field 'annotator': a name of 1-40 letters, digits, '_', '.' or '-'")
        return value

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "a JSON body with a Content-Length is required")
        if int(length) > MAX_BODY:
            raise RequestError(413, f"body of {length} bytes is over the limit of {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(int(length)).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"malformed JSON body: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        body["annotator"] = self._annotator(body.get("annotator"))
        return body

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            self._check_access(query)
            annotations = self.server.annotations
            if method == "GET" and url.path in ("/", "/index.html"):
                return self._reply(200, PAGE.read_bytes(), "text/html")
            if method == "GET" and url.path == "/api/view":
                return self._reply(200, annotations.view(self._annotator(query.get("annotator", [None])[0])))
            actions = {"/api/answer": annotations.answer, "/api/skip": annotations.skip, "/api/undo": annotations.undo}
            if method == "POST" and url.path in actions:
                return self._reply(200, actions[url.path](self._body()))
            raise RequestError(404 if url.path not in ("/", "/api/view", *actions) else 405, f"no {method} {url.path}")
        except RequestError as err:
            if method == "POST":
                self.close_connection = True  # an unread (oversized) body must not be parsed as the next request
            self._reply(err.status, {"error": err.message})
        except InputError as err:  # an annotator's log that does not parse (edited by hand?): say where
            log.error("%s", err)
            self._reply(500, {"error": str(err)})

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")


class AnnotateServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], annotations: Annotations, token: str | None):
        super().__init__(address, Handler)
        self.annotations, self.token = annotations, token


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(params: Params, mode: str, model: str | None, against: str | None, host: str, port: int,
          token: str | None, limit: int | None) -> None:
    """Build the batch, start the server and serve until interrupted."""
    if mode == "rank":
        batch = rank_batch(params, limit)
    else:
        reference = against or params.reference_model
        for name in (model, reference):
            if name not in params.evaluate.models:
                raise InputError(f"params.yaml: evaluate.models has no model {name!r} (it has {', '.join(params.evaluate.models)})")
        if model == reference:
            raise InputError(f"alignflow annotate ab: {model} against itself; name another model (--against)")
        batch = ab_batch(params, model, reference, limit)
    if not batch.items:
        raise InputError(f"alignflow annotate {mode}: nothing to annotate (no items with two different responses)")
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(16)
    try:
        server = AnnotateServer((host, port), Annotations(batch), token)
    except OSError as err:
        raise InputError(f"alignflow annotate: cannot listen on {host}:{port}: {err.strerror} (another --port?)") from None
    url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_address[1]}/" + (f"?token={token}" if token else "")
    what = f"{len(batch.items)} items" + (f", {batch.models[0]} vs {batch.models[1]}" if batch.models else "")
    log.info("annotate %s (%s): open %s  (answers go to %s/<name>.jsonl; Ctrl+C stops)", mode, what, url, batch.folder)
    print(url, flush=True)  # the last line of stdout is the URL, for scripts
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
