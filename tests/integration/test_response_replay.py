"""Replaying a stored response's events (`GET /v1/responses/{id}?stream=true&starting_after=N`),
on the default SQLite store, with the `openai` SDK and raw HTTP: a streamed response replays as
the very events its client got (so a client that lost its stream resumes after the last number
it saw), a response made whole replays the same events every time, and bad `starting_after`
values, other keys and unknown ids get OpenAI-shaped errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from chatgate.api.stored.backend import Bounds, MemoryBackend
from chatgate.api.stored.store import ResponseStore
from chatgate.engines.fake import FakeEngine
from chatgate.protocol.responses import ResponseObject, ResponsesRequest
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

M = "fake-model"
KEYS = {"authorization": "Bearer sk-a"}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    engine = FakeEngine(name=M)
    settings: dict[str, Any] = {"api_keys": ["sk-a", "sk-b"], "responses_store": "sqlite", "responses_path": tmp_path / "r.sqlite3"}
    async with running(make_app(engine, **settings)) as made:
        yield made


def events_of(text: str) -> list[dict[str, Any]]:
    """The named SSE events of a response body, checked to be named as their `type`."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        out.append(payload)
    return out


async def test_a_streamed_response_replays_as_it_was_sent(app: FastAPI) -> None:
    async with raw(app) as http:
        body = {"model": M, "input": "tell me a story", "stream": True, "temperature": 0}
        sent = events_of((await http.post("/v1/responses", json=body, headers=KEYS)).text)
        response_id = sent[-1]["response"]["id"]
        assert len([e for e in sent if e["type"] == "response.output_text.delta"]) > 3  # deltas as they came
        whole = await http.get(f"/v1/responses/{response_id}", params={"stream": "true"}, headers=KEYS)
        assert whole.headers["content-type"].startswith("text/event-stream")
        assert events_of(whole.text) == sent
        for after in (0, 5, len(sent) - 2):
            rest = await http.get(f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": after}, headers=KEYS)
            assert events_of(rest.text) == sent[after + 1 :]
    # The SDK's retrieve(stream=True) parses them, ending with the stored response.
    client = sdk(app, "sk-a")
    replayed = [event async for event in await client.responses.retrieve(response_id, stream=True, starting_after=2)]
    assert [e.sequence_number for e in replayed] == list(range(3, len(sent)))
    final = replayed[-1]
    assert final.type == "response.completed" and final.response.output_text == (await client.responses.retrieve(response_id)).output_text


async def test_a_response_made_whole_replays_the_same_events_every_time(app: FastAPI) -> None:
    client = sdk(app, "sk-a")
    made = await client.responses.create(model=M, input="hello", temperature=0)
    first = [e.model_dump() async for e in await client.responses.retrieve(made.id, stream=True)]
    again = [e.model_dump() async for e in await client.responses.retrieve(made.id, stream=True)]
    assert first == again and [e["sequence_number"] for e in first] == list(range(len(first)))
    kinds = [e["type"] for e in first]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    text = "".join(e["delta"] for e in first if e["type"] == "response.output_text.delta")
    assert text == made.output_text and first[-1]["response"]["id"] == made.id
    later = [e.model_dump() async for e in await client.responses.retrieve(made.id, stream=True, starting_after=3)]
    assert later == first[4:]


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", str(10**12), "99999999999999999999999999"])
async def test_bad_starting_after_is_a_400_naming_it(app: FastAPI, after: str) -> None:
    client = sdk(app, "sk-a")
    made = await client.responses.create(model=M, input="hello")
    async with raw(app) as http:
        r = await http.get(f"/v1/responses/{made.id}", params={"stream": "true", "starting_after": after}, headers=KEYS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after", r.text


async def test_starting_after_past_the_last_event_is_a_400(app: FastAPI) -> None:
    client = sdk(app, "sk-a")
    made = await client.responses.create(model=M, input="hello")
    count = len([e async for e in await client.responses.retrieve(made.id, stream=True)])
    last = [e async for e in await client.responses.retrieve(made.id, stream=True, starting_after=count - 2)]
    assert len(last) == 1
    assert [e async for e in await client.responses.retrieve(made.id, stream=True, starting_after=count - 1)] == []
    for after in (count, 10**6):
        with pytest.raises(openai.BadRequestError) as caught:
            [e async for e in await client.responses.retrieve(made.id, stream=True, starting_after=after)]
        assert caught.value.param == "starting_after"


async def test_another_key_or_no_key_cannot_replay(app: FastAPI) -> None:
    made = await sdk(app, "sk-a").responses.create(model=M, input="secret")
    with pytest.raises(openai.NotFoundError):
        await sdk(app, "sk-b").responses.retrieve(made.id, stream=True)
    async with raw(app) as http:
        assert (await http.get(f"/v1/responses/{made.id}", params={"stream": "true"})).status_code == 401
        for weird in ("x" * 60_000, "resp_" + "9" * 300, "%00"):
            r = await http.get(f"/v1/responses/{weird}", params={"stream": "true", "starting_after": "0"}, headers=KEYS)
            assert r.status_code == 404 and len(r.text) < 1000, r.text


async def test_a_function_call_made_whole_replays_as_the_sdk_parses_it() -> None:
    store = ResponseStore(MemoryBackend(Bounds(ttl=60, max_count=10, max_bytes=10**6)))
    output: Any = [{"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                   {"type": "message", "id": "msg_1", "content": [{"type": "output_text", "text": "Checking."}]}]
    response = ResponseObject.model_validate({"id": "resp_1", "created_at": 0, "status": "completed", "model": M, "output": output})
    await store.keep(ResponsesRequest(model=M, input="Weather in Paris?"), response, [], "k")
    events = [e async for e in await store.replay("resp_1", "k", None)]
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e.model_dump()) for e in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    kinds = [e.type for e in parsed]
    assert kinds[kinds.index("response.function_call_arguments.delta") - 1] == "response.output_item.added"
    done = next(e for e in parsed if e.type == "response.function_call_arguments.done")
    assert getattr(done, "arguments") == '{"city":"Paris"}'
    assert kinds[-1] == "response.completed" and "".join(getattr(e, "delta", "") for e in parsed if e.type == "response.output_text.delta") == "Checking."
    assert [e.model_dump() async for e in await store.replay("resp_1", "k", 4)] == [e.model_dump() for e in events[5:]]
