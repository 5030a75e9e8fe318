"""`BodyGuard`: a pure ASGI middleware that decides, before FastAPI sees a request, whether its body is
acceptable: small enough, JSON, and arriving in time."""

from __future__ import annotations

import asyncio
import email.message

from starlette.responses import JSONResponse

MAX_BODY_BYTES = 16 * 1024  # request bodies over this are refused with 413
BODY_TIMEOUT_S = 10.0  # a declared body that has not fully arrived by then is refused with 408


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the server sends: `{"error": "<one line>"}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def is_json(content_type: str) -> bool:
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
        close = {"connection": "close"}
        if length is not None and length < 0:
            await error_response(400, "invalid Content-Length header", close)(scope, receive, send)
            return
        if length is not None and length > self.max_body:
            await error_response(413, f"request body too large: {length} bytes (limit {self.max_body})", close)(scope, receive, send)
            return
        if (length or chunked) and not is_json(content_type):
            shown = content_type or "none"
            message = f"unsupported content type {shown!r}: send JSON with Content-Type: application/json"
            await error_response(415, message, close)(scope, receive, send)
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
                        await error_response(413, f"request body too large: over {self.max_body} bytes", close)(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await error_response(408, f"request body did not arrive within {self.timeout_s:g} s", close)(scope, receive, send)
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
