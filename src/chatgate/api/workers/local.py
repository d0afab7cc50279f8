"""In-process workers (`chatgate serve`): worker backends (engines or an upstream) in this process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prometheus_client.registry import Collector

from chatgate.api.workers.base import PoolSource, Worker, WorkerPool
from chatgate.engines.base import Engine
from chatgate.engines.memory import MemoryReader
from chatgate.errors import ModelNotFoundError, NoHealthyWorkerError
from chatgate.metrics import EngineCollector
from chatgate.protocol import worker as wire
from chatgate.settings import EngineSettings, ServeSettings
from chatgate.worker.backend import WorkerBackend, open_backends
from chatgate.worker.served import ServedModels


class LocalWorker:
    """Calls a `WorkerBackend` in the same process."""

    def __init__(self, service: WorkerBackend) -> None:
        self._service = service
        self.address = "local"

    def generate_stream(self, params: wire.GenerateParams) -> AsyncIterator[wire.WorkerChunk]:
        return self._service.generate(params.model_copy(update={"delta": True}))

    async def count_tokens(self, request: wire.CountTokenRequest) -> int:
        return await self._service.count_tokens(request)

    async def embed(self, params: wire.EmbedParams) -> wire.EmbedResult:
        return await self._service.embed(params)

    async def score_pairs(self, params: wire.ScorePairsParams) -> wire.ScorePairsResult:
        return await self._service.score_pairs(params)

    async def tokenize(self, params: wire.TokenizeParams) -> wire.TokenizeResult:
        return await self._service.tokenize(params)

    async def detokenize(self, params: wire.DetokenizeParams) -> wire.DetokenizeResult:
        return await self._service.detokenize(params)

    async def model_details(self) -> wire.ModelDetails:
        return self._service.details()


class LocalPool:
    """Picks among workers living in this process: one per model name."""

    def __init__(self, services: list[WorkerBackend]) -> None:
        self.served = ServedModels(services)
        self._local = {id(service): LocalWorker(service) for service in services}

    @property
    def _workers(self) -> dict[str, LocalWorker]:
        return {name: self._local[id(backend)] for name, backend in self.served.by_name().items()}

    def backends(self) -> list[WorkerBackend]:
        """The workers' backends, in the order they were given."""
        return self.served.backends()

    async def models(self) -> list[str]:
        return list(self._workers)

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
        try:
            worker = self._workers[model]
        except KeyError:
            raise ModelNotFoundError.for_model(model) from None
        if worker.address in exclude:  # tried already (it was busy): there is no other
            raise NoHealthyWorkerError(f"No other worker serves `{model}`.")
        return worker

    def report_failure(self, worker: Worker) -> None:
        """In-process workers do not fail by connection."""

    def readiness(self) -> dict[str, int]:
        return {name: 1 for name in self._workers}

    def collectors(self) -> list[Collector]:
        """What the workers in this process meter, for the API server's /metrics (`chatgate serve`):
        their queues, and their engines' counters (prefill, prefix cache, KV held, preemptions)."""
        services = self.served.backends()
        engines = EngineCollector(lambda: [(s.model_names[0], stats) for s in services if (stats := s.engine_stats()) is not None])
        return [*(service.queue for service in services), engines]

    def degraded(self) -> str | None:
        return None

    def load(self) -> list[tuple[str, int, int]]:
        return [(s.queue.model, *s.load()) for s in self.served.backends()]


def local_pool(settings: ServeSettings, *, engines: list[Engine] | None = None, memory: MemoryReader | None = None) -> PoolSource:
    """Serve models in this process (`chatgate serve`): the chat model from `settings` (an
    engine, or an upstream with `--engine openai`), or each `--model`, each on an engine of its
    own (its own scheduler thread), and, unless turned off, the embedding model beside them."""

    def backends() -> list[tuple[EngineSettings, Engine | None]]:
        if engines is not None:
            return [(settings.model_copy(update={"model_names": []}), engine) for engine in engines]
        built: list[tuple[EngineSettings, Engine | None]] = [(chat, None) for chat in settings.chat_models()]
        embedding = settings.embedding_engine_settings()
        if embedding is not None:
            built.append((embedding, None))
        return built

    @contextlib.asynccontextmanager
    async def pool() -> AsyncIterator[WorkerPool]:
        async with open_backends(backends(), memory=memory) as services:
            yield LocalPool(services)

    return pool
