"""The couplet robot over HTTP: a FastAPI app around one loaded `Predictor`.

`create_app(predictor)` builds the app; `couplet serve` (couplet/cli_serve.py) loads the model once and
runs it under uvicorn. Routes:

- `POST /api/match`  `{"upper": "...", "top_k": 3, "tone": false}` ->
  `{"upper", "candidates": [{"lower", "score"}], "constraints": [...], "model": id}`
- `GET /healthz` -> `{"status": "ok", "model": id, "max_len": n}`
- `GET /` -> the web page (couplet/web/index.html); `GET /openapi.json` -> the OpenAPI spec (no /docs: Swagger UI needs a CDN).

Every error is `{"error": "<one line>"}` with a 4xx status: 400 malformed JSON or a bad Content-Length,
408 a body that does not arrive in time, 413 a body over 16 KiB (refused from Content-Length before it is
read, and capped while streaming), 415 a non-JSON content type, 422 a well-formed request that cannot be
answered (missing/unknown/mistyped field, top_k outside 1..10, empty/too long/non-Chinese text, characters
outside the vocabulary), 503 an overloaded server. Unexpected failures are a 500 with the same shape,
never an HTML page or a hang.

Inference is CPU-bound torch whose cost is mostly reading the weights, so a batch of lines costs little
more than one. By default `/api/match` queues each request for one inference thread (`MicroBatcher`) that
answers whatever has queued in one `predictor.match_batch` call, while the event loop keeps parsing HTTP
(torch releases the GIL). `create_app(..., batching=False)` instead runs a plain `def` endpoint per
request in Starlette's threadpool. docs/serving.md has the measurements behind the choice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.message
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("couplet.serve")

MAX_BODY_BYTES = 16 * 1024  # request bodies over this are refused with 413
BODY_TIMEOUT_S = 10.0  # a declared body that has not fully arrived by then is refused with 408
TOP_K_MAX = 10
ANSWER_TIMEOUT_S = 60.0  # a queued request not answered by then gets 503 instead of waiting on
EXAMPLE_UPPER = "春风得意马蹄疾"


# ---------------------------------------------------------------------------------------------- schemas


class MatchRequest(BaseModel):
    """An upper line to answer."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"upper": EXAMPLE_UPPER, "top_k": 3, "tone": False}]})

    upper: StrictStr = Field(description="The upper line (上联): Chinese characters, at most the model's max_len.")
    top_k: StrictInt = Field(1, ge=1, le=TOP_K_MAX, description=f"How many lower-line candidates to return (1..{TOP_K_MAX}).")
    tone: StrictBool = Field(False, description="Also require the lower line to end in a level (平) tone.")
    constrained: StrictBool = Field(True, description="Enforce punctuation, repetition structure and no copying.")


class CandidateOut(BaseModel):
    lower: str = Field(description="A lower line (下联), as long as the upper line.")
    score: float | None = Field(description="The model's score for this lower line (higher is better).")


class MatchResponse(BaseModel):
    upper: str
    candidates: list[CandidateOut] = Field(description="Best first.")
    constraints: list[str] = Field(description="The decoding constraints that were applied.")
    relaxed: list[str] = Field(default_factory=list, description="Requested constraints dropped because no lower line satisfied them.")
    model: str = Field(description="Id of the model that answered.")


class HealthResponse(BaseModel):
    status: str
    model: str
    max_len: int | None = None


class ErrorResponse(BaseModel):
    error: str = Field(description="One line saying what was wrong.")


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 408, 413, 415, 422, 500, 503)}


# ----------------------------------------------------------------------------------------- body guard


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _is_json(content_type: str) -> bool:
    if content_type == "application/json":
        return True
    msg = email.message.Message()
    msg["content-type"] = content_type
    if msg.get_content_maintype() != "application":
        return False
    sub = msg.get_content_subtype()
    return sub == "json" or sub.endswith("+json")


class BodyGuard:
    """Pure ASGI middleware: size, content type and arrival time of request bodies.

    A request that declares Content-Length over the cap is answered 413 before any of its body is read; a
    streamed (chunked) body is read up to the cap and answered 413 the moment it goes over. Bodies with a
    non-JSON content type get 415. The whole body is buffered here (it is at most 16 KiB) and replayed to
    the app, so nothing downstream can read more than the cap.
    """

    def __init__(self, app, max_body: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S):
        self.app = app
        self.max_body = max_body
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        length: int | None = None
        content_type = ""
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and length < 0:
            await _error(400, "invalid Content-Length header", {"connection": "close"})(scope, receive, send)
            return
        if length is not None and length > self.max_body:
            await _error(413, f"request body too large: {length} bytes (limit {self.max_body})", {"connection": "close"})(scope, receive, send)
            return
        if (length or chunked) and not _is_json(content_type):
            shown = content_type or "none"
            await _error(415, f"unsupported content type {shown!r}: send JSON with Content-Type: application/json", {"connection": "close"})(scope, receive, send)
            return

        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left; nobody to answer
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > self.max_body:
                        await _error(413, f"request body too large: over {self.max_body} bytes", {"connection": "close"})(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _error(408, f"request body did not arrive within {self.timeout_s:g} s", {"connection": "close"})(scope, receive, send)
            return

        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -------------------------------------------------------------------------------------- error messages


def _field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """One readable line (and the status) for the first validation error."""
    errors = exc.errors()
    if not errors:
        return 422, "invalid request"
    err = errors[0]
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    field = _field_name(loc)
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "JSON decode error")
        pos = loc[1] if len(loc) > 1 else "?"
        return 400, f"malformed JSON at character {pos}: {detail}"
    if loc == ("body",) and kind == "missing":
        return 422, 'request body is empty: send a JSON object like {"upper": "春风得意马蹄疾"}'
    if loc == ("body",) or kind in ("model_attributes_type", "dict_type"):
        return 422, 'request body must be a JSON object like {"upper": "春风得意马蹄疾"}'
    if kind == "missing":
        extra = [_field_name(tuple(e.get("loc", ()))) for e in errors if e.get("type") == "extra_forbidden"]
        hint = f" (unknown field {extra[0]!r} given)" if extra else ""
        return 422, f"missing field {field!r}{hint}"
    if kind == "extra_forbidden":
        known = ", ".join(MatchRequest.model_fields)
        return 422, f"unknown field {field!r} (known: {known})"
    if field == "top_k" and kind in ("greater_than_equal", "less_than_equal"):
        return 422, f"top_k must be between 1 and {TOP_K_MAX} (got {err.get('input')!r})"
    msg = str(err.get("msg", "invalid value"))
    msg = msg[:1].lower() + msg[1:]
    got = err.get("input")
    shown = json.dumps(got, ensure_ascii=False) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return 422, f"{field or 'body'}: {msg} (got {shown})"


def _finite(x: Any) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None  # JSON has no -inf; a null score means "ruled out"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()) or "error"



# ------------------------------------------------------------------------------------------- batching


class BusyError(RuntimeError):
    """The inference queue is full."""


class MicroBatcher:
    """One inference thread that answers queued requests in batches.

    The model's cost is dominated by reading its weights, so answering several equal-length lines in one
    call costs little more than answering one (docs/serving.md). Requests are queued from the event loop;
    the thread takes whatever has queued while it was busy (no waiting to fill a batch, so an idle server
    answers at once), groups it by decoding options and calls `predictor.match_batch`. Results go back to
    the event loop with `call_soon_threadsafe`. Only this thread touches the predictor.
    """

    def __init__(self, predictor, max_batch: int = 32, max_queue: int = 1024):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="couplet-inference", daemon=True)
        self._thread.start()

    def submit(self, loop: asyncio.AbstractEventLoop, upper: str, top_k: int, constrained: bool, tone: bool) -> asyncio.Future:
        fut = loop.create_future()
        with self._cv:
            if self._closed:
                raise BusyError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise BusyError(f"server busy: {len(self._queue)} requests queued, try again shortly")
            self._queue.append((loop, fut, upper, (top_k, constrained, tone)))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    @staticmethod
    def _deliver(fut: asyncio.Future, value: Any, is_error: bool) -> None:
        if fut.done():  # the request was cancelled (client gone)
            return
        if is_error:
            fut.set_exception(value)
        else:
            fut.set_result(value)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                n = min(len(self._queue), self.max_batch)
                batch = [self._queue.popleft() for _ in range(n)]
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(item[3], []).append(item)
            for (top_k, constrained, tone), items in groups.items():
                try:
                    results = self.predictor.match_batch(
                        [item[2] for item in items], top_k=top_k, constrained=constrained, tone=tone, errors="return"
                    )
                    if len(results) != len(items):
                        raise RuntimeError(f"match_batch answered {len(results)} of {len(items)} lines")
                    outcomes = [(r, isinstance(r, BaseException)) for r in results]
                except Exception as exc:  # a failure of the whole call fails each of its requests
                    outcomes = [(exc, True)] * len(items)
                for (loop, fut, _, _), (value, is_error) in zip(items, outcomes):
                    try:
                        loop.call_soon_threadsafe(self._deliver, fut, value, is_error)
                    except RuntimeError:  # that event loop is closed
                        pass

# ---------------------------------------------------------------------------------------------- the app


def _web_page() -> str:
    return (Path(__file__).resolve().parent / "web" / "index.html").read_text(encoding="utf-8")


def _model_id(predictor) -> str:
    for name in ("model_id", "id"):
        value = getattr(predictor, name, None)
        if isinstance(value, str) and value:
            return value
    return "unknown"


def _max_len(predictor) -> int | None:
    try:
        return int(predictor.max_len)
    except (AttributeError, TypeError, ValueError):
        pass
    try:
        return int(predictor.config.data.max_len)
    except (AttributeError, TypeError, ValueError):
        return None


def _payload(result) -> bytes:
    payload = {
        "upper": result.upper,
        "candidates": [{"lower": c.lower, "score": _finite(c.score)} for c in result.candidates],
        "constraints": list(result.constraints),
        "relaxed": list(getattr(result, "relaxed", []) or []),
        "model": result.model_id,
    }
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def create_app(
    predictor,
    *,
    max_body: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
    batching: bool = True,
    max_batch: int = 32,
) -> FastAPI:
    """A FastAPI app answering with `predictor` (a loaded `couplet.predictor.Predictor`, shared by all requests).

    batching=True (the default, and the fastest, see docs/serving.md): one inference thread answers queued
    requests in batches via `predictor.match_batch`. batching=False: a plain `def` endpoint calls
    `predictor.match` in Starlette's threadpool, one request per call.
    """
    from couplet.predictor import InputError

    model_id = _model_id(predictor)
    max_len = _max_len(predictor)
    page = _web_page()
    batcher: MicroBatcher | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal batcher
        if batching:
            batcher = MicroBatcher(predictor, max_batch=max_batch)
        try:
            yield
        finally:
            if batcher is not None:
                batcher.close()

    app = FastAPI(
        title="couplet",
        summary="Chinese couplet (对联) robot: give an upper line (上联), get lower lines (下联).",
        version="1",
        docs_url=None,  # Swagger UI loads from a CDN, and this may run offline; the spec is at /openapi.json
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.predictor = predictor

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return _error(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = _one_line(exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(InputError)
    async def _on_input(request: Request, exc: InputError) -> JSONResponse:
        return _error(422, _one_line(exc))

    @app.exception_handler(BusyError)
    async def _on_busy(request: Request, exc: BusyError) -> JSONResponse:
        return _error(503, _one_line(exc), {"retry-after": "1"})

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    route = dict(response_model=MatchResponse, responses=_ERRORS, summary="Answer an upper line with lower lines")
    if batching:

        @app.post("/api/match", **route)
        async def match(req: MatchRequest) -> Response:
            nonlocal batcher
            if batcher is None:  # served without lifespan events
                batcher = MicroBatcher(predictor, max_batch=max_batch)
            fut = batcher.submit(asyncio.get_running_loop(), req.upper, req.top_k, req.constrained, req.tone)
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    result = await fut
            except TimeoutError:
                raise BusyError(f"no answer within {ANSWER_TIMEOUT_S:g} s; the server is overloaded") from None
            return Response(_payload(result), media_type="application/json")

    else:

        @app.post("/api/match", **route)
        def match(req: MatchRequest) -> Response:  # a plain def runs in the threadpool
            result = predictor.match(req.upper, top_k=req.top_k, constrained=req.constrained, tone=req.tone)
            return Response(_payload(result), media_type="application/json")

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness and the loaded model")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "max_len": max_len})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(BodyGuard, max_body=max_body, timeout_s=body_timeout_s)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker serving: each worker loads $COUPLET_SERVE_MODEL once."""
    import os

    from couplet.predictor import Predictor

    model_dir = os.environ["COUPLET_SERVE_MODEL"]
    device = os.environ.get("COUPLET_SERVE_DEVICE", "cpu")
    threads = os.environ.get("COUPLET_SERVE_THREADS")
    batching = os.environ.get("COUPLET_SERVE_BATCHING", "1") != "0"
    predictor = Predictor.load(model_dir, device=device, num_threads=int(threads) if threads else None)
    return create_app(predictor, batching=batching)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any) -> Iterator[str]:
    """Run `app` under a real uvicorn server in a background thread; yields its base URL.

    Port 0 picks a free port. For tests and notebooks; `couplet serve` is the way to serve for real.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    options = {"log_level": "warning", "access_log": False, "lifespan": "on", **uvicorn_options}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="couplet-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
