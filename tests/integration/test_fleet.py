"""The API server in front of a controller and two workers, all in one process (no ports):
dispatch, failover, readiness and metrics."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.support.app import raw, sdk
from tests.support.fleet import MSG, Dispatch, M, fleet, requests_served, worker_app
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("dispatch", ["shortest_queue", "lottery"])
async def test_traffic_splits_between_two_workers(dispatch: Dispatch) -> None:
    a, b = worker_app(), worker_app()
    async with fleet(dispatch, {"http://w1": a, "http://w2": b}) as f:
        client = sdk(f.api)
        results = await asyncio.gather(*(client.chat.completions.create(model=M, messages=MSG) for _ in range(24)))
        assert all(r.choices[0].finish_reason for r in results)
        assert requests_served(a) + requests_served(b) == 24
        assert requests_served(a) >= 4 and requests_served(b) >= 4, (requests_served(a), requests_served(b))


async def test_dead_worker_fails_over_and_leaves_rotation() -> None:
    alive = worker_app()
    async with fleet("shortest_queue", {"http://dead": worker_app(), "http://alive": alive}, dead=("http://dead",)) as f:
        client = sdk(f.api)
        results = await asyncio.gather(*(client.chat.completions.create(model=M, messages=MSG) for _ in range(8)))
        assert len(results) == 8 and requests_served(alive) == 8
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
