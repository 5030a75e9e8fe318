"""The FastAPI app: `create_app(predictor)`, its routes, and `app_from_env` (uvicorn's factory when
`couplet serve --workers N` runs several processes).

Routes:

- `POST /api/match`  `{"upper": "...", "top_k": 3, "tone": false, "direction": "down", "pins": {"0": "福"}, "alternatives": 5}` ->
  `{"upper", "candidates": [{"lower", "score"}], "constraints": [...], "relaxed": [...], "model": id, "direction",
  "alternatives": [[{"char", "score"}, ...], ...]}`
- `GET /healthz` -> `{"status": "ok", "model": id, "max_len": n}`
- `GET /` -> the web page (couplet/web/index.html); `GET /openapi.json` -> the OpenAPI spec (no /docs: Swagger UI needs a CDN).

Every error is `{"error": "<one line>"}` with a 4xx status: 400 malformed JSON or a bad Content-Length,
408 a body that does not arrive in time, 413 a body over 16 KiB (refused from Content-Length before it is
read, and capped while streaming), 415 a non-JSON content type, 422 a well-formed request that cannot be
answered (missing/unknown/mistyped field, top_k outside 1..10, alternatives outside 0..20, an unknown direction,
an impossible pin, empty/too long/non-Chinese text, characters outside the vocabulary, a blocked word in the line), 503 an overloaded server. Unexpected failures are a 500 with the same shape,
never an HTML page or a hang (couplet/serving/errors.py; the body checks are couplet/serving/body_guard.py).

Inference is CPU-bound torch whose cost is mostly reading the weights, so a batch of lines costs little
more than one. By default `/api/match` queues each request for one inference thread (`MicroBatcher`,
couplet/serving/batcher.py) that answers whatever has queued in one `predictor.match_batch` call, while the
event loop keeps parsing HTTP (torch releases the GIL). `create_app(..., batching=False)` instead calls
`predictor.match` per request in Starlette's threadpool. docs/serving.md has the measurements behind the choice.
Requests with pins or alternatives go through the same inference thread, answered one by one after each batch.

What a route needs (the `Answerer`, the health answer, the page) lives on `app.state` and reaches the
route through `Depends`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from couplet.serving.balance import ENV_VAR, BalanceMiddleware, ConnectionBalancer, SlotTable
from couplet.serving.batcher import BusyError, MicroBatcher
from couplet.serving.body_guard import BODY_TIMEOUT_S, MAX_BODY_BYTES, BodyGuard
from couplet.serving.errors import ERROR_RESPONSES, add_error_handlers
from couplet.serving.schemas import HealthResponse, MatchRequest, MatchResponse, match_json

ANSWER_TIMEOUT_S = 60.0  # a queued request not answered by then gets 503 instead of waiting on


class Answerer:
    """Turns a `MatchRequest` into a `MatchResult`: through one `MicroBatcher` thread (batching=True), or
    `predictor.match` in Starlette's threadpool, one request per call (batching=False)."""

    def __init__(self, predictor, *, batching: bool = True, max_batch: int = 32):
        self.predictor = predictor
        self.batching = batching
        self.max_batch = max_batch
        self.batcher: MicroBatcher | None = None

    def start(self) -> None:
        if self.batching and self.batcher is None:
            self.batcher = MicroBatcher(self.predictor, max_batch=self.max_batch)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    async def answer(self, req: MatchRequest):
        if not self.batching:
            extra = {} if req.plain and req.direction == "down" else {
                "direction": req.direction, "pins": req.pin_map(), "alternatives": req.alternatives}
            return await run_in_threadpool(self.predictor.match, req.upper, top_k=req.top_k, constrained=req.constrained, tone=req.tone, **extra)
        if self.batcher is None:  # served without lifespan events
            self.start()
        fut = self.batcher.submit(
            asyncio.get_running_loop(), req.upper, req.top_k, req.constrained, req.tone,
            req.direction, req.pin_map() if not req.plain else None, req.alternatives,
        )
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                return await fut
        except TimeoutError:
            raise BusyError(f"no answer within {ANSWER_TIMEOUT_S:g} s; the server is overloaded") from None


# ------------------------------------------------------------------------------------ dependencies


async def _answerer(request: Request) -> Answerer:  # async: a plain def dependency would cost a threadpool hop
    return request.app.state.answerer


async def _health(request: Request) -> HealthResponse:
    return request.app.state.health


async def _page(request: Request) -> str:
    return request.app.state.page


# ------------------------------------------------------------------------------------------ routes

router = APIRouter()


@router.post(
    "/api/match",
    response_model=None,  # the answer is serialised by hand (match_json): the route's hot path
    responses={200: {"model": MatchResponse, "description": "Lower lines for the upper line, best first."}, **ERROR_RESPONSES},
    summary="Answer an upper line with lower lines",
)
async def match(req: MatchRequest, answerer: Annotated[Answerer, Depends(_answerer)]) -> Response:
    result = await answerer.answer(req)
    return Response(match_json(result), media_type="application/json")


@router.get("/healthz", response_model=HealthResponse, summary="Liveness and the loaded model")
async def healthz(health: Annotated[HealthResponse, Depends(_health)]) -> HealthResponse:
    return health


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(page: Annotated[str, Depends(_page)]) -> HTMLResponse:
    return HTMLResponse(page)


# --------------------------------------------------------------------------------------------- app


def _web_page() -> str:
    return (Path(__file__).resolve().parents[1] / "web" / "index.html").read_text(encoding="utf-8")


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


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.answerer.start()
    try:
        yield
    finally:
        app.state.answerer.close()


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
    requests in batches via `predictor.match_batch`. batching=False: `predictor.match` runs in Starlette's
    threadpool, one request per call.
    """
    app = FastAPI(
        title="couplet",
        summary="Chinese couplet (对联) robot: give an upper line (上联), get lower lines (下联).",
        version="1",
        docs_url=None,  # Swagger UI loads from a CDN, and this may run offline; the spec is at /openapi.json
        redoc_url=None,
        lifespan=_lifespan,
    )
    app.state.answerer = Answerer(predictor, batching=batching, max_batch=max_batch)
    app.state.health = HealthResponse(status="ok", model=_model_id(predictor), max_len=_max_len(predictor))
    app.state.page = _web_page()
    add_error_handlers(app)
    app.include_router(router)
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
    blocklist = os.environ.get("COUPLET_SERVE_BLOCKLIST") or None
    predictor = Predictor.load(model_dir, device=device, num_threads=int(threads) if threads else None, blocklist=blocklist)
    app = create_app(predictor, batching=batching)
    if os.environ.get(ENV_VAR):  # several workers: spread keep-alive connections over them
        app.add_middleware(BalanceMiddleware, balancer=ConnectionBalancer(SlotTable(Path(os.environ[ENV_VAR]))))
    return app
