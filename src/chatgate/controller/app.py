"""The controller process: FastChat's controller endpoints (`routes.py`) over one `Registry`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from chatgate.controller import routes
from chatgate.controller.registry import Clock, Registry
from chatgate.metrics import FleetCollector
from chatgate.ops import health_routes, metrics_routes
from chatgate.settings import ControllerSettings
from chatgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)


async def _expire_loop(registry: Registry, every: float) -> None:
    """Drop workers whose heartbeats stopped, until cancelled."""
    while True:
        await asyncio.sleep(every)
        for address in registry.expire():
            log.info("worker %s expired", address)


def _collector(registry: Registry) -> FleetCollector:
    return FleetCollector(
        workers_per_model=lambda: {model: len(registry.workers(model)) for model in registry.models()},
        worker_load=lambda: [(w.address, w.queue_length, w.queue_length) for w in registry.workers()],
    )


def create_controller_app(settings: ControllerSettings, *, clock: Clock | None = None) -> FastAPI:
    """Build the controller app."""
    registry = Registry(expiration=settings.heartbeat_expiration, **({"clock": clock} if clock else {}))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_expire_loop(registry, min(settings.heartbeat_expiration / 3, 1.0)))
        try:
            yield
        finally:
            await cancel_and_wait(task)

    app = FastAPI(title="chatgate controller", lifespan=lifespan)
    app.state.controller = routes.ControllerState(registry=registry, dispatch_method=settings.dispatch_method)
    metrics = CollectorRegistry()
    metrics.register(_collector(registry))
    app.include_router(health_routes())
    app.include_router(metrics_routes(metrics))
    app.include_router(routes.router)
    return app
