"""Function calling: `tools` / `tool_choice` (and legacy `functions`) on the real model, through the
openai SDK, streamed and not; plus the 400s for bad tool requests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx2
import jsonschema
import pytest
from fastapi import FastAPI
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionMessage, ChatCompletionNamedToolChoiceParam
from pydantic import SecretStr
from openai.types.chat.completion_create_params import Function

from chatgate.engines.transformers import TransformersEngine
from chatgate.settings import EngineSettings
from tests.support.app import Messages, as_dicts, function_calls, function_tool, make_app, raw, running, sdk
from tests.support.runners import Served

pytestmark = pytest.mark.anyio

MODEL = "SmolLM2-135M-Instruct"
WEATHER: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME: dict[str, object] = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}, "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    function_tool("get_weather", "Current weather in a city", WEATHER),
    function_tool("get_time", "Current time in a timezone", TIME),
]
ASK: Messages = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.mark.model
async def test_named_function_is_called_with_valid_arguments_streamed_and_not(served: Served) -> None:
    client = sdk(served.api)
    choice: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "get_weather"}}
    r = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    calls = function_calls(c.message)
    assert len(calls) >= 1 and all(call.function.name == "get_weather" for call in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        assert call.id.startswith("call_")
    stream = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=80, stream=True)
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    finish = None
    async for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for delta in ch.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names[delta.index] = delta.function.name
                if delta.function and delta.function.arguments:
                    args[delta.index] = args.get(delta.index, "") + delta.function.arguments
    assert finish == "tool_calls"
    assert [names[i] for i in sorted(names)] == [call.function.name for call in calls]
    assert [args[i] for i in sorted(args)] == [call.function.arguments for call in calls]


@pytest.mark.model
async def test_required_with_one_call_at_a_time(served: Served) -> None:
    r = await sdk(served.api).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                      parallel_tool_calls=False, temperature=0, max_tokens=80)
    calls = function_calls(r.choices[0].message)
    assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
    name = calls[0].function.name
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[name])


@pytest.mark.model
async def test_none_and_auto_and_a_tool_conversation(chat_app: FastAPI) -> None:
    client = sdk(chat_app)
    none = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=60)
    message = auto.choices[0].message
    assert message.content or message.tool_calls
    history: Messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
    ]
    follow = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    assert follow.choices[0].message.content


@pytest.mark.model
async def test_legacy_functions(chat_app: FastAPI) -> None:
    functions: list[Function] = [
        {"name": f["name"], "description": f["description"], "parameters": f["parameters"]} for f in (t["function"] for t in TOOLS)
    ]
    r = await sdk(chat_app).chat.completions.create(model=MODEL, messages=ASK, functions=functions,
                                               function_call={"name": "get_time"}, temperature=0, max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "function_call" and c.message.function_call is not None
    assert c.message.function_call.name == "get_time"
    jsonschema.validate(json.loads(c.message.function_call.arguments), TIME)


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
async def test_bad_tool_requests_are_400(fake_app: FastAPI, extra: dict[str, object], param: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/chat/completions", json={"model": "fake-model", "messages": ASK, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_a_template_that_renders_tools_gets_them_and_others_get_the_generic_prompt() -> None:
    from chatgate.engines.fake import FakeEngine

    messages: Messages = [{"role": "user", "content": "weather?"}]
    for native in (True, False):
        engine = FakeEngine(tools_in_template=native)
        async with running(make_app(engine)) as app:
            r = await sdk(app).chat.completions.create(model="fake-model", messages=messages, tools=TOOLS, temperature=0)
        expected = engine.render_chat(as_dicts(messages), as_dicts(TOOLS)) if native else None
        assert r.usage is not None
        if native:
            assert expected is not None and expected.startswith("<tools> get_weather get_time")
            assert r.usage.prompt_tokens == len(expected.encode())
        else:
            assert r.usage.prompt_tokens > len(engine.render_chat(as_dicts(messages)).encode()) + 100  # the tool prompt


@pytest.mark.model
async def test_sdk_stream_helper_reassembles_tool_calls(chat_app: FastAPI) -> None:
    choice: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "get_weather"}}
    async with sdk(chat_app).chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                temperature=0, max_tokens=80) as stream:
        final = await stream.get_final_completion()
    calls = function_calls(final.choices[0].message)
    assert final.choices[0].finish_reason == "tool_calls" and calls
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


CITY: dict[str, object] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def assert_distinct_city_calls(message: ChatCompletionMessage) -> list[str]:
    """The calls' cities, each call to get_weather with exactly `city`, no call made twice."""
    calls = function_calls(message)
    arguments = [json.loads(call.function.arguments) for call in calls]
    assert calls and all(call.function.name == "get_weather" and set(a) == {"city"} for call, a in zip(calls, arguments)), calls
    assert len({call.function.arguments for call in calls}) == len(calls)
    return [a["city"] for a in arguments]


@pytest.mark.model
async def test_one_parameter_tool_required_finishes_within_100_tokens(chat_app: FastAPI) -> None:
    """The issue's try, parallel calls on: the model used to invent properties (`"type"`, ...),
    then to repeat `get_weather(Paris)` inside the open list until the limit. A repeat now ends
    the list, and is dropped."""
    tool = [function_tool("get_weather", "Get the weather in a city", CITY)]
    client = sdk(chat_app)
    greedy = await client.chat.completions.create(model=MODEL, messages=ASK, tools=tool, tool_choice="required", max_tokens=100, temperature=0)
    assert greedy.choices[0].finish_reason == "tool_calls" and greedy.usage is not None and greedy.usage.completion_tokens < 100
    assert assert_distinct_city_calls(greedy.choices[0].message)[0] == "Paris"
    for seed in (1, 5):  # at the SDK's default temperature; seed 5 repeated Paris too
        r = await client.chat.completions.create(model=MODEL, messages=ASK, tools=tool, tool_choice="required", max_tokens=100, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        assert_distinct_city_calls(r.choices[0].message)


@pytest.mark.model
async def test_langchain_bind_tools_required(chat_app: FastAPI) -> None:
    """The issue's LangChain try: `bind_tools(..., tool_choice="required")`, 100 tokens."""

    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return "sunny"

    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=chat_app), base_url="http://chatgate")
    for temperature in (0.0, None):  # None: LangChain sends none, so the server's default (1) applies
        llm = ChatOpenAI(model=MODEL, base_url="http://chatgate/v1", api_key=SecretStr("sk-test"), http_async_client=http,
                         max_completion_tokens=100, temperature=temperature, seed=1, max_retries=0)
        reply = await llm.bind_tools([get_weather], tool_choice="required").ainvoke("What is the weather in Paris?")
        assert isinstance(reply, AIMessage) and reply.tool_calls, reply
        assert reply.response_metadata["finish_reason"] == "tool_calls"
        assert all(call["name"] == "get_weather" and set(call["args"]) == {"city"} for call in reply.tool_calls)
