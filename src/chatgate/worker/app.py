"""The model worker process: FastChat's worker endpoints (`routes.py`) over one `WorkerBackend`."""

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
from chatgate.settings import WorkerSettings
from chatgate.tasks import cancel_and_wait
from chatgate.tracing import SERVICE_WORKER, TraceMiddleware, Tracing
from chatgate.worker import routes
from chatgate.worker.heartbeat import Heartbeat
from chatgate.worker.backend import WorkerBackend, open_backend


def _collector(service: WorkerBackend, address: str) -> FleetCollector:
    return FleetCollector(
        workers_per_model=lambda: {name: 1 for name in service.model_names},
        worker_load=lambda: [(address, *service.load())],
        served=lambda: {name: service.served for name in service.model_names[:1]},  # none while unloaded
    )


def _engine_stats(service: WorkerBackend) -> list[tuple[str, EngineStats]]:
    stats = service.engine_stats()
    return [(service.model_names[0], stats)] if stats is not None and service.model_names else []


def create_worker_app(
    settings: WorkerSettings, *, engine: Engine | None = None, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """Build the worker app; the backend is opened from settings unless an engine is given.
    Spans go to `tracer_provider` if given (its owner shuts it down), else where the settings say."""
    registry = CollectorRegistry()
    tracing = Tracing.of(service=SERVICE_WORKER, endpoint=settings.otlp_endpoint, provider=tracer_provider)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_backend(settings, engine=engine) as service:
            async with _serving(app, settings, registry, service):
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
    app: FastAPI, settings: WorkerSettings, registry: CollectorRegistry, service: WorkerBackend
) -> AsyncIterator[None]:
    """Expose the backend to the routes, meter it, and keep it registered with the controller
    until it shuts down (draining stops the heartbeat and deregisters first)."""
    app.state.service = service
    collector = _collector(service, settings.address())
    engine = EngineCollector(lambda: _engine_stats(service))
    registry.register(collector)
    registry.register(engine)
    registry.register(service.queue)
    async with fleet_client(settings, timeout=httpx.Timeout(10.0)) as http:
        task = None
        leaving: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if not settings.no_register:
            beat = Heartbeat(
                http=http,
                controller=settings.controller_address,
                address=settings.address(),
                service=service,
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
            registry.unregister(service.queue)
