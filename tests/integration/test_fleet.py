"""The API server in front of a controller and two workers, all in one process (no ports):
dispatch, failover, readiness and metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

import httpx
import openai
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.controller import ControllerPool
from chatgate.controller.app import create_controller_app
from chatgate.engines.fake import FakeEngine
from chatgate.settings import ApiProcessSettings, ControllerSettings, WorkerSettings
from chatgate.worker.app import create_worker_app
from tests.conftest import Messages, raw, running, sdk
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

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


def served(app: FastAPI) -> int:
    return sum(b.served for b in app.state.models.backends())


@pytest.mark.parametrize("dispatch", ["shortest_queue", "lottery"])
async def test_traffic_splits_between_two_workers(dispatch: Dispatch) -> None:
    a, b = worker_app(), worker_app()
    async with fleet(dispatch, {"http://w1": a, "http://w2": b}) as f:
        client = sdk(f.api)
        results = await asyncio.gather(*(client.chat.completions.create(model=M, messages=MSG) for _ in range(24)))
        assert all(r.choices[0].finish_reason for r in results)
        assert served(a) + served(b) == 24
        assert served(a) >= 4 and served(b) >= 4, (served(a), served(b))


async def test_dead_worker_fails_over_and_leaves_rotation() -> None:
    alive = worker_app()
    async with fleet("shortest_queue", {"http://dead": worker_app(), "http://alive": alive}, dead=("http://dead",)) as f:
        client = sdk(f.api)
        results = await asyncio.gather(*(client.chat.completions.create(model=M, messages=MSG) for _ in range(8)))
        assert len(results) == 8 and served(alive) == 8
        assert [address for address, *_ in f.pool.load()] == ["http://alive"]

        async def controller_dropped_the_dead() -> bool:  # the report is sent in the background
            workers = (await f.http.post("http://controller/list_workers")).json()["workers"]
            return [w["address"] for w in workers] == ["http://alive"]

        await apoll(controller_dropped_the_dead, what="the controller drops the dead worker", timeout=1)
        emb = await client.embeddings.create(model=M, input="x")
        assert len(emb.data) == 1


async def test_no_healthy_worker_is_503_with_retry_after() -> None:
    dead = ("http://dead1", "http://dead2")
    async with fleet("shortest_queue", {a: worker_app() for a in dead}, dead=dead) as f:
        with pytest.raises(openai.InternalServerError) as err:
            await sdk(f.api).chat.completions.create(model=M, messages=MSG)
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"]
        async with raw(f.api) as http:
            ready = await http.get("/ready")
        assert ready.status_code == 503 and ready.json()["workers"] == {M: 0}


async def test_ready_and_metrics() -> None:
    async with fleet("shortest_queue", {"http://w1": worker_app(), "http://w2": worker_app()}) as f:
        client = sdk(f.api)
        stream = await client.chat.completions.create(model=M, messages=MSG, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.completions.create(model=M, prompt="hello", max_tokens=5)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="x")
        async with raw(f.api) as http:
            ready = await http.get("/ready")
            text = (await http.get("/metrics")).text
        assert ready.status_code == 200 and ready.json()["workers"] == {M: 2}
        assert 'chatgate_requests_total{model="fake-model",route="/v1/chat/completions",status="200"} 1.0' in text
        assert 'chatgate_requests_total{model="",route="/v1/completions",status="404"} 1.0' in text
        assert 'chatgate_workers{model="fake-model"} 2.0' in text
        assert 'chatgate_time_to_first_token_seconds_count{model="fake-model"} 2.0' in text
        assert 'chatgate_completion_tokens_total{model="fake-model"}' in text
        assert "chatgate_inter_token_latency_seconds_bucket" in text
        assert "chatgate_worker_queue_length" in text
        w1 = f.workers["http://w1"]
        assert w1 is not None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=w1), base_url="http://w") as w:
            worker_text = (await w.get("/metrics")).text
        assert 'chatgate_worker_requests_total{model="fake-model"}' in worker_text
