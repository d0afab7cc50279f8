"""Stored responses of the Responses API through the `openai` SDK and raw HTTP, on the default
SQLite store: `store` (on by default, as OpenAI's), `previous_response_id` continuing a
conversation exactly as sending it whole would, `GET` / `DELETE /v1/responses/{id}` and
`input_items`, streams kept too, every key seeing only its own responses (404 otherwise), the
conversation cap, and the multi-turn flow of the SDK and the Agents SDK on the real model.
(The backends' own contract: test_response_backends.py.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import ResponseInputParam
from fastapi import FastAPI

from chatgate.api.stored.backend import Bounds, MemoryBackend
from chatgate.api.stored.store import ResponseNotFoundError, ResponseStore
from chatgate.errors import InvalidRequestError
from chatgate.engines.fake import FakeEngine
from chatgate.protocol.responses import ResponseObject, ResponsesRequest
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

M = "fake-model"


@pytest.fixture
async def fake_app(fake_engine: FakeEngine, tmp_path: Path) -> AsyncIterator[FastAPI]:
    """The fake engine's app, keeping responses in SQLite as by default (in a test folder)."""
    async with running(make_app(fake_engine, responses_store="auto", responses_path=tmp_path / "r.sqlite3")) as app:
        yield app


@pytest.fixture
async def chat_app(chat_engine: Any, tmp_path: Path) -> AsyncIterator[FastAPI]:
    """The real model's app, keeping responses in SQLite as by default."""
    async with running(make_app(chat_engine, responses_path=tmp_path / "r.sqlite3", responses_store="sqlite")) as app:
        yield app


async def test_create_retrieve_input_items_delete(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    r = await client.responses.create(model=M, input="hello there", temperature=0)
    assert getattr(r, "store") is True  # not in the SDK's type, but on the wire as OpenAI sends it
    got = await client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    items = await client.responses.input_items.list(r.id)
    assert [(i.type, getattr(i, "role", None)) for i in items.data] == [("message", "user")]
    assert items.data[0].id.startswith("msg_")
    await client.responses.delete(r.id)
    for attempt in (client.responses.retrieve(r.id), client.responses.delete(r.id), client.responses.input_items.list(r.id)):
        with pytest.raises(openai.NotFoundError):
            await attempt


async def test_previous_response_id_continues_as_the_whole_conversation_would(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    first = await client.responses.create(model=M, input="My name is Ann.", instructions="Be brief.", temperature=0)
    second = await client.responses.create(model=M, input="What is my name?", previous_response_id=first.id, temperature=0)
    assert second.previous_response_id == first.id
    # Its instructions are not carried over, as with OpenAI; the earlier turns are.
    whole: Any = [
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "What is my name?"},
    ]
    stateless = await client.responses.create(model=M, input=whole, temperature=0, store=False)
    assert second.output_text == stateless.output_text
    assert second.usage is not None and stateless.usage is not None
    assert second.usage.input_tokens == stateless.usage.input_tokens
    third = await client.responses.create(model=M, input="And again?", previous_response_id=second.id, temperature=0)
    assert third.usage is not None and third.usage.input_tokens > second.usage.input_tokens
    # input_items lists a response's own input only.
    assert [i.type for i in (await client.responses.input_items.list(third.id)).data] == ["message"]


async def test_store_false_keeps_nothing(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    r = await client.responses.create(model=M, input="hi", store=False)
    assert getattr(r, "store") is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model=M, input="again", previous_response_id=r.id)
    assert "previous_response_id" in str(caught.value.body)


async def test_a_stream_is_kept_as_it_ended(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    async with client.responses.stream(model=M, input="hello", temperature=0) as stream:
        kept = [getattr(e.response, "store") async for e in stream if hasattr(e, "response")]
        final = await stream.get_final_response()
    assert kept and all(kept)
    assert (await client.responses.retrieve(final.id)).output_text == final.output_text
    follow = await client.responses.create(model=M, input="more", previous_response_id=final.id, stream=True)
    async for event in follow:
        if event.type == "response.completed":
            assert event.response.previous_response_id == final.id


async def test_each_key_sees_only_its_own_responses(tmp_path: Path) -> None:
    async with running(make_app(FakeEngine(), api_keys=["sk-a", "sk-b"], responses_path=tmp_path / "r.sqlite3", responses_store="sqlite")) as app:
        a, b = sdk(app, "sk-a"), sdk(app, "sk-b")
        mine = await a.responses.create(model=M, input="secret")
        for attempt in (b.responses.retrieve(mine.id), b.responses.delete(mine.id), b.responses.input_items.list(mine.id)):
            with pytest.raises(openai.NotFoundError) as caught:
                await attempt
            assert "secret" not in str(caught.value.body)
        with pytest.raises(openai.NotFoundError):
            await b.responses.create(model=M, input="go on", previous_response_id=mine.id)
        assert (await a.responses.retrieve(mine.id)).id == mine.id  # still there for its owner
        async with raw(app) as http:
            assert (await http.get(f"/v1/responses/{mine.id}")).status_code == 401
            assert (await http.delete(f"/v1/responses/{mine.id}")).status_code == 401
            # An id that is not one, however spelled, is the same 404.
            for weird in ("x" * 5000, "..%2F..%2Fetc", "%00", mine.id + "x"):
                r = await http.get(f"/v1/responses/{weird}", headers={"authorization": "Bearer sk-a"})
                assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", r.text
                assert len(r.text) < 1000


@pytest.mark.parametrize(("value", "code"), [("r" * 257, 400), (5, 400), ([], 400), ("resp_nope", 404)])
async def test_bad_previous_response_ids(fake_app: FastAPI, value: object, code: int) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/responses", content=json.dumps({"model": M, "input": "hi", "previous_response_id": value}),
                            headers={"content-type": "application/json"})
    assert r.status_code == code and r.json()["error"]["param"] == "previous_response_id", r.text


def response(index: int, text: str = "ok") -> ResponseObject:
    """A finished response with `text` as its output."""
    output: Any = [{"type": "message", "id": f"msg_{index}", "content": [{"type": "output_text", "text": text}]}]
    return ResponseObject.model_validate({"id": f"resp_{index}", "created_at": 0, "status": "completed", "model": M, "output": output})


def ask(text: str = "hi", **fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": M, "input": text, **fields})


async def test_a_continued_conversation_is_held_to_the_message_cap() -> None:
    store = ResponseStore(MemoryBackend(Bounds(ttl=60, max_count=10, max_bytes=10**8)))
    long_input = [{"role": "user", "content": "x"}] * 2000
    await store.keep(ask(input=long_input), response(1), [], "sk-a")
    whole, earlier = await store.continued(ask(input=[{"role": "user", "content": "y"}] * 40, previous_response_id="resp_1"), "sk-a")
    assert len(earlier) == 2001 and isinstance(whole.input, list) and len(whole.input) == 2041
    with pytest.raises(InvalidRequestError, match="previous_response_id") as caught:
        await store.continued(ask(input=[{"role": "user", "content": "y"}] * 60, previous_response_id="resp_1"), "sk-a")
    with pytest.raises(ResponseNotFoundError):  # another owner
        await store.continued(ask(previous_response_id="resp_1"), "sk-b")
    assert caught.value.status == 400 and caught.value.param == "previous_response_id"


@pytest.mark.model
async def test_multi_turn_on_the_real_model_with_the_sdk_and_the_agents_sdk(chat_app: FastAPI) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    real = "SmolLM2-135M-Instruct"
    client = sdk(chat_app)
    first = await client.responses.create(model=real, input="What is the capital of France?", temperature=0, max_output_tokens=30)
    assert "Paris" in first.output_text
    second = await client.responses.create(model=real, input="What did I just ask you?", previous_response_id=first.id,
                                           temperature=0, max_output_tokens=30)
    whole: Any = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "What did I just ask you?"},
    ]
    stateless = await client.responses.create(model=real, input=whole, temperature=0, max_output_tokens=30, store=False)
    assert second.output_text == stateless.output_text and second.output_text
    assert second.usage is not None and stateless.usage is not None and second.usage.input_tokens == stateless.usage.input_tokens

    set_tracing_disabled(True)  # tracing would export to OpenAI's servers
    model = OpenAIResponsesModel(model=real, openai_client=client)
    settings = ModelSettings(temperature=0, max_tokens=30, store=True, truncation="disabled")
    agent = Agent(name="assistant", instructions="You are a helpful assistant.", model=model, model_settings=settings)
    one = await Runner.run(agent, "What is the capital of France?")
    assert one.last_response_id is not None and "Paris" in one.final_output
    two = await Runner.run(agent, "Repeat your last answer.", previous_response_id=one.last_response_id)
    kept = await client.responses.retrieve(str(two.last_response_id))
    assert kept.previous_response_id == one.last_response_id and kept.output_text == two.final_output


async def test_input_items_page_as_openai_lists_do(fake_app: FastAPI) -> None:
    """20 items a page, newest first unless `order=asc`, `after`/`before` cursors, `has_more`:
    the SDK's auto-pagination walks them all."""
    client = sdk(fake_app)
    turns: ResponseInputParam = [{"role": "user", "content": f"turn {i}"} for i in range(25)]
    r = await client.responses.create(model=M, input=turns, temperature=0)
    first = await client.responses.input_items.list(r.id)
    assert len(first.data) == 20 and first.has_more
    assert [getattr(i, "content")[0].text for i in first.data[:2]] == ["turn 24", "turn 23"]
    walked = [item.id async for item in client.responses.input_items.list(r.id, limit=7)]
    ascending = [item.id async for item in client.responses.input_items.list(r.id, order="asc", limit=100)]
    assert len(walked) == 25 and walked == ascending[::-1] and len(set(walked)) == 25
    page = await client.responses.input_items.list(r.id, order="asc", after=ascending[9], limit=5)
    assert [i.id for i in page.data] == ascending[10:15] and page.has_more
    async with raw(fake_app) as http:
        before = (await http.get(f"/v1/responses/{r.id}/input_items", params={"order": "asc", "before": ascending[9], "limit": 3})).json()
        assert [i["id"] for i in before["data"]] == ascending[6:9] and before["has_more"]
        for query, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                             ({"order": "up"}, "order"), ({"after": "msg_nope"}, "after")):
            bad = await http.get(f"/v1/responses/{r.id}/input_items", params=query)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (query, bad.text)
