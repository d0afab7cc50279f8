"""Where the API server's router comes from: workers in this process, or a controller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx

from chatgate.api.clients import LocalRouter, Router
from chatgate.api.remote import ControllerRouter
from chatgate.engines import create_engine
from chatgate.engines.base import Engine
from chatgate.settings import ApiProcessSettings, ServeSettings
from chatgate.worker.service import WorkerService

Backend = Callable[[], AbstractAsyncContextManager[Router]]


def local_backend(settings: ServeSettings, *, engines: list[Engine] | None = None) -> Backend:
    """Serve engines in this process (`chatgate serve`): by default the chat model from
    `settings` and, unless turned off, the embedding model beside it."""

    def build() -> list[tuple[Engine, list[str]]]:
        if engines is not None:
            return [(engine, []) for engine in engines]
        built = [(create_engine(settings), settings.model_names)]
        embedding = settings.embedding_engine_settings()
        if embedding is not None:
            built.append((create_engine(embedding), []))
        return built

    @contextlib.asynccontextmanager
    async def backend() -> AsyncIterator[Router]:
        served = build()
        await asyncio.gather(*(engine.start() for engine, _ in served))
        services = [
            WorkerService(
                engine=engine, model_names=names, limit_concurrency=settings.limit_worker_concurrency
            )
            for engine, names in served
        ]
        try:
            yield LocalRouter(services)
        finally:
            for service in services:
                await service.close()
            for engine, _ in served:
                await engine.close()

    return backend


def controller_backend(settings: ApiProcessSettings) -> Backend:
    """Serve through workers a controller knows (`chatgate api`)."""

    @contextlib.asynccontextmanager
    async def backend() -> AsyncIterator[Router]:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as http:
            router = ControllerRouter(
                http=http, controller=settings.controller_address, refresh=settings.worker_table_refresh
            )
            refresher = asyncio.create_task(router.run())
            try:
                yield router
            finally:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher

    return backend
