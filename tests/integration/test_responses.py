"""`/v1/responses`: the SDK's `responses.create` and `responses.stream`, raw named
SSE events with rising sequence numbers, tools round trip, and the 400s for bad fields (stored
responses: `test_stored_responses.py`)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from openai.types.responses import Response, ResponseOutputMessage, ResponseOutputText

from chatgate.engines.fake import FakeEngine
from tests.support.app import function_tool, make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

M = "fake-model"
WEATHER: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]


async def test_create_with_string_input(fake_app: FastAPI) -> None:
    r = await sdk(fake_app).responses.create(model=M, input="hello there", temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.output_text == FakeEngine.reply_for("<user> hello there\n<assistant>")
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert r.usage is not None and r.usage.output_tokens > 0
    assert r.usage.input_tokens == len("<user> hello there\n<assistant>".encode())
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


async def test_instructions_and_message_items_render_as_chat(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    items: Any = [
        {"role": "user", "content": "first"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"role": "developer", "content": [{"type": "input_text", "text": "second"}]},
    ]
    r = await client.responses.create(model=M, input=items, instructions="Be brief.", temperature=0)
    chat = await client.chat.completions.create(
        model=M, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                  {"role": "assistant", "content": "ok"}, {"role": "developer", "content": "second"}],
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]


async def test_max_output_tokens_makes_it_incomplete(fake_app: FastAPI) -> None:
    r = await sdk(fake_app).responses.create(model=M, input="hello", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 3  # type: ignore[union-attr]


async def test_stream_events_in_order_through_the_sdk(fake_app: FastAPI) -> None:
    async with sdk(fake_app).responses.stream(model=M, input="hello there", temperature=0) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(d.delta for d in deltas) == final.output_text
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    assert final.output_text == FakeEngine.reply_for("<user> hello there\n<assistant>") and final.status == "completed"


async def test_raw_stream_is_named_events_and_incomplete_at_the_limit(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/responses", json={"model": M, "input": "hi", "stream": True, "max_output_tokens": 2})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    parsed = []
    for block in blocks:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: ")
        parsed.append(payload)
    assert "[DONE]" not in r.text
    last = parsed[-1]
    assert last["type"] == "response.incomplete" and last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [p["sequence_number"] for p in parsed] == list(range(len(parsed)))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "r" * 257}, "previous_response_id"),
        ({"previous_response_id": ""}, "previous_response_id"),
        ({"background": True, "store": False}, "background"),  # background needs store
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**9}, "input"),  # context_length_exceeded, as chat names `messages`
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}, "text.format.schema"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(fake_app: FastAPI, fields: dict[str, Any], param: str) -> None:
    body = {"model": M, "input": "hi", **fields}
    async with raw(fake_app) as http:
        r = await http.post("/v1/responses", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if body.get("temperature") == body.get("temperature"):  # the SDK cannot send NaN
        with pytest.raises(openai.BadRequestError):
            await sdk(fake_app).responses.create(**body)


async def test_unknown_model_and_missing_key() -> None:
    async with running(make_app(FakeEngine(), api_keys=["sk-good"])) as app:
        with pytest.raises(openai.AuthenticationError):
            await sdk(app, api_key="sk-bad").responses.create(model=M, input="hi")
        with pytest.raises(openai.NotFoundError):
            await sdk(app, api_key="sk-good").responses.create(model="nope", input="hi")


async def test_function_call_items_come_back_as_chat_tool_turns(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    items: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    r = await client.responses.create(model=M, input=items, tools=TOOLS, temperature=0)
    chat = await client.chat.completions.create(
        model=M, temperature=0, tools=[function_tool("get_weather", "Weather in a city", WEATHER)],
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
    )
    assert r.output_text == chat.choices[0].message.content and r.status == "completed"
    assert r.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
    assert r.tools[0].name == "get_weather"  # type: ignore[union-attr]


@pytest.mark.model
async def test_real_model_calls_a_function_and_answers_its_result(chat_app: FastAPI) -> None:
    model = "SmolLM2-135M-Instruct"
    client = sdk(chat_app)
    ask = "What is the weather in Paris?"
    r = await client.responses.create(model=model, input=ask, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_output_tokens=100, temperature=0)
    call = r.output[0]
    assert r.status == "completed" and call.type == "function_call" and call.name == "get_weather", r
    assert set(json.loads(call.arguments)) == {"city"} and call.call_id.startswith("call_")
    async with client.responses.stream(model=model, input=ask, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_output_tokens=100, temperature=0) as stream:
        kinds = [e.type async for e in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds and final.output[0].type == "function_call"
    assert final.output[0].arguments == call.arguments
    back: Any = [{"role": "user", "content": ask}, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky":"sunny","celsius":21}'}]
    answer = await client.responses.create(model=model, input=back, tools=TOOLS, max_output_tokens=40, temperature=0)
    assert answer.output[0].type == "message" and answer.output_text
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}}, "required": ["city", "sunny"], "additionalProperties": False}
    r = await client.responses.create(model=model, input=ask, max_output_tokens=60, temperature=0,
                                      text={"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}})
    assert set(json.loads(r.output_text)) == {"city", "sunny"}


def text_part(r: Response) -> ResponseOutputText:
    """The text part of a response's message."""
    message = r.output[0]
    assert isinstance(message, ResponseOutputMessage) and isinstance(message.content[0], ResponseOutputText), r
    return message.content[0]


async def test_output_text_logprobs_through_include(fake_app: FastAPI) -> None:
    """`include: ["message.output_text.logprobs"]` with `top_logprobs`: chat's numbers, in the
    Responses shape, on the message and on each streamed delta."""
    client = sdk(fake_app)
    r = await client.responses.create(model=M, input="hello there", temperature=0, top_logprobs=2, include=["message.output_text.logprobs"])
    chat = await client.chat.completions.create(model=M, messages=[{"role": "user", "content": "hello there"}], temperature=0, logprobs=True, top_logprobs=2)
    part = text_part(r)
    assert part.logprobs
    expected = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [(p.token, p.logprob, [t.token for t in p.top_logprobs]) for p in part.logprobs] == [
        (p.token, p.logprob, [t.token for t in p.top_logprobs]) for p in expected or []]
    async with client.responses.stream(model=M, input="hello there", temperature=0, top_logprobs=2, include=["message.output_text.logprobs"]) as stream:
        streamed = [lp.token for e in [e async for e in stream] if e.type == "response.output_text.delta" for lp in e.logprobs]
        final = await stream.get_final_response()
    assert streamed == [p.token for p in part.logprobs] and final.output_text == r.output_text
    plain = await client.responses.create(model=M, input="hello there", temperature=0, top_logprobs=2)
    assert text_part(plain).logprobs == []  # top_logprobs alone asks for none, as with OpenAI


async def test_unknown_include_is_400(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/responses", json={"model": M, "input": "hi", "include": ["message.output_text.logprob"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "include[0]", r.text
