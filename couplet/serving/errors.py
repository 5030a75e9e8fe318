"""Every failure as `{"error": "<one line>"}` with its status: the app's exception handlers, and the
translation of FastAPI's validation errors into one readable line."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from couplet.serving.batcher import BusyError
from couplet.serving.body_guard import error_response
from couplet.serving.schemas import ALTERNATIVES_MAX, EXAMPLE_UPPER, TOP_K_MAX, ErrorResponse, MatchRequest

log = logging.getLogger("couplet.serve")  # the logger's name from before the split into couplet/serving/

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 408, 413, 415, 422, 500, 503)}


def _field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """One readable line (and the status) for the first validation error."""
    errors = exc.errors()
    if not errors:
        return 422, "invalid request"
    err = errors[0]
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    field = _field_name(loc)
    example = json.dumps({"upper": EXAMPLE_UPPER}, ensure_ascii=False)
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "JSON decode error")
        pos = loc[1] if len(loc) > 1 else "?"
        return 400, f"malformed JSON at character {pos}: {detail}"
    if kind == "value_error":  # the request's own checks (pins, head): their message names the field
        message = str((err.get("ctx") or {}).get("error", "")) or str(err.get("msg", "invalid value"))
        return 422, one_line(message)
    if loc == ("body",) and kind == "missing":
        return 422, f"request body is empty: send a JSON object like {example}"
    if loc == ("body",) or (kind in ("model_attributes_type", "dict_type") and not field):  # not `pins`: its own line
        return 422, f"request body must be a JSON object like {example}"
    if kind == "missing":
        extra = [_field_name(tuple(e.get("loc", ()))) for e in errors if e.get("type") == "extra_forbidden"]
        hint = f" (unknown field {extra[0]!r} given)" if extra else ""
        return 422, f"missing field {field!r}{hint}"
    if kind == "extra_forbidden":
        known = ", ".join(MatchRequest.model_fields)
        return 422, f"unknown field {field!r} (known: {known})"
    if field == "top_k" and kind in ("greater_than_equal", "less_than_equal"):
        return 422, f"top_k must be between 1 and {TOP_K_MAX} (got {err.get('input')!r})"
    if field == "alternatives" and kind in ("greater_than_equal", "less_than_equal"):
        return 422, f"alternatives must be between 0 and {ALTERNATIVES_MAX} (got {err.get('input')!r})"
    msg = str(err.get("msg", "invalid value"))
    msg = msg[:1].lower() + msg[1:]
    got = err.get("input")
    shown = json.dumps(got, ensure_ascii=False) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return 422, f"{field or 'body'}: {msg} (got {shown})"


def one_line(text: Any) -> str:
    return " ".join(str(text).split()) or "error"


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, message = validation_message(exc)
    return error_response(status, message)


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"not found: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = one_line(exc.detail)
    return error_response(exc.status_code, message, getattr(exc, "headers", None))


async def _on_input(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, one_line(exc))


async def _on_busy(request: Request, exc: BusyError) -> JSONResponse:
    return error_response(503, one_line(exc), {"retry-after": "1"})


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")


def add_error_handlers(app: FastAPI) -> None:
    """400/404/405/422 from FastAPI and Starlette, 422 for `InputError`, 503 for `BusyError`, 500 for the rest."""
    from couplet.predictor import InputError

    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(InputError, _on_input)
    app.add_exception_handler(BusyError, _on_busy)
    app.add_exception_handler(Exception, _on_crash)
