"""The couplet robot over HTTP: a FastAPI app around one loaded `Predictor` (docs/serving.md).

    schemas.py     request/answer models and `match_payload`, the one serialiser of a MatchResult
    body_guard.py  `BodyGuard`, the pure-ASGI check of request bodies (size, content type, arrival time)
    batcher.py     `MicroBatcher`, the inference thread that answers queued requests in batches
    errors.py      exception handlers: every failure as {"error": "<one line>"}
    app.py         `create_app(predictor)`, the routes, `app_from_env` (uvicorn's multi-worker factory)

`from couplet.serving import create_app` works; it is imported on first use, so `couplet match --json`
(which only needs `schemas`) does not load FastAPI.
"""

from __future__ import annotations

__all__ = ["create_app", "app_from_env"]


def __getattr__(name: str):
    if name in __all__:
        from couplet.serving import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
