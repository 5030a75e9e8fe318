"""Keep-alive connections spread evenly over the workers of `couplet serve --workers N`.

The workers share one listening socket, and whichever event loop wakes first accepts every pending
connection: a client that opens a few keep-alive connections at once (a connection pool, a load tester)
often lands them all on one worker, which then serves like `--workers 1` while the other cores idle
(docs/benchmarks.md measured 298 against 574 requests/s for the two outcomes). Connections are not handed
between processes, so the busier worker sheds one instead: it answers that request with `Connection: close`,
the client reconnects, and an idle worker, waiting in accept, is the likelier to take it.

Each worker counts its active connections (distinct client addresses with a request in the last
`window_s`) and publishes the count in a small file shared by the workers (`SlotTable`: one slot of pid and
count per worker, claimed on start). A worker sheds a connection when it holds at least two more than the
least busy live worker, at most once per `min_gap_s`, so a balanced split (2-2, 3-2) is left alone and a
lopsided one (3-1, 4-0) evens out within a few requests. One worker: none of this runs.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from pathlib import Path

SLOT = struct.Struct("<qq")  # pid, active connections
ENV_VAR = "COUPLET_SERVE_BALANCE"  # the slot file's path, set by `couplet serve` for its workers


def create_slot_file(path: Path, workers: int) -> Path:
    """The zeroed slot file for `workers` workers (uvicorn's restarted workers reuse dead ones' slots)."""
    path.write_bytes(bytes(SLOT.size * workers))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlotTable:
    """This worker's slot in the shared file, and the other workers' counts."""

    def __init__(self, path: Path, pid: int | None = None):
        self.pid = os.getpid() if pid is None else pid
        self._file = open(path, "r+b")  # noqa: SIM115 - held for the worker's life
        size = os.fstat(self._file.fileno()).st_size
        if size == 0 or size % SLOT.size:
            raise ValueError(f"{path}: not a slot file ({size} bytes)")
        self.slots = size // SLOT.size
        self._map = mmap.mmap(self._file.fileno(), size)
        fcntl.flock(self._file, fcntl.LOCK_EX)  # two workers starting at once must not claim one slot
        try:
            free = [i for i in range(self.slots) if not (pid := self._pid(i)) or not _alive(pid)]
            if not free:
                raise ValueError(f"{path}: all {self.slots} slots are held by live workers")
            self.index = free[0]
            SLOT.pack_into(self._map, self.index * SLOT.size, self.pid, 0)
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def _pid(self, i: int) -> int:
        return SLOT.unpack_from(self._map, i * SLOT.size)[0]

    def publish(self, count: int) -> None:
        SLOT.pack_into(self._map, self.index * SLOT.size, self.pid, count)

    def least_busy_other(self) -> tuple[int, int] | None:
        """(count, pid) of the other claimed slot with the fewest connections, or None when there is none."""
        best = None
        for i in range(self.slots):
            if i == self.index:
                continue
            pid, count = SLOT.unpack_from(self._map, i * SLOT.size)
            if pid and (best is None or count < best[0]):
                best = (count, pid)
        return best

    def close(self) -> None:
        SLOT.pack_into(self._map, self.index * SLOT.size, 0, 0)
        self._map.close()
        self._file.close()


class ConnectionBalancer:
    """Decides, per request, whether this worker should close the request's connection after answering."""

    def __init__(self, table: SlotTable, *, window_s: float = 1.0, min_gap_s: float = 0.05, clock=time.monotonic):
        self.table = table
        self.window_s = window_s
        self.min_gap_s = min_gap_s
        self.clock = clock
        self.peers: dict[tuple, float] = {}  # client address -> when it last sent a request
        self.next_prune = 0.0
        self.published = -1
        self.last_shed = -float("inf")
        self.shed = 0  # connections closed to rebalance (for tests and logs)

    def should_close(self, peer: tuple | None) -> bool:
        if peer is None:
            return False
        now = self.clock()
        self.peers[peer] = now
        if now >= self.next_prune:  # a few times a window, not per request: the dict may hold many peers
            cutoff = now - self.window_s
            self.peers = {p: t for p, t in self.peers.items() if t >= cutoff}
            self.next_prune = now + self.window_s / 4
        mine = len(self.peers)
        if mine != self.published:
            self.table.publish(mine)
            self.published = mine
        if mine < 2 or now - self.last_shed < self.min_gap_s:
            return False
        other = self.table.least_busy_other()
        if other is None or mine < other[0] + 2 or not _alive(other[1]):
            return False
        del self.peers[peer]
        self.table.publish(mine - 1)
        self.published = mine - 1
        self.last_shed = now
        self.shed += 1
        return True


class BalanceMiddleware:
    """ASGI middleware: adds `Connection: close` to the responses `ConnectionBalancer` picks."""

    def __init__(self, app, balancer: ConnectionBalancer):
        self.app = app
        self.balancer = balancer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.balancer.should_close(scope.get("client")):
            return await self.app(scope, receive, send)

        async def send_closing(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)
