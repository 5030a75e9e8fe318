"""`MicroBatcher`: one inference thread answering queued requests in batches."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
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
    pins or alternatives share the model call the same way, then are decoded one by one with their own pins. Results
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
        """Queue one request. Plain ones (no pins, no alternatives) are answered in batches by `match_batch`; the
        others share the model call, then are decoded one by one with their pins (`_answer_studio`)."""
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
            if singles:
                self._answer_studio(singles)

    def _answer_studio(self, items: list) -> None:
        """Requests with pins or alternatives: equal-length lines of one (top_k, constrained, tone, direction) share
        one model call (`predictor.log_probs`); each is then decoded with its own pins (`predictor.answer`), as
        `predictor.match` does. A predictor without those methods answers each with `match`."""
        p = self.predictor
        if not all(hasattr(p, name) for name in ("prepare", "log_probs", "answer", "decode_options")):
            for item in items:
                (top_k, constrained, tone, direction), (pins, alternatives) = item[3], item[4]
                try:
                    outcome = (p.match(item[2], top_k=top_k, constrained=constrained, tone=tone, direction=direction,
                                       pins=pins, alternatives=alternatives), False)
                except Exception as exc:
                    outcome = (exc, True)
                self._send([item], [outcome])
            return
        groups: dict[tuple, list] = {}
        for item in items:
            try:
                text = p.prepare(item[2])
            except Exception as exc:
                self._send([item], [(exc, True)])
                continue
            groups.setdefault((item[3], len(text)), []).append((item, text))
        for ((top_k, constrained, tone, direction), _), group in groups.items():
            try:
                lp = p.log_probs([text for _, text in group], direction=direction)
                options = p.decode_options(constrained, tone)
                if direction == "up":  # as Predictor.match: the tone rule mirrored
                    options = dataclasses.replace(options, mirror=True)
            except Exception as exc:  # e.g. "up" on a one-direction model: each request gets the error
                self._send([item for item, _ in group], [(exc, True)] * len(group))
                continue
            for row, (item, text) in enumerate(group):
                pins, alternatives = item[4]
                try:
                    outcome = (p.answer(text, lp[row], top_k, options, pins=pins, alternatives=alternatives), False)
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
