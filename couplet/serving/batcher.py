"""`MicroBatcher`: one inference thread answering queued requests in batches."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any


class BusyError(RuntimeError):
    """The inference queue is full (or closed): the server answers 503."""


class MicroBatcher:
    """One inference thread that answers queued requests in batches.

    The model's cost is dominated by reading its weights, so answering several equal-length lines in one
    call costs little more than answering one (docs/serving.md). Requests are queued from the event loop;
    the thread takes whatever has queued while it was busy (no waiting to fill a batch, so an idle server
    answers at once), groups it by decoding options and direction and calls `predictor.match_batch`. Requests with
    pins or alternatives (per line, so not batched) are then answered one by one with `predictor.match`. Results
    go back to the event loop with `call_soon_threadsafe`. Only this thread touches the predictor.
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

    def submit(
        self,
        loop: asyncio.AbstractEventLoop,
        upper: str,
        top_k: int,
        constrained: bool,
        tone: bool,
        direction: str = "down",
        pins: dict[int, str] | None = None,
        alternatives: int = 0,
    ) -> asyncio.Future:
        """Queue one request. Plain ones (no pins, no alternatives) are answered in batches; the others one by
        one with `predictor.match`, on the same thread (pins and alternatives are per line)."""
        fut = loop.create_future()
        studio = (pins, alternatives) if pins or alternatives else None
        with self._cv:
            if self._closed:
                raise BusyError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise BusyError(f"server busy: {len(self._queue)} requests queued, try again shortly")
            self._queue.append((loop, fut, upper, (top_k, constrained, tone, direction), studio))
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
            singles = []
            for item in batch:
                if item[4] is None:
                    groups.setdefault(item[3], []).append(item)
                else:
                    singles.append(item)
            for (top_k, constrained, tone, direction), items in groups.items():
                kwargs = {"direction": direction} if direction != "down" else {}  # a predictor without directions still batches
                try:
                    results = self.predictor.match_batch(
                        [item[2] for item in items], top_k=top_k, constrained=constrained, tone=tone, errors="return", **kwargs
                    )
                    if len(results) != len(items):
                        raise RuntimeError(f"match_batch answered {len(results)} of {len(items)} lines")
                    outcomes = [(r, isinstance(r, BaseException)) for r in results]
                except Exception as exc:  # a failure of the whole call fails each of its requests
                    outcomes = [(exc, True)] * len(items)
                self._send(items, outcomes)
            for item in singles:
                (top_k, constrained, tone, direction), (pins, alternatives) = item[3], item[4]
                try:
                    value = self.predictor.match(
                        item[2], top_k=top_k, constrained=constrained, tone=tone, direction=direction, pins=pins, alternatives=alternatives
                    )
                    outcome = (value, False)
                except Exception as exc:
                    outcome = (exc, True)
                self._send([item], [outcome])

    def _send(self, items: list, outcomes: list) -> None:
        for item, (value, is_error) in zip(items, outcomes):
            loop, fut = item[0], item[1]
            try:
                loop.call_soon_threadsafe(self._deliver, fut, value, is_error)
            except RuntimeError:  # that event loop is closed
                pass
