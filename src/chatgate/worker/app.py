"""The model worker process: FastChat's worker endpoints (`routes.py`) over its `ServedModels`:
one `WorkerBackend` per `--model` (or the one `--model-path` names), each with its own engine
thread, queue and share of the cores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from chatgate.drain import Drain
from chatgate.engines.base import Engine, EngineStats
from chatgate.fleet import fleet_client, secure
from chatgate.metrics import EngineCollector, FleetCollector
from chatgate.ops import health_routes, metrics_routes
from chatgate.settings import EngineSettings, WorkerSettings
from chatgate.tasks import cancel_and_wait
from chatgate.tracing import SERVICE_WORKER, TraceMiddleware, Tracing
from chatgate.worker import routes
from chatgate.worker.heartbeat import Heartbeat
from chatgate.worker.backend import open_backends
from chatgate.worker.served import ServedModels


def _collector(models: ServedModels, address: str) -> FleetCollector:
    return FleetCollector(
        workers_per_model=lambda: {name: 1 for name in models.model_names},
        worker_load=lambda: [(address, *models.load())],
        # per model, under its first name; none while unloaded
        served=lambda: {b.model_names[0]: b.served for b in models.backends() if b.model_names},
    )


def _engine_stats(models: ServedModels) -> list[tuple[str, EngineStats]]:
    return [
        (backend.model_names[0], stats) for backend in models.backends()
        if backend.model_names and (stats := backend.engine_stats()) is not None
    ]


@contextlib.asynccontextmanager
async def open_models(
    settings: WorkerSettings, *, engine: Engine | None = None, engines: list[Engine] | None = None
) -> AsyncIterator[ServedModels]:
    """Open a backend for each model `settings` name (or serve the `engine` given, or each of
    `engines` under its own name), loading them concurrently, and stop them all on exit."""
    configs: list[tuple[EngineSettings, Engine | None]] = [(chat, None) for chat in settings.chat_models()]
    if engine is not None:
        configs = [(settings, engine)]
    elif engines is not None:
        configs = [(settings.model_copy(update={"model_names": []}), e) for e in engines]
    async with open_backends(configs) as backends:
        yield ServedModels(backends)


def create_worker_app(
    settings: WorkerSettings, *, engine: Engine | None = None, engines: list[Engine] | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the worker app; its models are opened from settings unless an engine (or several) is given.
    Spans go to `tracer_provider` if given (its owner shuts it down), else where the settings say."""
    registry = CollectorRegistry()
    tracing = Tracing.of(service=SERVICE_WORKER, endpoint=settings.otlp_endpoint, provider=tracer_provider)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_models(settings, engine=engine, engines=engines) as models:
            async with _serving(app, settings, registry, models):
                yield
        await asyncio.to_thread(tracing.close)  # the last spans are flushed before the process ends

    app = FastAPI(title="chatgate worker", lifespan=lifespan)
    app.state.drain = Drain(timeout=settings.shutdown_timeout, what="This worker")
    app.include_router(health_routes())
    app.include_router(metrics_routes(registry))
    app.include_router(routes.router)
    secure(app, settings)
    app.add_middleware(TraceMiddleware, tracing=tracing)
    return app


@contextlib.asynccontextmanager
async def _serving(
    app: FastAPI, settings: WorkerSettings, registry: CollectorRegistry, models: ServedModels
) -> AsyncIterator[None]:
    """Expose the models to the routes, meter them, and keep them registered with the controller
    until the worker shuts down (draining stops the heartbeat and deregisters first)."""
    app.state.models = models
    collector = _collector(models, settings.address())
    engine = EngineCollector(lambda: _engine_stats(models))
    queues = [backend.queue for backend in models.backends()]
    registry.register(collector)
    registry.register(engine)
    for queue in queues:
        registry.register(queue)
    async with fleet_client(settings, timeout=httpx.Timeout(10.0)) as http:
        task = None
        leaving: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if not settings.no_register:
            beat = Heartbeat(
                http=http,
                controller=settings.controller_address,
                address=settings.address(),
                models=models,
                interval=settings.heartbeat_interval,
            )
            task = asyncio.create_task(beat.run())

            async def leave() -> None:
                await cancel_and_wait(task)  # a heartbeat now would register the worker again
                await beat.leave()

            leaving = app.state.drain.leaving(leave)
        try:
            with leaving:
                yield
        finally:
            await cancel_and_wait(task)
            registry.unregister(collector)
            registry.unregister(engine)
            for queue in queues:
                registry.unregister(queue)
