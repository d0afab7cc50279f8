"""What a worker holds before it answers: its bounds, and how long requests wait in it.

Every generation a worker takes, on any engine, passes one `RequestQueue`:
- at most `limit` requests in flight (`--limit-worker-concurrency`), and at most `max_waiting`
  of them not started yet (`--max-waiting`): beyond either, a 429 (`OverloadedError`), which the
  API server takes as "busy, try another worker";
- a request that has not started `max_wait` seconds after it arrived (`--max-queue-wait`) is
  cancelled with a 503 (`QueueTimeoutError`, with `Retry-After`), which goes to the client.
A request has started when its first chunk is ready: everything before it (tokenizing, waiting
for room in the engine's batch, and the prefill) is its wait, as a client sees it.

The queue is also a Prometheus collector: the wait of every request (a histogram) and the
requests refused, by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from chatgate.errors import OverloadedError, QueueTimeoutError

T = TypeVar("T")

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RequestQueue(Collector):
    """The bounds on one worker's requests, and its wait histogram (see the module)."""

    def __init__(self, *, model: str, limit: int, max_waiting: int | None = None, max_wait: float | None = None) -> None:
        self.model = model
        self.limit = limit
        self.max_waiting = max_waiting
        self.max_wait = max_wait
        self.active = 0  # requests in flight
        self.waiting = 0  # of those, requests not started yet
        self._bucket_counts = [0] * len(WAIT_BUCKETS)
        self._waits = 0
        self._wait_sum = 0.0
        self.refused: Counter[str] = Counter()

    def _admit(self) -> None:
        if self.active >= self.limit:
            self.refused["concurrency"] += 1
            raise OverloadedError("The model is overloaded; retry shortly.")
        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            self.refused["max_waiting"] += 1
            raise OverloadedError(f"The model's waiting queue is full ({self.max_waiting} requests); retry shortly.")

    def _observe(self, seconds: float) -> None:
        self._waits += 1
        self._wait_sum += seconds
        for index, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self._bucket_counts[index] += 1

    async def serve(self, chunks: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """`chunks`, admitted under the bounds; the wait ends at the first chunk (or error)."""
        async with contextlib.aclosing(chunks):
            self._admit()
            self.active += 1
            self.waiting += 1
            began = time.perf_counter()
            try:
                try:
                    async with asyncio.timeout(self.max_wait) as clock:
                        first = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not clock.expired():
                        raise  # the work's own timeout, not the queue's
                    self.refused["max_queue_wait"] += 1
                    raise QueueTimeoutError(
                        f"The request could not start within {self.max_wait:g} seconds (--max-queue-wait): the model "
                        "is busy; retry shortly."
                    ) from None
                finally:
                    self.waiting -= 1
                    self._observe(time.perf_counter() - began)
                yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                self.active -= 1

    async def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """Work with no stream (a cross-encoder's scores), under the same bounds on requests in
        flight and not started; it has no first chunk, so no wait is observed or cut short."""
        self._admit()
        self.active += 1
        self.waiting += 1
        try:
            return await work()
        finally:
            self.active -= 1
            self.waiting -= 1

    def collect(self) -> Iterator[HistogramMetricFamily | CounterMetricFamily]:
        """The wait histogram and the refusals, labelled with the model."""
        waits = HistogramMetricFamily(
            "chatgate_queue_wait_seconds", "Time from a request's arrival at the worker to its first chunk.", labels=["model"]
        )
        cumulative = [(str(bound), count) for bound, count in zip(WAIT_BUCKETS, self._bucket_counts, strict=True)]
        waits.add_metric([self.model], [*cumulative, ("+Inf", self._waits)], self._wait_sum)
        yield waits
        refused = CounterMetricFamily(
            "chatgate_queue_rejections", "Requests a worker refused: concurrency or max_waiting (429), max_queue_wait (503).",
            labels=["model", "reason"],
        )
        for reason in ("concurrency", "max_waiting", "max_queue_wait"):
            refused.add_metric([self.model, reason], self.refused[reason])
        yield refused
