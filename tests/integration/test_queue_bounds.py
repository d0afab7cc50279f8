"""A worker's queue bounds, on any engine: `--max-waiting` (429 beyond) and `--max-queue-wait` (503
with Retry-After for a request that could not start in time), and their metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from chatgate.api.workers.http import Bounds, HttpWorker, WorkerFacts
from chatgate.engines.fake import FakeEngine
from chatgate.errors import QueueTimeoutError
from chatgate.protocol.worker import GenerateParams
from chatgate.settings import WorkerSettings
from chatgate.worker.app import create_worker_app
from tests.support.app import make_app, raw, running, sdk
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

ASK: Any = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def test_a_request_that_cannot_start_in_time_is_a_503_and_is_counted() -> None:
    engine = FakeEngine(prefill_delay=2.0)  # no first token for 2 s
    async with running(make_app(engine, max_queue_wait=0.3)) as app:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk(app).chat.completions.create(**ASK)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"]
        assert caught.value.body["code"] == "queue_timeout"  # type: ignore[index]
        await apoll(lambda: engine.active == 0, what="the generation cancelled", timeout=5)
        async with raw(app) as http:
            scraped = (await http.get("/metrics")).text
    assert 'chatgate_queue_rejections_total{model="fake-model",reason="max_queue_wait"} 1.0' in scraped
    assert 'chatgate_queue_wait_seconds_count{model="fake-model"} 1.0' in scraped


async def test_a_request_that_starts_in_time_is_untouched_and_its_wait_observed() -> None:
    async with running(make_app(FakeEngine(prefill_delay=0.05), max_queue_wait=5)) as app:
        reply = await sdk(app).chat.completions.create(**ASK)
        assert reply.choices[0].finish_reason == "length"
        async with raw(app) as http:
            scraped = (await http.get("/metrics")).text
    assert 'chatgate_queue_wait_seconds_bucket{le="0.025",model="fake-model"} 0.0' in scraped
    assert 'chatgate_queue_wait_seconds_bucket{le="0.1",model="fake-model"} 1.0' in scraped


async def test_the_waiting_queue_is_bounded_with_a_429() -> None:
    engine = FakeEngine(prefill_delay=1.0)
    async with running(make_app(engine, max_waiting=2)) as app:
        client = sdk(app)
        held = [asyncio.create_task(client.chat.completions.create(**ASK)) for _ in range(2)]
        await apoll(lambda: engine.active == 2, what="two requests waiting", timeout=5)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**ASK)
        assert "waiting queue is full" in caught.value.message
        for reply in await asyncio.gather(*held):  # the two held ones are served
            assert reply.choices[0].finish_reason == "length"
        async with raw(app) as http:
            scraped = (await http.get("/metrics")).text
    assert 'chatgate_queue_rejections_total{model="fake-model",reason="max_waiting"} 1.0' in scraped


@pytest.mark.parametrize(("field", "value"), [("max_queue_wait", 0), ("max_queue_wait", float("nan")), ("max_waiting", 0)])
def test_bad_bounds_are_refused_at_start(field: str, value: float) -> None:
    with pytest.raises(ValueError):
        make_app(FakeEngine(), **{field: value})


async def test_over_the_worker_protocol_a_queue_timeout_stays_a_queue_timeout() -> None:
    """A worker in its own process says which error it was; the API server raises the same."""
    app = create_worker_app(WorkerSettings(no_register=True, max_queue_wait=0.2), engine=FakeEngine(prefill_delay=2.0))
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w") as http:
        worker = HttpWorker(http=http, address="http://w", model="fake-model", facts=WorkerFacts(), bounds=Bounds())
        params = GenerateParams(model="fake-model", prompt="hi", max_new_tokens=4, temperature=0)
        with pytest.raises(QueueTimeoutError):
            async for _ in worker.generate_stream(params):
                pass


@pytest.mark.model
async def test_serve_shows_its_engines_kv_and_running_sequences(chat_app: Any) -> None:
    """What an autoscaler reads from `chatgate serve` (one process): the engine's own gauges."""
    await sdk(chat_app).chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK["messages"], max_tokens=2)
    async with raw(chat_app) as http:
        scraped = (await http.get("/metrics")).text
    for name in ("chatgate_kv_cache_used_tokens", "chatgate_engine_running_sequences", "chatgate_worker_waiting_requests",
                 "chatgate_queue_wait_seconds_count"):
        assert f"{name}{{" in scraped, name
