"""The controller process: FastChat's controller endpoints over one `Registry`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from chatgate.controller.dispatch import METHODS
from chatgate.controller.registry import Clock, Registry
from chatgate.metrics import FleetCollector, mount
from chatgate.protocol.worker import (
    HeartBeat,
    RegisterWorker,
    WorkerDown,
    WorkerStatus,
    WorkerTable,
)
from chatgate.settings import ControllerSettings

log = logging.getLogger(__name__)


def create_controller_app(settings: ControllerSettings, *, clock: Clock | None = None) -> FastAPI:
    """Build the controller app."""
    registry = Registry(expiration=settings.heartbeat_expiration, **({"clock": clock} if clock else {}))
    dispatch = METHODS[settings.dispatch_method]

    async def expire_loop() -> None:
        while True:
            await asyncio.sleep(min(settings.heartbeat_expiration / 3, 1.0))
            for address in registry.expire():
                log.info("worker %s expired", address)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(expire_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="chatgate controller", lifespan=lifespan)
    app.state.registry = registry

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    def workers_per_model() -> dict[str, int]:
        return {model: len(registry.workers(model)) for model in registry.models()}

    metrics = CollectorRegistry()
    metrics.register(
        FleetCollector(
            workers_per_model=workers_per_model,
            worker_load=lambda: [(w.address, w.queue_length, w.queue_length) for w in registry.workers()],
        )
    )
    mount(app, metrics)

    @app.post("/register_worker")
    async def register_worker(body: RegisterWorker) -> dict[str, bool]:
        status = body.worker_status or WorkerStatus(model_names=[])
        registry.register(body.worker_name, status, check_heart_beat=body.check_heart_beat)
        log.info("registered worker %s for %s", body.worker_name, status.model_names)
        return {"ok": True}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(body: HeartBeat) -> dict[str, bool]:
        return {"exist": registry.heartbeat(body.worker_name, body.queue_length)}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> dict[str, bool]:
        registry.expire()
        return {"ok": True}

    @app.post("/list_models")
    async def list_models() -> dict[str, list[str]]:
        return {"models": registry.models()}

    @app.post("/list_language_models")
    async def list_language_models() -> dict[str, list[str]]:
        return {"models": registry.models()}

    @app.post("/list_workers")
    async def list_workers() -> WorkerTable:
        return WorkerTable(
            workers=[w.entry() for w in registry.workers()],
            dispatch_method=settings.dispatch_method,
        )

    @app.post("/report_worker_down")
    async def report_worker_down(body: WorkerDown) -> dict[str, bool]:
        # If the worker is in fact alive, its next heartbeat is refused and it registers again.
        registry.remove(body.worker_name)
        log.info("worker %s reported down", body.worker_name)
        return {"ok": True}

    @app.post("/get_worker_address")
    async def get_worker_address(body: dict[str, str]) -> dict[str, str]:
        workers = registry.workers(body.get("model"))
        return {"address": dispatch(workers).address if workers else ""}

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, object]:
        workers = registry.workers()
        return {
            "model_names": registry.models(),
            "speed": sum(w.speed for w in workers),
            "queue_length": sum(w.queue_length for w in workers),
        }

    return app
