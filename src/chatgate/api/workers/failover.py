"""Retrying a call on another worker when the one picked fails before answering."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.errors import NoHealthyWorkerError, WorkerUnavailableError

T = TypeVar("T")

ATTEMPTS = 3


async def with_failover(
    pool: WorkerPool, model: str, call: Callable[[Worker], Awaitable[T]], *, attempts: int = ATTEMPTS
) -> T:
    """`call` a worker for `model`; a worker that fails before answering is reported and
    another is tried, up to `attempts` workers."""
    tried: set[str] = set()
    last: WorkerUnavailableError | None = None
    for _ in range(attempts):
        try:
            worker = await pool.worker_for(model, exclude=frozenset(tried))
        except NoHealthyWorkerError:
            if last is None:
                raise
            break
        try:
            return await call(worker)
        except WorkerUnavailableError as exc:
            pool.report_failure(worker)
            tried.add(worker.address)
            last = exc
    raise NoHealthyWorkerError(f"No healthy worker serves `{model}` right now.") from last
