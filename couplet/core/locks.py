"""Inter-process locks under `$COUPLET_HOME/.locks/`, so two runs at once (a schedule firing during a
manual run, a worker and `couplet run`) cannot interleave their writes.

Stage outputs are content-addressed and renamed into place atomically, so a concurrent run can at
worst repeat work; what needs a lock is a read-modify-write of a shared file (`models/registry.json`,
an index) or a long write into one folder (a training run and its checkpoints in `models/<run-id>/`).

    with hold_lock(home, "models/registry"):
        ...  # read registry.json, decide, write it back

The lock is `fcntl.flock` on `$COUPLET_HOME/.locks/<resource>.lock`: the kernel drops it when the
holder exits or crashes, so a stale lock file never blocks anyone. The file holds the holder's pid,
host and start time, for the error message. POSIX only (fcntl).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from couplet.core.catalog import Catalog

DEFAULT_TIMEOUT_S = 600.0


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the timeout."""


def lock_path(home: Path, resource: str) -> Path:
    """`$COUPLET_HOME/.locks/<resource with / → ->.lock`, e.g. models/registry → models-registry.lock."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", resource.strip("/")).strip("-.")
    if not name:
        raise ValueError(f"lock resource {resource!r} has no usable name")
    return Catalog(Path(home)).locks_dir / f"{name}.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return ""
    if not info.get("pid"):
        return ""
    return f" (held by pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')})"


@contextlib.contextmanager
def hold_lock(home: Path, resource: str, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 0.1) -> Iterator[Path]:
    """Hold the exclusive lock on `resource` (a path under `$COUPLET_HOME`, e.g. `models/<run-id>`).

    Waits up to `timeout_s` seconds, then raises `LockTimeout` with a one-line message naming the
    resource, the wait and the holder. Not re-entrant: taking the same lock twice, even within one
    process, waits for the first to be released.
    """
    path = lock_path(home, resource)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"another couplet run is writing {resource}; waited {timeout_s:g} s{_holder(fd)}. "
                    f"Try again when it has finished (lock file: {path})"
                )
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
