"""A worker pool that shows each key only the models its policy allows: another model is
`model_not_found`, exactly as a model nobody serves, so a key learns nothing of the others."""

from __future__ import annotations

from chatgate.api.limits import grant
from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.errors import ModelNotFoundError


class KeyScopedPool:
    """Wraps a `WorkerPool`, consulting the current request's grant."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    async def models(self) -> list[str]:
        return [m for m in await self._pool.models() if grant.allows(m)]

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
        if not grant.allows(model):
            raise ModelNotFoundError.for_model(model)
        return await self._pool.worker_for(model, exclude=exclude)

    def report_failure(self, worker: Worker) -> None:
        self._pool.report_failure(worker)

    def readiness(self) -> dict[str, int]:
        return self._pool.readiness()

    def degraded(self) -> str | None:
        return self._pool.degraded()

    def load(self) -> list[tuple[str, int, int]]:
        return self._pool.load()
