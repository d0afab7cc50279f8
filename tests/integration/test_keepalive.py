"""Keep-alive frames on the worker stream: sent only when asked for, never seen by a client, and
what lets an API server take a few seconds of silence for a frozen worker (live test:
tests/live/test_keepalive.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from chatgate.api.workers.http import Bounds, HttpWorker, WorkerFacts
from chatgate.engines.fake import FakeEngine
from chatgate.errors import WorkerUnavailableError
from chatgate.protocol.worker import EXT_KEEPALIVE, KEEPALIVE_FRAME, GenerateParams, WorkerChunk
from chatgate.settings import WorkerSettings
from chatgate.worker.app import create_worker_app
from tests.support.app import running

pytestmark = pytest.mark.anyio

M = "fake-model"
PARAMS = GenerateParams(model=M, prompt="hi", max_new_tokens=4, temperature=0)


async def worker_stream(body: dict[str, object]) -> list[bytes]:
    """The frames of a real worker app's stream (a fake engine with a 0.5 s prefill)."""
    app = create_worker_app(WorkerSettings(no_register=True), engine=FakeEngine(name=M, prefill_delay=0.5))
    async with running(app), httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w") as http:
        details = (await http.post("/model_details")).json()
        assert EXT_KEEPALIVE in details["chatgate_extensions"]
        response = await http.post("/worker_generate_stream", json=body)
    assert response.status_code == 200
    return [frame for frame in response.content.split(b"\0") if frame]


async def test_a_worker_sends_keepalive_frames_only_when_asked() -> None:
    plain = await worker_stream(PARAMS.model_dump(exclude_none=True))  # as FastChat's API server asks
    assert KEEPALIVE_FRAME not in plain and plain
    beating = await worker_stream({**PARAMS.model_dump(exclude_none=True), "keepalive": 0.1})
    beats = beating.index(next(f for f in beating if f != KEEPALIVE_FRAME))
    assert beats >= 3 and KEEPALIVE_FRAME not in beating[beats:]  # while prefilling, then none between quick tokens
    assert [json.loads(f)["text"] for f in beating[beats:]] == [json.loads(f)["text"] for f in plain]


def chunk(text: str, finish: str | None = None) -> bytes:
    return json.dumps({"text": text, "finish_reason": finish}).encode() + b"\0"


def scripted_worker(extensions: list[str], body: AsyncIterator[bytes], sent: list[dict[str, object]]) -> httpx.MockTransport:
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/model_details":
            return httpx.Response(200, json={"context_length": 1024, "chatgate_extensions": extensions})
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=body)

    return httpx.MockTransport(handle)


async def beats_then(count: int, *tail: bytes) -> AsyncIterator[bytes]:
    for _ in range(count):
        await asyncio.sleep(0.1)
        yield KEEPALIVE_FRAME + b"\0"
    for data in tail:
        yield data
    if not tail:
        await asyncio.Event().wait()  # frozen


async def generate(transport: httpx.MockTransport, bounds: Bounds) -> list[WorkerChunk]:
    async with httpx.AsyncClient(transport=transport) as http:
        worker = HttpWorker(http=http, address="http://w", model=M, facts=WorkerFacts(), bounds=bounds)
        return [c async for c in worker.generate_stream(PARAMS)]


async def test_keepalives_hold_a_long_prefill_and_never_reach_the_caller() -> None:
    sent: list[dict[str, object]] = []
    bounds = Bounds(silence=0.3, keepalive=0.1)
    # 1.5 s of keep-alives (five times the silence bound), then the answer.
    transport = scripted_worker(["chat_template", "delta", EXT_KEEPALIVE], beats_then(15, chunk("ok", "stop")), sent)
    chunks = await generate(transport, bounds)
    assert [(c.text, c.finish_reason) for c in chunks] == [("ok", "stop")]
    assert sent[0]["keepalive"] == 0.1


async def test_silence_after_keepalives_is_a_frozen_worker_within_the_silence_bound() -> None:
    transport = scripted_worker(["chat_template", "delta", EXT_KEEPALIVE], beats_then(3), [])
    loop = asyncio.get_running_loop()
    begin = loop.time()
    with pytest.raises(WorkerUnavailableError):  # retried elsewhere: nothing was generated
        await generate(transport, Bounds(silence=0.3, keepalive=0.1))
    assert loop.time() - begin < 0.3 + 0.3 + 0.5


async def test_a_worker_without_the_extension_is_not_asked_and_keeps_the_long_bounds() -> None:
    sent: list[dict[str, object]] = []
    # Silent for 0.6 s, beyond the silence bound, within the first-frame bound it still gets.
    async def slow() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.6)
        yield chunk("ok", "stop")

    transport = scripted_worker(["chat_template", "delta"], slow(), sent)
    chunks = await generate(transport, Bounds(silence=0.3, keepalive=0.1, first_frame=5))
    assert [c.text for c in chunks] == ["ok"] and "keepalive" not in sent[0]
