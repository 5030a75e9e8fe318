"""Serving helpers for tests: `serve_in_thread` (an ASGI app under a real uvicorn server in a background thread),
`free_port`, `CLI` (the couplet command), and what the HTTP API tests share: `BodyReads`, `assert_error`, `raw_exchange`."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from typing import Any, Iterator

import httpx

CLI = [sys.executable, "-c", "import sys; from couplet.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any) -> Iterator[str]:
    """Run `app` under a real uvicorn server in a background thread; yields its base URL.

    Port 0 picks a free port. `couplet serve` is the way to serve for real.
    """
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


class BodyReads:
    """ASGI wrapper that records, per request, the size of every body message the app pulled from the server."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, list[int]]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reads: list[int] = []
        self.requests.append((scope["path"], reads))

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                reads.append(len(message.get("body", b"")))
            return message

        await self.app(scope, counted, send)

    def only(self, path: str) -> list[int]:
        """The body reads of the one request to `path` since the last `clear()`."""
        found = [reads for p, reads in self.requests if p == path]
        assert len(found) == 1, self.requests
        return found[0]

    def clear(self) -> None:
        self.requests.clear()


def assert_error(resp: httpx.Response, status: int, *needles: str) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message and "\n" not in message
    for needle in needles:
        assert needle.lower() in message.lower(), message
    return message


def raw_exchange(url: str, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, return whatever comes back before the server closes or the timeout."""
    host, port = url.split("://")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b'"}' in chunks[-1]:
                    break
        except socket.timeout:
            pass
    return b"".join(chunks)
