"""Retrying a call on another worker when the one picked fails or is busy before answering."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from chatgate import tracing
from chatgate.api import access
from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.errors import NoHealthyWorkerError, OverloadedError, WorkerUnavailableError

T = TypeVar("T")

ATTEMPTS = 3


async def with_failover(
    pool: WorkerPool, model: str, call: Callable[[Worker], Awaitable[T]], *, attempts: int = ATTEMPTS
) -> T:
    """`call` a worker for `model`, trying up to `attempts` workers: one that fails before
    answering is reported and skipped; one that is overloaded is skipped without a report
    (busy is not down), and if every worker tried was busy the client gets the 429."""
    with tracing.span("chatgate.dispatch", {"gen_ai.request.model": model}):
        return await _first_answer(pool, model, call, attempts)


async def _first_answer(pool: WorkerPool, model: str, call: Callable[[Worker], Awaitable[T]], attempts: int) -> T:
    tried: set[str] = set()
    last: WorkerUnavailableError | OverloadedError | None = None
    for attempt in range(1, attempts + 1):
        try:
            worker = await pool.worker_for(model, exclude=frozenset(tried))
        except NoHealthyWorkerError:
            if last is None:
                raise
            break
        entry = access.record()
        if entry is not None:  # the access line names the last worker tried, and how many were
            entry.worker = worker.address
            entry.attempts += 1
        try:
            with tracing.span("chatgate.attempt", {"chatgate.attempt": attempt, "chatgate.worker": worker.address}):
                return await call(worker)
        except OverloadedError as exc:
            last = exc
        except WorkerUnavailableError as exc:
            pool.report_failure(worker)
            last = exc
        tried.add(worker.address)
    if isinstance(last, OverloadedError):
        raise last
    raise NoHealthyWorkerError(f"No healthy worker serves `{model}` right now.") from last
