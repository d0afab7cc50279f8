"""Loading and unloading at a worker of a fleet: the worker's own admin routes, and the
controller and the API server learning the change from the worker's next heartbeat."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.controller import ControllerPool
from chatgate.controller.app import create_controller_app
from chatgate.engines.fake import FakeEngine
from chatgate.settings import ApiProcessSettings, ControllerSettings, WorkerSettings
from chatgate.worker.app import create_worker_app
from chatgate.worker.heartbeat import Heartbeat
from tests.support.app import raw, running, sdk

pytestmark = pytest.mark.anyio

WORKER = "http://worker-1:21002"


async def test_a_worker_unloads_and_loads_and_the_fleet_learns_it_within_a_heartbeat() -> None:
    worker = create_worker_app(WorkerSettings(no_register=True, engine="fake"), engine=FakeEngine())
    async with running(worker):
        to_worker = httpx.AsyncClient(mounts={WORKER: httpx.ASGITransport(app=worker)})
        controller = create_controller_app(ControllerSettings(), http=to_worker)
        http = httpx.AsyncClient(mounts={"http://controller": httpx.ASGITransport(app=controller), WORKER: httpx.ASGITransport(app=worker)})
        pool = ControllerPool(http=http, controller="http://controller", refresh=60)

        @contextlib.asynccontextmanager
        async def pools() -> AsyncIterator[WorkerPool]:
            yield pool

        api = create_api_app(ApiProcessSettings(), pools)
        async with running(controller), running(api):
            beat = Heartbeat(http=http, controller="http://controller", address=WORKER, models=worker.state.models, interval=1)
            await beat.register()
            await pool.refresh()
            assert [m.id async for m in sdk(api).models.list()] == ["fake-model"]

            # The API server's own route says where to go; the worker's does it.
            refused = await _post(api, "/v1/models/unload", {"model": "fake-model"})
            assert refused.status_code == 400 and "worker" in refused.json()["error"]["message"]
            unloaded = await _post(worker, "/v1/models/unload", {"model": "fake-model"})
            assert unloaded.status_code == 200, unloaded.text
            assert (await _post(worker, "/v1/models/unload", {"model": "nobody"})).status_code == 404

            await beat.beat()  # the next heartbeat
            await pool.refresh()  # the API server's next worker-table refresh
            assert [m.id async for m in sdk(api).models.list()] == []
            models = (await http.post("http://controller/list_models")).json()["models"]
            assert models == []

            assert (await _post(worker, "/v1/models/load", {"model": "fake-model"})).status_code == 200
            await beat.beat()
            await pool.refresh()
            assert [m.id async for m in sdk(api).models.list()] == ["fake-model"]
            answer = await sdk(api).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], temperature=0)
            assert "Echo" in (answer.choices[0].message.content or "")
        await http.aclose()
        await to_worker.aclose()


async def _post(app: FastAPI, path: str, body: object) -> httpx.Response:
    async with raw(app) as client:
        return await client.post(path, json=body)
