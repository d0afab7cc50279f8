"""One worker app behind an in-process controller and API server (no ports), with the test
driving the worker's heartbeat: what a fleet learns from a worker, and when."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.controller import ControllerPool
from chatgate.controller.app import create_controller_app
from chatgate.settings import ApiProcessSettings, ControllerSettings
from chatgate.worker.heartbeat import Heartbeat
from tests.conftest import running

WORKER = "http://worker-1:21002"


@contextlib.asynccontextmanager
async def fleet_of(worker: FastAPI) -> AsyncIterator[tuple[FastAPI, Heartbeat, ControllerPool]]:
    """A controller and an API server in front of `worker` (started here), which has registered
    once; the API server's table is refreshed only when the test says so."""
    async with running(worker), contextlib.AsyncExitStack() as stack:
        to_worker = httpx.AsyncClient(mounts={WORKER: httpx.ASGITransport(app=worker)})
        controller = create_controller_app(ControllerSettings(), http=to_worker)
        mounts: dict[str, httpx.AsyncBaseTransport] = {
            "http://controller": httpx.ASGITransport(app=controller), WORKER: httpx.ASGITransport(app=worker),
        }
        http = httpx.AsyncClient(mounts=mounts, timeout=300)
        stack.push_async_callback(to_worker.aclose)
        stack.push_async_callback(http.aclose)
        pool = ControllerPool(http=http, controller="http://controller", refresh=60)

        @contextlib.asynccontextmanager
        async def pools() -> AsyncIterator[WorkerPool]:
            yield pool

        api = create_api_app(ApiProcessSettings(), pools)
        await stack.enter_async_context(running(controller))
        await stack.enter_async_context(running(api))
        beat = Heartbeat(http=http, controller="http://controller", address=WORKER, models=worker.state.models, interval=1)
        await beat.register()
        await pool.refresh()
        yield api, beat, pool
