"""Where the API server's router comes from: workers in this process, or a controller."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx

from chatgate.api.clients import ControllerRouter, LocalRouter, Router
from chatgate.engines import create_engine
from chatgate.engines.base import Engine
from chatgate.settings import ApiProcessSettings, EngineSettings
from chatgate.worker.service import WorkerService

Backend = Callable[[], AbstractAsyncContextManager[Router]]


def local_backend(settings: EngineSettings, *, engine: Engine | None = None) -> Backend:
    """Serve an engine in this process (`chatgate serve`)."""

    @contextlib.asynccontextmanager
    async def backend() -> AsyncIterator[Router]:
        model = engine or create_engine(settings)
        await model.start()
        try:
            service = WorkerService(
                engine=model,
                model_names=settings.model_names,
                limit_concurrency=settings.limit_worker_concurrency,
            )
            yield LocalRouter([service])
        finally:
            await model.close()

    return backend


def controller_backend(settings: ApiProcessSettings) -> Backend:
    """Serve through workers a controller knows (`chatgate api`)."""

    @contextlib.asynccontextmanager
    async def backend() -> AsyncIterator[Router]:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as http:
            yield ControllerRouter(
                http=http, controller=settings.controller_address, ttl=settings.worker_table_ttl
            )

    return backend
