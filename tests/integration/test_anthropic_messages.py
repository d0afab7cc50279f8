"""Anthropic's `/v1/messages` and `/v1/messages/count_tokens` on the fake engine, through the
official `anthropic` SDK and raw HTTP: replies and streams in Anthropic's shapes, the
conversation (system, tool uses and results) rendered as chat renders it, stop reasons, token
counts, and every refusal in Anthropic's error shape (bad fields, keys, limits, size, a stream
that fails), while OpenAI's routes keep OpenAI's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam
from fastapi import FastAPI

from chatgate.api.errors import ANTHROPIC, OPENAI
from chatgate.engines.fake import FakeEngine
from chatgate.errors import NoHealthyWorkerError, OverloadedError, WorkerError
from tests.support.anthropic_sdk import anthropic_sdk
from tests.support.app import Messages, make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

M = "fake-model"
# This SDK version no longer takes the sampling fields as arguments; clients send them in the body.
GREEDY: Any = {"temperature": 0}
HI: list[MessageParam] = [{"role": "user", "content": "hello there"}]
WEATHER: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[ToolParam] = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]
CHAT_TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}}]


def events_of(text: str) -> list[tuple[str, dict[str, Any]]]:
    """A raw SSE body as (event name, data) pairs, each checked to be one named event."""
    out = []
    for block in (b for b in text.split("\n\n") if b.strip()):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def anthropic_error(body: dict[str, Any], kind: str) -> str:
    """The message of an error body in Anthropic's shape of type `kind` (checked)."""
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}, body
    message: str = body["error"]["message"]
    return message


async def test_create_answers_as_chat_does_for_the_same_conversation(fake_app: FastAPI) -> None:
    m = await anthropic_sdk(fake_app).messages.create(model=M, max_tokens=200, messages=HI, system="Be brief.", extra_body=GREEDY)
    chat = await sdk(fake_app).chat.completions.create(
        model=M, temperature=0, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    )
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == M
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert chat.usage is not None
    assert (m.usage.input_tokens, m.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)


async def test_system_as_blocks_is_the_system_string(fake_app: FastAPI) -> None:
    client = anthropic_sdk(fake_app)
    plain = await client.messages.create(model=M, max_tokens=200, messages=HI, system="One.\nTwo.", extra_body=GREEDY)
    blocks = await client.messages.create(
        model=M, max_tokens=200, messages=HI, extra_body=GREEDY,
        system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}}],
    )
    chat = await sdk(fake_app).chat.completions.create(
        model=M, temperature=0, messages=[{"role": "system", "content": "One.\nTwo."}, {"role": "user", "content": "hello there"}]
    )
    assert blocks.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert plain.usage.input_tokens == blocks.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]


async def test_stop_sequence_and_max_tokens_are_the_stop_reasons(fake_app: FastAPI) -> None:
    client = anthropic_sdk(fake_app)
    full = (await client.messages.create(model=M, max_tokens=200, messages=HI, extra_body=GREEDY)).content[0].text  # type: ignore[union-attr]
    cut = await client.messages.create(model=M, max_tokens=200, messages=HI, extra_body=GREEDY, stop_sequences=["zzz", "ere"])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == "ere"
    assert cut.content[0].text == full[: full.index("ere")]  # type: ignore[union-attr]
    short = await client.messages.create(model=M, max_tokens=3, messages=HI)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3 and short.stop_sequence is None


async def test_sdk_stream_has_anthropics_events_and_the_same_text(fake_app: FastAPI) -> None:
    client = anthropic_sdk(fake_app)
    whole = await client.messages.create(model=M, max_tokens=200, messages=HI, extra_body=GREEDY)
    async with client.messages.stream(model=M, max_tokens=200, messages=HI, extra_body=GREEDY) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start" and kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, whole.usage.output_tokens)


async def test_raw_stream_is_named_events_ping_and_stop_sequence(fake_app: FastAPI) -> None:
    body = {"model": M, "max_tokens": 200, "messages": HI, "stream": True, "temperature": 0, "stop_sequences": ["ere"]}
    async with raw(fake_app) as http:
        r = await http.post("/v1/messages", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text)
    assert all(name == data["type"] for name, data in events) and "[DONE]" not in r.text
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"] and names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] > 0
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas) and "".join(d["text"] for d in deltas) == "Echo: <user> hello th"
    end = events[-2][1]
    assert end["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "ere"} and end["usage"]["output_tokens"] > 0


async def test_tool_uses_and_results_render_as_chats_calls_and_tool_messages(fake_app: FastAPI) -> None:
    history: list[MessageParam] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
                                     {"type": "text", "text": "Thanks"}]},
    ]
    m = await anthropic_sdk(fake_app).messages.create(model=M, max_tokens=300, messages=history, tools=TOOLS,
                                                      tool_choice={"type": "none"}, extra_body=GREEDY)
    chat_history: Messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "user", "content": "Thanks"},
    ]
    chat = await sdk(fake_app).chat.completions.create(model=M, messages=chat_history, tools=CHAT_TOOLS, tool_choice="none", temperature=0)
    assert m.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert chat.usage is not None and m.usage.input_tokens == chat.usage.prompt_tokens


async def test_count_tokens_is_what_create_reads(fake_app: FastAPI) -> None:
    client = anthropic_sdk(fake_app)
    for tools in ([], TOOLS):
        kwargs: Any = {"tools": tools} if tools else {}
        count = await client.messages.count_tokens(model=M, messages=HI, system="Be brief.", **kwargs)
        m = await client.messages.create(model=M, max_tokens=5, messages=HI, system="Be brief.", **kwargs)
        assert count.input_tokens == m.usage.input_tokens > 0


# Each bad body, and what its error names (Anthropic's errors have no `param`: the message names it).
BAD: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": None}, "'max_tokens'"),
    ({"max_tokens": 0}, "'max_tokens'"),
    ({"max_tokens": "10"}, "'max_tokens'"),
    ({"max_tokens": 10**9}, "maximum context length is 1024"),
    ({"max_tokens": 10**100}, "maximum context length is 1024"),
    ({"max_tokens": 10**101}, "at most 100 digits"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ({"stop_sequences": "stop"}, "stop_sequences"),
    ({"stop_sequences": ["x" * 257]}, "stop_sequences[0]"),
    ({"system": 5}, "system"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
    ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tools[0].name"),
    ({"tools": [{"name": "f", "input_schema": {"type": 5}}]}, "tools[0].input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"metadata": {"user_id": "u" * 257}}, "metadata.user_id"),
    ({"model": ""}, "model"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
async def test_bad_requests_are_anthropic_400s_naming_the_field(fake_app: FastAPI, fields: dict[str, Any], param: str) -> None:
    body = {k: v for k, v in {"model": M, "max_tokens": 20, "messages": HI, **fields}.items() if v is not None}
    async with raw(fake_app) as http:
        r = await http.post("/v1/messages", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    named = param if " " in param or param.startswith("'") else f"'{param}'"
    assert named in anthropic_error(r.json(), "invalid_request_error")
    # What the SDK can send (no NaN; max_tokens it can time, below the size it wants streamed):
    if body.get("temperature") == body.get("temperature") and isinstance(body.get("max_tokens"), int) and body["max_tokens"] < 10**4:
        sampling = {k: body.pop(k) for k in ("temperature", "top_k") if k in body}
        with pytest.raises(anthropic.BadRequestError) as caught:
            await anthropic_sdk(fake_app).messages.create(**body, extra_body=sampling)
        assert caught.value.status_code == 400 and named in str(caught.value)


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 5}'])
async def test_unparsable_bodies_are_anthropic_400s(fake_app: FastAPI, body: bytes) -> None:
    async with raw(fake_app) as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = await http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400
            anthropic_error(r.json(), "invalid_request_error")


async def test_count_tokens_refuses_as_create_does(fake_app: FastAPI) -> None:
    client = anthropic_sdk(fake_app)
    with pytest.raises(anthropic.BadRequestError, match="'messages'"):
        await client.messages.count_tokens(model=M, messages=[])
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client.messages.count_tokens(model="nope", messages=HI)
    anthropic_error(caught.value.body, "not_found_error")  # type: ignore[arg-type]


async def test_keys_from_x_api_key_or_bearer_and_refusals_in_anthropics_shape() -> None:
    async with running(make_app(FakeEngine(), api_keys=["sk-a"])) as app:
        assert (await anthropic_sdk(app, "sk-a").messages.create(model=M, max_tokens=5, messages=HI)).content
        async with raw(app) as http:
            body = {"model": M, "max_tokens": 5, "messages": HI}
            bearer = await http.post("/v1/messages", json=body, headers={"authorization": "Bearer sk-a"})
            assert bearer.status_code == 200
            none = await http.post("/v1/messages", json=body)
            assert none.status_code == 401 and anthropic_error(none.json(), "authentication_error")
            two = await http.post("/v1/messages", json=body, headers={"authorization": "Bearer sk-a", "x-api-key": "sk-a"})
            assert two.status_code == 400 and "exactly one" in anthropic_error(two.json(), "invalid_request_error")
            count = await http.post("/v1/messages/count_tokens", json={"model": M, "messages": HI}, headers={"x-api-key": "sk-b"})
            assert count.status_code == 401 and anthropic_error(count.json(), "authentication_error")
            # OpenAI's routes keep OpenAI's shape; an unknown path too.
            chat = await http.post("/v1/chat/completions", json={"model": M, "messages": HI})
            assert chat.status_code == 401 and chat.json()["error"]["code"] == "invalid_api_key"
            method = await http.get("/v1/messages", headers={"x-api-key": "sk-a"})
            assert method.status_code == 405 and anthropic_error(method.json(), "invalid_request_error")
            unknown = await http.post("/v1/messagesX", json=body, headers={"x-api-key": "sk-a"})
            assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"
        with pytest.raises(anthropic.AuthenticationError):
            await anthropic_sdk(app, "sk-wrong").messages.create(model=M, max_tokens=5, messages=HI)
        with pytest.raises(anthropic.NotFoundError) as caught:
            await anthropic_sdk(app, "sk-a").messages.create(model="nope", max_tokens=5, messages=HI)
        assert anthropic_error(caught.value.body, "not_found_error")  # type: ignore[arg-type]


async def test_rate_limit_and_body_cap_in_anthropics_shape(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-rpm": {"name": "one-a-minute", "rpm": 1}}))
    async with running(make_app(FakeEngine(), api_keys_file=keys, max_request_bytes=4096)) as app:
        client = anthropic_sdk(app, "sk-rpm")
        await client.messages.create(model=M, max_tokens=5, messages=HI)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model=M, max_tokens=5, messages=HI)
        assert "one-a-minute" in anthropic_error(limited.value.body, "rate_limit_error")  # type: ignore[arg-type]
        assert limited.value.response.headers["retry-after"]
        async with raw(app) as http:
            big = {"model": M, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 5000}]}
            r = await http.post("/v1/messages", json=big, headers={"x-api-key": "sk-rpm"})
        assert r.status_code == 413 and anthropic_error(r.json(), "request_too_large")


async def test_a_stream_that_fails_ends_with_an_anthropic_error_event() -> None:
    async with running(make_app(FakeEngine(fail_after=3))) as app, raw(app) as http:
        r = await http.post("/v1/messages", json={"model": M, "max_tokens": 50, "messages": HI, "stream": True})
    events = events_of(r.text)
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    anthropic_error(events[-1][1], "api_error")


def test_dialects_say_overload_as_529_and_keep_openais_shape_elsewhere() -> None:
    for error in (OverloadedError("busy"), NoHealthyWorkerError("none")):
        body, status = ANTHROPIC.render(error, error.status)
        assert status == 529 and anthropic_error(body, "overloaded_error") == error.message
        assert OPENAI.render(error, error.status) == (error.body(), error.status)
    body, status = ANTHROPIC.render(WorkerError("broke"), 502)
    assert status == 502 and anthropic_error(body, "api_error") == "broke"


async def test_the_schema_describes_the_routes_with_anthropics_error_shape() -> None:
    async with running(make_app(FakeEngine(), docs=True)) as app, raw(app) as http:
        schema = (await http.get("/openapi.json")).json()
    route = schema["paths"]["/v1/messages"]["post"]
    assert "max_tokens" in schema["components"]["schemas"]["MessagesRequest"]["required"]
    error_ref = route["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref.endswith("/AnthropicErrorResponse")
    assert "/v1/messages/count_tokens" in schema["paths"]
