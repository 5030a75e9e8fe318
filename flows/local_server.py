"""Prefect's temporary local server, started early.

Prefect starts the same server by itself (`SubprocessASGIServer`) the first time a flow needs an
API, but only after the caller has imported the server module (~4 s on 2 cores) and then it waits
for the subprocess to import it again. Starting the identical uvicorn command first thing lets the
server boot while the CLI imports the pipeline, which is what keeps a cached `couplet run` short.
With `PREFECT_API_URL` set (a real server), nothing is started.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, api_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"temporary Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"temporary Prefect server did not answer within {timeout_s:.0f} s")


def start_temporary_server(timeout_s: float = 60.0):
    """Start the server now and return a function that blocks until it answers.

    The server is stopped at interpreter exit, after Prefect's own exit handlers (registered
    later, so run earlier) have flushed their logs and events to it.
    """
    if os.environ.get("PREFECT_API_URL"):
        return lambda: None
    prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    stamp = _migration_stamp()
    version = importlib.metadata.version("prefect")
    if stamp is not None and stamp.is_file() and stamp.read_text().strip() == version:
        # This database was migrated by this Prefect version already: skip the check (~1 s).
        env.setdefault("PREFECT_API_DATABASE_MIGRATE_ON_START", "false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=env,
        stdout=subprocess.DEVNULL,
        preexec_fn=functools.partial(_terminate_with_parent, os.getpid()) if sys.platform == "linux" else None,
        # Its own session: Ctrl+C in a terminal, or `timeout`, signals the whole foreground process group;
        # the server must outlive that long enough for the run to record its interrupted state.
        start_new_session=True,
    )
    _started.append(proc)
    atexit.register(_stop, proc)
    api_url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = api_url

    def wait_until_ready() -> None:
        _wait_ready(proc, api_url, timeout_s)
        if stamp is not None:
            stamp.write_text(version)

    return wait_until_ready


_started: list[subprocess.Popen] = []


def stop_temporary_server() -> None:
    """Stop the server started by this process now (an interrupted run leaves through os._exit, past atexit)."""
    while _started:
        _stop(_started.pop())


def _terminate_with_parent(parent: int) -> None:
    """Runs in the server's process before exec: the kernel sends it SIGTERM when `couplet run` dies,
    however it dies (SIGTERM and SIGKILL skip atexit), so no server is left holding its port."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _migration_stamp() -> Path | None:
    """A file beside the default SQLite database recording the Prefect version that migrated it."""
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
        return None
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    database = home / "prefect.db"
    return database.with_name("prefect.db.couplet-migrated") if database.exists() else None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
