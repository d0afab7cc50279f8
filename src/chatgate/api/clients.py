"""The API server's two seams: a router (which worker serves model M) and a worker client.

This module holds the protocols and their in-process implementations, used by `chatgate
serve`; `remote.py` holds the HTTP ones, which speak FastChat's controller/worker protocol, used
by `chatgate api`. Request handling depends only on the protocols, so it is the same code in
both modes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

from chatgate.errors import ModelNotFoundError
from chatgate.protocol.worker import (
    CountTokenRequest,
    EmbedParams,
    EmbedResult,
    GenerateParams,
    ModelDetails,
    WorkerChunk,
)
from chatgate.worker.service import WorkerService

log = logging.getLogger(__name__)


class WorkerClient(Protocol):
    """Talks to one worker."""

    address: str

    def generate_stream(self, params: GenerateParams) -> AsyncIterator[WorkerChunk]:
        """Stream delta chunks; a request error raises `ChatgateError` before the first one."""
        ...

    async def count_tokens(self, request: CountTokenRequest) -> int:
        """Tokens the prompt takes on this worker's model."""
        ...

    async def embed(self, params: EmbedParams) -> EmbedResult:
        """Embedding vectors of the inputs, in order."""
        ...

    async def model_details(self) -> ModelDetails:
        """Context length and supported extensions."""
        ...


class Router(Protocol):
    """Knows which models are served and by which worker."""

    async def models(self) -> list[str]:
        """Names of the models served now."""
        ...

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> WorkerClient:
        """A worker for `model` other than `exclude`d addresses.

        Raises `ModelNotFoundError` for a model nobody serves, `NoHealthyWorkerError` when its
        workers are all down.
        """
        ...

    def report_failure(self, worker: WorkerClient) -> None:
        """Take a worker that failed before answering out of rotation."""
        ...

    def readiness(self) -> dict[str, int]:
        """Healthy workers per served model."""
        ...

    def load(self) -> list[tuple[str, int, int]]:
        """(worker, queued or running requests, running sequences) for each known worker."""
        ...


# In-process ------------------------------------------------------------------------------


class LocalWorkerClient:
    """Calls a `WorkerService` in the same process."""

    def __init__(self, service: WorkerService) -> None:
        self._service = service
        self.address = "local"

    def generate_stream(self, params: GenerateParams) -> AsyncIterator[WorkerChunk]:
        return self._service.generate(params.model_copy(update={"delta": True}))

    async def count_tokens(self, request: CountTokenRequest) -> int:
        return self._service.count_tokens(request)

    async def embed(self, params: EmbedParams) -> EmbedResult:
        return await self._service.embed(params)

    async def model_details(self) -> ModelDetails:
        return self._service.details()


class LocalRouter:
    """Routes to workers living in this process."""

    def __init__(self, services: list[WorkerService]) -> None:
        self._clients: dict[str, LocalWorkerClient] = {}
        self._services = {service.model_names[0]: service for service in services}
        for service in services:
            for name in service.model_names:
                self._clients[name] = LocalWorkerClient(service)

    async def models(self) -> list[str]:
        return list(self._clients)

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> WorkerClient:
        try:
            return self._clients[model]
        except KeyError:
            raise ModelNotFoundError.for_model(model) from None

    def report_failure(self, worker: WorkerClient) -> None:
        """In-process workers do not fail by connection."""

    def readiness(self) -> dict[str, int]:
        return {name: 1 for name in self._clients}

    def load(self) -> list[tuple[str, int, int]]:
        return [(name, *self._services[name].load()) for name in self._services]
