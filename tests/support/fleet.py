"""In-process fleets (no ports): fake-engine workers behind a controller and an API server, where
machines can die; or one worker whose heartbeat the test drives, to see what a fleet learns, and when."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

import httpx
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.controller import ControllerPool
from chatgate.controller.app import create_controller_app
from chatgate.engines.fake import FakeEngine
from chatgate.settings import ApiProcessSettings, ControllerSettings, WorkerSettings
from chatgate.worker.app import create_worker_app
from chatgate.worker.heartbeat import Heartbeat
from tests.support.app import Messages, running

M = "fake-model"
Dispatch = Literal["lottery", "shortest_queue"]
MSG: Messages = [{"role": "user", "content": "hi"}]


class Machine(httpx.AsyncBaseTransport):
    """A worker's machine: passes requests to the worker app until it `dies` (connections
    refused from then on)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = httpx.ASGITransport(app=app)
        self.dead = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.dead:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.app.handle_async_request(request)


class Fleet:
    """An API server and a controller in front of `workers` (address to app), all reached through
    `Machine`s; `dead` machines die after their worker joined, `strangers` are reachable but never register."""

    def __init__(
        self,
        dispatch: Dispatch,
        workers: dict[str, FastAPI],
        dead: tuple[str, ...] = (),
        models: dict[str, str] | None = None,
        strangers: dict[str, FastAPI] | None = None,
    ) -> None:
        self.models = models or {}
        self.strangers = strangers or {}  # reachable, but never registered
        self.machines = {address: Machine(app) for address, app in {**workers, **self.strangers}.items()}
        self.dead = dead
        # The controller reaches the workers (to confirm them) through a client of its own.
        self.to_workers = httpx.AsyncClient(mounts=dict(self.machines))
        self.controller = create_controller_app(
            ControllerSettings(dispatch_method=dispatch), http=self.to_workers
        )
        self.workers = {**workers, **self.strangers}
        self.controller_machine = Machine(self.controller)
        mounts: dict[str, httpx.AsyncBaseTransport] = {"http://controller": self.controller_machine}
        mounts.update(self.machines)
        self.http = httpx.AsyncClient(mounts=mounts)
        self.pool = ControllerPool(http=self.http, controller="http://controller", refresh=0.2)

        @contextlib.asynccontextmanager
        async def pool() -> AsyncIterator[WorkerPool]:
            task = asyncio.create_task(self.pool.run())
            try:
                yield self.pool
            finally:
                task.cancel()

        self.api = create_api_app(ApiProcessSettings(), pool)

    async def register(self) -> None:
        for address in set(self.workers) - set(self.strangers):
            names = [self.models.get(address, M)]
            body = {"worker_name": address, "worker_status": {"model_names": names, "speed": 1, "queue_length": 0}}
            assert (await self.http.post("http://controller/register_worker", json=body)).status_code == 200
        for address in self.dead:  # machines that die after their worker joined
            self.machines[address].dead = True
        await self.pool.refresh()


def worker_app(delay: float = 0.01, model: str = M) -> FastAPI:
    """A worker app serving the fake engine as `model`, `delay` seconds a token."""
    settings = WorkerSettings(no_register=True, engine="fake", model_names=[model])
    return create_worker_app(settings, engine=FakeEngine(name=model, token_delay=delay))


@contextlib.asynccontextmanager
async def fleet(
    dispatch: Dispatch,
    workers: dict[str, FastAPI],
    dead: tuple[str, ...] = (),
    models: dict[str, str] | None = None,
    strangers: dict[str, FastAPI] | None = None,
) -> AsyncIterator[Fleet]:
    """A started `Fleet` whose workers have registered, stopped after the block."""
    f = Fleet(dispatch, workers, dead, models, strangers)
    async with contextlib.AsyncExitStack() as stack:
        # The clients close last: the controller may still be probing a worker reported down.
        stack.push_async_callback(f.to_workers.aclose)
        stack.push_async_callback(f.http.aclose)
        await stack.enter_async_context(running(f.controller))
        for app in f.workers.values():
            await stack.enter_async_context(running(app))
        await f.register()
        await stack.enter_async_context(running(f.api))
        yield f


def requests_served(app: FastAPI) -> int:
    """Requests the worker `app` has served, over all its models."""
    return sum(b.served for b in app.state.models.backends())


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
