"""Bad requests get OpenAI's status, error type, code and param; never a 500 or a traceback."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from tests.support.app import Messages, as_dicts, make_app, raw, running, sdk
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

M = "fake-model"
MSG: Messages = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
INVALID = "invalid_request_error"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": M, "messages": MSG, **fields}


def comp(**fields: Any) -> dict[str, Any]:
    return {"model": M, "prompt": "hi", **fields}


def tool(parameters: dict[str, Any], name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def nested(depth: int) -> dict[str, Any]:
    """A JSON schema `depth` objects deep."""
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# (id, path, body, status, type, code, param)
CASES: list[tuple[str, str, Any, int, str, str | None, str | None]] = [
    ("no model", CHAT, {"messages": MSG}, 400, INVALID, "missing_required_parameter", "model"),
    ("no messages", CHAT, {"model": M}, 400, INVALID, "missing_required_parameter", "messages"),
    ("empty messages", CHAT, chat(messages=[]), 400, INVALID, "empty_array", "messages"),
    ("bad role", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, INVALID, "invalid_value", "messages[0].role"),
    ("no role", CHAT, chat(messages=[{"content": "x"}]), 400, INVALID, "missing_required_parameter", "messages[0].role"),
    ("message not object", CHAT, chat(messages=["hello"]), 400, INVALID, "invalid_type", "messages[0]"),
    ("messages not list", CHAT, chat(messages="hello"), 400, INVALID, "invalid_type", "messages"),
    ("content number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, INVALID, "invalid_type", "messages[0].content"),
    ("content part type", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image", "text": "x"}]}]), 400, INVALID, "invalid_value", "messages[0].content[0].type"),
    ("user without content", CHAT, chat(messages=[{"role": "user"}]), 400, INVALID, "invalid_value", "messages[0]"),
    ("second message bad", CHAT, chat(messages=[*MSG, {"role": "user", "content": None}]), 400, INVALID, "invalid_value", "messages[1]"),
    ("model not string", CHAT, chat(model=7), 400, INVALID, "invalid_type", "model"),
    ("model empty", CHAT, chat(model=""), 400, INVALID, "invalid_value", "model"),
    ("unknown model", CHAT, chat(model="gpt-x"), 404, INVALID, "model_not_found", "model"),
    ("max_tokens 0", CHAT, chat(max_tokens=0), 400, INVALID, "integer_below_min_value", "max_tokens"),
    ("max_tokens negative", COMP, comp(max_tokens=-5), 400, INVALID, "integer_below_min_value", "max_tokens"),
    ("max_tokens string", CHAT, chat(max_tokens="10"), 400, INVALID, "invalid_type", "max_tokens"),
    ("max_tokens float", CHAT, chat(max_tokens=1.5), 400, INVALID, "invalid_type", "max_tokens"),
    ("max_completion_tokens 0", CHAT, chat(max_completion_tokens=0), 400, INVALID, "integer_below_min_value", "max_completion_tokens"),
    ("n 0", CHAT, chat(n=0), 400, INVALID, "integer_below_min_value", "n"),
    ("n over max", CHAT, chat(n=17), 400, INVALID, None, "n"),
    ("n over max completions", COMP, comp(n=100), 400, INVALID, None, "n"),
    ("temperature high", CHAT, chat(temperature=2.5), 400, INVALID, "decimal_above_max_value", "temperature"),
    ("temperature negative", COMP, comp(temperature=-0.1), 400, INVALID, "decimal_below_min_value", "temperature"),
    ("temperature string", CHAT, chat(temperature="hot"), 400, INVALID, "invalid_type", "temperature"),
    ("top_p high", CHAT, chat(top_p=1.5), 400, INVALID, "decimal_above_max_value", "top_p"),
    ("top_p negative", COMP, comp(top_p=-1), 400, INVALID, "integer_below_min_value", "top_p"),
    ("top_k 0", CHAT, chat(top_k=0), 400, INVALID, "invalid_value", "top_k"),
    ("top_k -2", COMP, comp(top_k=-2), 400, INVALID, "invalid_value", "top_k"),
    ("presence high", CHAT, chat(presence_penalty=2.5), 400, INVALID, "decimal_above_max_value", "presence_penalty"),
    ("frequency low", CHAT, chat(frequency_penalty=-3), 400, INVALID, "integer_below_min_value", "frequency_penalty"),
    ("repetition 0", CHAT, chat(repetition_penalty=0), 400, INVALID, "integer_below_min_value", "repetition_penalty"),
    ("min_p high", CHAT, chat(min_p=2), 400, INVALID, "integer_above_max_value", "min_p"),
    ("stop five", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, INVALID, "array_above_max_length", "stop"),
    ("stop number", CHAT, chat(stop=5), 400, INVALID, "invalid_type", "stop"),
    ("stop list of numbers", COMP, comp(stop=[1]), 400, INVALID, "invalid_type", "stop[0]"),
    ("logit_bias high", CHAT, chat(logit_bias={"5": 101}), 400, INVALID, "integer_above_max_value", "logit_bias"),
    ("logit_bias key", CHAT, chat(logit_bias={"abc": 1}), 400, INVALID, "invalid_value", "logit_bias"),
    ("logit_bias not object", CHAT, chat(logit_bias=[1]), 400, INVALID, "invalid_type", "logit_bias"),
    ("stream not bool", CHAT, chat(stream="yes"), 400, INVALID, "invalid_type", "stream"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, INVALID, "invalid_value", "stream_options"),
    ("seed string", CHAT, chat(seed="1"), 400, INVALID, "invalid_type", "seed"),
    ("no prompt", COMP, {"model": M}, 400, INVALID, "missing_required_parameter", "prompt"),
    ("empty prompt", COMP, comp(prompt=""), 400, INVALID, "invalid_value", "prompt"),
    ("empty prompt list", COMP, comp(prompt=[]), 400, INVALID, "empty_array", "prompt"),
    ("empty string in list", COMP, comp(prompt=["ok", ""]), 400, INVALID, "invalid_value", "prompt[1]"),
    ("prompt object", COMP, comp(prompt={"a": 1}), 400, INVALID, "invalid_type", "prompt"),
    ("negative token", COMP, comp(prompt=[1, -2]), 400, INVALID, "integer_below_min_value", "prompt[1]"),
    ("empty token list", COMP, comp(prompt=[[1], []]), 400, INVALID, "empty_array", "prompt[1]"),
    ("token out of vocab", COMP, comp(prompt=[10, 99999]), 400, INVALID, None, "prompt"),
    ("echo not bool", COMP, comp(echo="no"), 400, INVALID, "invalid_type", "echo"),
    ("context exceeded chat", CHAT, chat(max_tokens=5000), 400, INVALID, "context_length_exceeded", "messages"),
    ("context exceeded prompt", COMP, comp(prompt="x" * 1100), 400, INVALID, "context_length_exceeded", "prompt"),
    ("body is a list", CHAT, [1, 2], 400, INVALID, "invalid_type", None),
    ("body is a string", COMP, "hello", 400, INVALID, "invalid_type", None),
    ("unknown route", "/v1/nothing", chat(), 404, INVALID, None, None),
    ("token_check empty", "/api/v1/token_check", {"prompts": []}, 400, INVALID, "empty_array", "prompts"),
    ("token_check bad max", "/api/v1/token_check", {"prompts": [{"model": M, "prompt": "x", "max_tokens": -1}]}, 400, INVALID, "integer_below_min_value", "prompts[0].max_tokens"),
    ("token_check unknown model", "/api/v1/token_check", {"prompts": [{"model": "nope", "prompt": "x", "max_tokens": 1}]}, 404, INVALID, "model_not_found", "model"),
    ("fastchat chat bad role", "/api/v1/chat/completions", chat(messages=[{"role": "x", "content": "y"}]), 400, INVALID, "invalid_value", "messages[0].role"),
    # Inputs that once reached the engine and failed there (500 or a broken stream).
    ("tool schema 300 deep", CHAT, chat(tools=[tool(nested(300))]), 400, INVALID, "invalid_value", "tools[0].function.parameters"),
    ("tool schema too large", CHAT, chat(tools=[tool({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(12000)}})]), 400, INVALID, "invalid_value", "tools[0].function.parameters"),
    ("response schema 300 deep", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": nested(300)}}), 400, INVALID, "invalid_value", "response_format.json_schema.schema"),
    ("logit_bias key 2**64", CHAT, chat(logit_bias={str(2**64): 1}), 400, INVALID, "invalid_value", "logit_bias"),
    ("logit_bias key unicode digit", CHAT, chat(logit_bias={"\u0663": 1}), 400, INVALID, "invalid_value", "logit_bias"),
    ("logit_bias key at vocab size", CHAT, chat(logit_bias={"258": 1}), 400, INVALID, None, "logit_bias"),
    ("logit_bias over 300 entries", CHAT, chat(logit_bias={str(i): 1 for i in range(301)}), 400, INVALID, "array_above_max_length", "logit_bias"),
    ("seed 2**63", CHAT, chat(seed=2**63), 400, INVALID, "integer_above_max_value", "seed"),
    ("seed below -2**63", COMP, comp(seed=-(2**63) - 1), 400, INVALID, "integer_below_min_value", "seed"),
    ("repetition 1e-300", CHAT, chat(repetition_penalty=1e-300), 400, INVALID, "decimal_below_min_value", "repetition_penalty"),
    ("repetition 1e-300 streamed", CHAT, chat(repetition_penalty=1e-300, stream=True), 400, INVALID, "decimal_below_min_value", "repetition_penalty"),
    ("repetition 1e999", CHAT, b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e999}', 400, INVALID, "invalid_value", "repetition_penalty"),
    ("repetition huge", COMP, comp(repetition_penalty=1e6), 400, INVALID, "decimal_above_max_value", "repetition_penalty"),
    ("NaN penalty", CHAT, b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": NaN}', 400, INVALID, "invalid_value", "frequency_penalty"),
    ("Infinity temperature", COMP, b'{"model": "fake-model", "prompt": "hi", "temperature": -Infinity}', 400, INVALID, "invalid_value", "temperature"),
    ("NaN in tool parameters", CHAT, b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": NaN}}}]}', 400, INVALID, "invalid_value", "tools[0].function.parameters"),
    ("tool_calls function not object", CHAT, chat(messages=[{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": "x"}]}, *MSG]), 400, INVALID, "invalid_type", "messages[0].tool_calls[0].function"),
    ("tool_calls arguments number", CHAT, chat(messages=[{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": 5}}]}, *MSG]), 400, INVALID, "invalid_type", "messages[0].tool_calls[0].function.arguments"),
    ("tool_calls not a list", CHAT, chat(messages=[{"role": "assistant", "tool_calls": {"id": "c1"}}, *MSG]), 400, INVALID, "invalid_type", "messages[0].tool_calls"),
    ("lone surrogate in content", CHAT, b'{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, INVALID, "invalid_value", "messages[0].content"),
    ("lone surrogate in a part", CHAT, b'{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', 400, INVALID, "invalid_value", "messages[0].content[0].text"),
    ("lone surrogate in prompt", COMP, b'{"model": "fake-model", "prompt": ["ok", "\\ud83d"]}', 400, INVALID, "invalid_value", "prompt"),
    ("lone surrogate in stop", COMP, b'{"model": "fake-model", "prompt": "hi", "stop": "\\ud800"}', 400, INVALID, "invalid_value", "stop"),
    ("lone surrogate in embedding", "/v1/embeddings", b'{"model": "fake-model", "input": "\\ud800"}', 400, INVALID, "invalid_value", "input"),
    # Caps.
    ("stop too long", CHAT, chat(stop=["x" * 257]), 400, INVALID, "invalid_value", "stop[0]"),
    ("tools over 128", CHAT, chat(tools=[tool({}, f"f{i}") for i in range(129)]), 400, INVALID, "array_above_max_length", "tools"),
    ("messages over 2048", CHAT, chat(messages=MSG * 2049), 400, INVALID, "array_above_max_length", "messages"),
    ("prompts × n over 128", COMP, comp(prompt=["a"] * 20, n=8), 400, INVALID, "invalid_value", "prompt"),
    ("token_check over 128 prompts", "/api/v1/token_check", {"prompts": [{"model": M, "prompt": "x", "max_tokens": 1}] * 129}, 400, INVALID, "array_above_max_length", "prompts"),
    ("logprob response too large", CHAT, chat(n=16, logprobs=True, top_logprobs=20, max_tokens=2000), 400, INVALID, "invalid_value", "top_logprobs"),
    ("completion logprobs too large", COMP, comp(prompt=["a"] * 16, n=8, logprobs=5, max_tokens=1000), 400, INVALID, "invalid_value", "logprobs"),
]


@pytest.mark.parametrize(("path", "body", "status", "etype", "code", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_request(fake_app: FastAPI, path: str, body: Any, status: int, etype: str, code: str | None, param: str | None) -> None:
    async with raw(fake_app) as http:
        if isinstance(body, bytes):  # JSON that Python's encoder would not write (NaN, surrogates)
            response = await http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = await http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (etype, code, param)
    assert error["message"] and "Traceback" not in error["message"]
    assert response.headers["x-request-id"]


async def test_case_table_is_large() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("body", [b"{", b"{'model': 1}", b"", b"\xff\xfe", b"null"])
async def test_unparseable_bodies(fake_app: FastAPI, body: bytes) -> None:
    async with raw(fake_app) as http:
        response = await http.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == INVALID


async def test_unknown_fields_are_ignored(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        response = await http.post(CHAT, json=chat(some_future_field={"x": 1}, metadata={"a": "b"}))
    assert response.status_code == 200


async def test_wrong_method_is_405(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        response = await http.get(CHAT)
    assert response.status_code == 405
    assert response.json()["error"]["type"] == INVALID


async def test_sdk_raises_the_matching_exceptions(fake_engine: FakeEngine) -> None:
    async with running(make_app(fake_engine, api_keys=["sk-1"])) as app:
        with pytest.raises(openai.AuthenticationError) as auth:
            await sdk(app, "sk-wrong").chat.completions.create(model=M, messages=MSG)
        assert auth.value.code == "invalid_api_key"
        good = sdk(app, "sk-1")
        with pytest.raises(openai.BadRequestError) as bad:
            await good.chat.completions.create(model=M, messages=MSG, temperature=3)
        assert bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError):
            await good.chat.completions.create(model="missing", messages=MSG)
        with pytest.raises(openai.BadRequestError) as ctx:
            await good.chat.completions.create(model=M, messages=MSG, max_tokens=2000)
        assert ctx.value.code == "context_length_exceeded"
        assert "maximum context length is 1024 tokens. However, you requested" in ctx.value.message


async def test_missing_key_and_every_route_is_guarded(fake_engine: FakeEngine) -> None:
    async with running(make_app(fake_engine, api_keys=["sk-1"])) as app, raw(app) as http:
        for method, path in [("GET", "/v1/models"), ("GET", f"/v1/models/{M}"), ("POST", CHAT), ("POST", COMP),
                             ("POST", "/api/v1/token_check"), ("POST", "/api/v1/chat/completions")]:
            response = await http.request(method, path, json=chat())
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
        ok = await http.post("/api/v1/token_check", json={"prompts": [{"model": M, "prompt": "hi", "max_tokens": 1}]},
                             headers={"Authorization": "Bearer sk-1"})
        assert ok.status_code == 200
        assert (await http.get("/health")).status_code == 200


async def test_body_over_the_cap_is_413(fake_engine: FakeEngine) -> None:
    async with running(make_app(fake_engine, max_request_bytes=2048)) as app, raw(app) as http:
        response = await http.post(CHAT, json=chat(messages=[{"role": "user", "content": "x" * 5000}]))
        assert response.status_code == 413
        assert response.json()["error"]["type"] == INVALID

        async def chunked() -> Any:
            for _ in range(10):
                yield b" " * 1000

        response = await http.post(CHAT, content=chunked(), headers={"content-type": "application/json"})
        assert response.status_code == 413


async def test_request_id_is_echoed(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        response = await http.post(CHAT, json=chat(), headers={"x-request-id": "my-id-1"})
        assert response.headers["x-request-id"] == "my-id-1"
        assert (await http.get("/v1/models")).headers["x-request-id"].startswith("req_")


async def test_error_mid_stream_becomes_an_error_event() -> None:
    async with running(make_app(FakeEngine(fail_after=5))) as app:
        stream = await sdk(app).chat.completions.create(model=M, messages=MSG, stream=True)
        with pytest.raises(openai.APIError) as err:
            async for _ in stream:
                pass
        assert "request" in err.value.message
        async with raw(app) as http:
            response = await http.post(CHAT, json=chat(stream=True))
        events = [e for e in response.text.split("\n\n") if e]
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["type"] == "server_error"
        assert "Traceback" not in response.text


async def test_unexpected_failure_is_a_clean_500() -> None:
    async with running(make_app(FakeEngine(fail_after=0))) as app, raw(app) as http:
        response = await http.post(CHAT, json=chat(), headers={"x-request-id": "boom-1"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "server_error"
    assert "boom-1" in error["message"] and "Traceback" not in response.text
    assert response.headers["x-request-id"] == "boom-1"


async def test_token_check_counts_with_the_model_tokenizer(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        response = await http.post("/api/v1/token_check", json={"prompts": [
            {"model": M, "prompt": "héllo", "max_tokens": 10},
            {"model": M, "prompt": "x" * 1000, "max_tokens": 100},
        ]})
    assert response.json() == {"prompts": [
        {"fits": True, "tokenCount": 6, "contextLength": 1024},
        {"fits": False, "tokenCount": 1000, "contextLength": 1024},
    ]}


async def test_fastchat_chat_route_matches_openai_route(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        a = (await http.post(CHAT, json=chat(temperature=0, repetition_penalty=1.1))).json()
        b = (await http.post("/api/v1/chat/completions", json=chat(temperature=0, repetition_penalty=1.1))).json()
    assert a["choices"] == b["choices"]
    del a["usage"]["prompt_tokens_details"], b["usage"]["prompt_tokens_details"]  # b finds a's prompt cached
    assert a["usage"] == b["usage"]


async def test_cors_preflight_needs_no_key(fake_engine: FakeEngine) -> None:
    app = make_app(fake_engine, api_keys=["sk-1"], allowed_origins='["http://ui.example"]')
    async with running(app), raw(app) as http:
        preflight = await http.options(CHAT, headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        })
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
        denied = await http.options(CHAT, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert denied.status_code == 400
        actual = await http.post(CHAT, json=chat(), headers={"Origin": "http://ui.example", "Authorization": "Bearer sk-1"})
        assert actual.status_code == 200
        assert actual.headers["access-control-allow-origin"] == "http://ui.example"


async def test_overloaded_worker_answers_429_and_others_continue() -> None:
    import asyncio

    engine = FakeEngine(token_delay=0.01)
    app = make_app(engine, limit_worker_concurrency=1)
    async with running(app):
        client = sdk(app)
        slow = asyncio.create_task(client.chat.completions.create(model=M, messages=MSG, temperature=0))
        await apoll(lambda: bool(engine.active), what="the first request occupies the only slot", timeout=5)
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model=M, messages=MSG)
        assert err.value.response.headers["retry-after"]
        assert (await slow).choices[0].finish_reason == "stop"
        assert (await client.chat.completions.create(model=M, messages=MSG)).choices


async def test_bad_requests_do_not_disturb_a_stream_in_flight() -> None:
    import asyncio

    app = make_app(FakeEngine(token_delay=0.005))
    async with running(app), raw(app) as http:
        client = sdk(app)

        async def streamed() -> str:
            stream = await client.chat.completions.create(model=M, messages=MSG, temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        task = asyncio.create_task(streamed())
        bad = [case[2] for case in CASES[:30]]
        responses = await asyncio.gather(*(http.post(CHAT, json=b) for b in bad))
        assert all(400 <= r.status_code < 500 for r in responses)
        engine = FakeEngine()
        assert await task == engine.reply_for(engine.render_chat(as_dicts(MSG)))
