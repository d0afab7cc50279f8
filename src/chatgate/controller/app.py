"""The controller process: FastChat's controller endpoints (`routes.py`) over one `Registry`,
with `Membership` confirming who joins and who leaves, behind the fleet key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from chatgate.controller import routes
from chatgate.controller.membership import Membership
from chatgate.controller.registry import Clock, Registry
from chatgate.fleet import fleet_client, secure
from chatgate.metrics import FleetCollector
from chatgate.ops import health_routes, metrics_routes
from chatgate.settings import ControllerSettings
from chatgate.tracing import SERVICE_CONTROLLER, TraceMiddleware, Tracing
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


def create_controller_app(
    settings: ControllerSettings,
    *,
    clock: Clock | None = None,
    http: httpx.AsyncClient | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the controller app; `http` (for tests) is how it reaches workers to probe them.
    Calls made within a request's trace are spans of it (to `tracer_provider` if given)."""
    tracing = Tracing.of(service=SERVICE_CONTROLLER, endpoint=settings.otlp_endpoint, provider=tracer_provider)
    registry = Registry(
        expiration=settings.heartbeat_expiration,
        max_workers=settings.max_workers,
        **({"clock": clock} if clock else {}),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_expire_loop(registry, min(settings.heartbeat_expiration / 3, 1.0)))
        async with contextlib.AsyncExitStack() as stack:
            client = http if http is not None else await stack.enter_async_context(
                fleet_client(settings, timeout=httpx.Timeout(settings.probe_timeout))
            )
            app.state.membership = Membership(registry=registry, http=client, probe_timeout=settings.probe_timeout)
            try:
                yield
            finally:
                await app.state.membership.close()
                await cancel_and_wait(task)
        await asyncio.to_thread(tracing.close)

    app = FastAPI(title="chatgate controller", lifespan=lifespan)
    # Every live worker heartbeats within the expiration, so by then all have registered again.
    app.state.controller = routes.ControllerState(
        registry=registry,
        dispatch_method=settings.dispatch_method,
        settle_until=time.monotonic() + settings.heartbeat_expiration,
    )
    metrics = CollectorRegistry()
    metrics.register(_collector(registry))
    app.include_router(health_routes())
    app.include_router(metrics_routes(metrics))
    app.include_router(routes.router)
    secure(app, settings)
    app.add_middleware(TraceMiddleware, tracing=tracing, require_parent=True)
    return app
