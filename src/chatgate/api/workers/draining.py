"""The API server's worker pool as the process shuts down (`chatgate.drain`): while draining,
new work is refused (503 with Retry-After) and `/ready` says not ready; the streams already
running are counted, and those still running at the shutdown timeout end with an error."""

from __future__ import annotations

from collections.abc import AsyncIterator

from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.drain import Drain
from chatgate.protocol import worker as wire


class _DrainedWorker:
    """A worker whose generations the drain counts and ends."""

    def __init__(self, worker: Worker, drain: Drain) -> None:
        self._worker = worker
        self._drain = drain
        self.address = worker.address

    def generate_stream(self, params: wire.GenerateParams) -> AsyncIterator[wire.WorkerChunk]:
        return self._drain.guard(self._worker.generate_stream(params))

    async def count_tokens(self, request: wire.CountTokenRequest) -> int:
        return await self._worker.count_tokens(request)

    async def embed(self, params: wire.EmbedParams) -> wire.EmbedResult:
        return await self._worker.embed(params)

    async def score_pairs(self, params: wire.ScorePairsParams) -> wire.ScorePairsResult:
        return await self._worker.score_pairs(params)

    async def tokenize(self, params: wire.TokenizeParams) -> wire.TokenizeResult:
        return await self._worker.tokenize(params)

    async def detokenize(self, params: wire.DetokenizeParams) -> wire.DetokenizeResult:
        return await self._worker.detokenize(params)

    async def model_details(self) -> wire.ModelDetails:
        return await self._worker.model_details()


class DrainingPool:
    """Wraps a `WorkerPool`: no worker for new work while draining, and running streams guarded."""

    def __init__(self, pool: WorkerPool, drain: Drain) -> None:
        self._pool = pool
        self._drain = drain

    async def models(self) -> list[str]:
        return await self._pool.models()

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
        self._drain.check()
        return _DrainedWorker(await self._pool.worker_for(model, exclude=exclude), self._drain)

    def report_failure(self, worker: Worker) -> None:
        self._pool.report_failure(worker)

    def readiness(self) -> dict[str, int]:
        """No model is ready here once the server shuts down (so `/ready` answers 503)."""
        return {} if self._drain.draining else self._pool.readiness()

    def degraded(self) -> str | None:
        return "the server is shutting down" if self._drain.draining else self._pool.degraded()

    def load(self) -> list[tuple[str, int, int]]:
        return self._pool.load()
