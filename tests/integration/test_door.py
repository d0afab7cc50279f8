"""The door every public route passes (`chatgate.api.door`): one caller from one key header, one
cost budget checked before any work and off the event loop, choices admitted all or none, and
the same refusals on every route that takes the same kind of input. Each test here reproduces a
way through that an earlier route let pass."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from chatgate.api.app import all_routes, check_doors
from chatgate.api.door import Door
from chatgate.engines.fake import FakeEngine
from chatgate.protocol import limits
from tests.support.app import make_app, raw, running, sdk
from tests.support.asgi import call, until

pytestmark = pytest.mark.anyio

M = "fake-model"
MSG: Any = [{"role": "user", "content": "hi"}]
KEYS = {"sk-limited": {"name": "limited", "rpm": 100, "max_parallel_requests": 1, "models": ["other"]}, "sk-free": None}


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


# Identity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "Basic eA=="), ("Authorization", "Bearer sk-limited")],
        [("Authorization", "Bearer sk-limited"), ("Authorization", "Bearer sk-free")],
        [("api-key", "sk-free"), ("Authorization", "Bearer sk-limited")],
        [("x-api-key", "sk-limited"), ("api-key", "sk-limited")],
    ],
    ids=["basic then bearer", "two bearers", "api-key and bearer", "x-api-key and api-key"],
)
async def test_more_than_one_key_header_is_a_400_before_anything_else(tmp_path: Path, headers: list[tuple[str, str]]) -> None:
    engine = FakeEngine()
    async with running(make_app(engine, api_keys_file=keys_file(tmp_path))) as app, raw(app) as http:
        response = await http.post("/v1/chat/completions", json={"model": M, "messages": MSG}, headers=headers)
        assert response.status_code == 400, response.text
        assert error_of(response)["code"] == "duplicate_api_key"
        assert engine.served == 0 and not any(h.startswith("x-ratelimit") for h in response.headers)


async def test_the_one_key_header_may_be_api_key_and_its_limits_apply(tmp_path: Path) -> None:
    async with running(make_app(FakeEngine(), api_keys_file=keys_file(tmp_path))) as app, raw(app) as http:
        # The limited key may use only "other": the model scope and the limits read the same caller.
        scoped = await http.post("/v1/chat/completions", json={"model": M, "messages": MSG}, headers={"api-key": "sk-limited"})
        assert scoped.status_code == 404 and scoped.headers["x-ratelimit-limit-requests"] == "100"
        free = await http.post("/v1/chat/completions", json={"model": M, "messages": MSG, "max_tokens": 2},
                               headers={"api-key": "sk-free"})
        assert free.status_code == 200
        wrong = await http.post("/v1/chat/completions", json={"model": M, "messages": MSG}, headers={"x-api-key": "nope"})
        assert wrong.status_code == 401


# Every route is a door -----------------------------------------------------------------------


async def test_every_api_route_is_a_door() -> None:
    app = make_app(FakeEngine())
    routes = list(all_routes(app.routes))
    doors = {r.path for r in routes if isinstance(r, Door)}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
                 "/v1/engines/{model:path}/embeddings", "/api/v1/chat/completions", "/api/v1/token_check",
                 "/tokenize", "/detokenize", "/v1/models"):
        assert path in doors
    plain = [r.path for r in routes if isinstance(r, APIRoute) and not isinstance(r, Door)]
    assert set(plain) <= {"/health", "/ready", "/metrics", "/"}


def test_a_route_declared_without_the_door_or_with_a_loose_body_is_refused() -> None:
    app = make_app(FakeEngine())
    app.include_router(sneaky := APIRouter())

    @sneaky.post("/v1/sneaky")
    async def sneaky_route() -> dict[str, str]:
        return {}

    with pytest.raises(TypeError, match="door"):
        check_doors(app)
    loose = APIRouter(route_class=Door)
    with pytest.raises(TypeError, match="PublicRequest"):

        @loose.post("/v1/loose")
        async def loose_route(body: dict[str, Any]) -> dict[str, str]:
            return {}


# The cost budget -----------------------------------------------------------------------------


def tool(index: int, properties: int) -> dict[str, Any]:
    props = {f"p{i}": {"type": "string", "description": "x" * 20} for i in range(properties)}
    return {"type": "function", "function": {"name": f"f{index}", "parameters": {"type": "object", "properties": props}}}


async def test_all_schemas_of_a_request_share_one_budget_checked_off_the_loop() -> None:
    # 128 tools of ~300 values each: every tool within its own cap, the request over the budget.
    body = {"model": M, "messages": MSG, "tools": [tool(i, 100) for i in range(128)]}
    assert limits.count_values(body["tools"]) > limits.MAX_REQUEST_SCHEMA_VALUES * 1.5
    async with running(make_app(FakeEngine())) as app, raw(app) as http:
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert error_of(response)["param"].startswith("tools") and "schemas hold" in error_of(response)["message"]
        responses = await http.post("/v1/responses", json={"model": M, "input": "hi", "tools": [
            {"type": "function", **t["function"]} for t in body["tools"]]})
        assert responses.status_code == 400 and error_of(responses)["param"].startswith("tools")


async def test_health_answers_while_a_large_body_is_validated() -> None:
    # Just within the budget: the schemas are checked, in a thread; /health is not held.
    body = {"model": "nobody", "messages": MSG, "tools": [tool(i, 40) for i in range(100)]}
    assert limits.count_values([t["function"]["parameters"] for t in body["tools"]]) < limits.MAX_REQUEST_SCHEMA_VALUES
    async with running(make_app(FakeEngine())) as app, raw(app) as http:
        bodies = [asyncio.create_task(http.post("/v1/chat/completions", json=body)) for _ in range(6)]
        await asyncio.sleep(0.05)
        waits = []
        while not all(b.done() for b in bodies):
            begin = time.perf_counter()
            assert (await http.get("/health")).status_code == 200
            waits.append(time.perf_counter() - begin)
            await asyncio.sleep(0.02)
        for b in bodies:
            assert (await b).status_code == 404  # validated, then: unknown model
        # On a quiet machine each probe takes a few ms; the old code held the loop for seconds.
        assert max(waits, default=0) < 1.0, waits


async def test_large_bodies_do_not_hold_up_small_ones() -> None:
    # Each a second or more of checking: one lane, one per caller; small bodies have their own.
    large = {"model": M, "prompt": [1] * 1_000_000, "max_tokens": 1}
    async with running(make_app(FakeEngine(context_length=2_000_000))) as app, raw(app) as http:
        flood = [asyncio.create_task(http.post("/v1/completions", json=large)) for _ in range(4)]
        await asyncio.sleep(0.2)
        begin = time.perf_counter()
        small = await http.post("/v1/chat/completions", json={"model": M, "messages": MSG, "max_tokens": 2})
        waited = time.perf_counter() - begin
        assert small.status_code == 200
        done = sum(task.done() for task in flood)
        await asyncio.gather(*flood)
        # Quiet, the small request takes milliseconds; behind the flood it took 4 checks' time.
        assert waited < 3.0 and done < 4, (waited, done)


async def test_echo_counts_the_scored_prompt_in_the_logprob_cap() -> None:
    prompt = "word " * 20_000  # 100 kB: 6 × (16 + 100,000) entries
    async with running(make_app(FakeEngine(context_length=200_000))) as app, raw(app) as http:
        response = await http.post("/v1/completions", json={"model": M, "prompt": prompt, "echo": True, "logprobs": 5})
        assert response.status_code == 400 and error_of(response)["param"] == "logprobs"
        assert "prompt tokens scored" in error_of(response)["message"]
        streamed = await http.post("/v1/completions", json={"model": M, "prompt": prompt[:200], "echo": True,
                                                            "logprobs": 5, "max_tokens": 2})
        # A short prompt passes the cap (the fake model then says it cannot score prompts).
        assert "log-probability entries" not in streamed.text


async def test_an_open_budget_counts_the_whole_context_in_the_logprob_cap() -> None:
    # 5 × 21 × 30,000 entries if every choice ran to the end of the context.
    body = {"model": M, "messages": MSG, "n": 5, "logprobs": True, "top_logprobs": 20}
    async with running(make_app(FakeEngine(context_length=30_000))) as app, raw(app) as http:
        open_budget = await http.post("/v1/chat/completions", json=body)
        assert open_budget.status_code == 400 and error_of(open_budget)["param"] == "max_tokens"
        assert (await http.post("/v1/chat/completions", json={**body, "max_tokens": 8})).status_code == 200
        assert (await http.post("/v1/chat/completions", json={**body, "stream": True})).status_code == 200


# Choices: what one worker can take, all or none ------------------------------------------------


async def test_more_choices_than_a_worker_takes_are_refused_holding_no_slot() -> None:
    engine = FakeEngine(token_delay=0.01)
    async with running(make_app(engine, limit_worker_concurrency=64)) as app, raw(app) as http:
        response = await http.post("/v1/completions", json={"model": M, "prompt": ["a"] * 65, "max_tokens": 2})
        assert response.status_code == 400 and error_of(response)["param"] == "prompt"
        assert "at most 64" in error_of(response)["message"]
        assert engine.served == 0
        fits = await http.post("/v1/completions", json={"model": M, "prompt": ["a"] * 64, "max_tokens": 2})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 64


async def test_a_request_whose_choices_cannot_all_start_holds_no_slot() -> None:
    engine = FakeEngine(token_delay=0.05)
    async with running(make_app(engine, limit_worker_concurrency=4)) as app, raw(app) as http:
        busy = asyncio.create_task(http.post("/v1/chat/completions", json={"model": M, "messages": MSG, "n": 2, "max_tokens": 40}))
        await until(lambda: engine.active == 2)
        refused = await http.post("/v1/chat/completions", json={"model": M, "messages": MSG, "n": 4, "max_tokens": 40})
        assert refused.status_code == 429
        await until(lambda: engine.active <= 2, 2.0)  # the two that did start were stopped at once
        assert (await busy).status_code == 200
        await until(lambda: engine.active == 0, 2.0)
        again = await http.post("/v1/chat/completions", json={"model": M, "messages": MSG, "n": 4, "max_tokens": 2})
        assert again.status_code == 200


# The same input gets the same refusal on every route -------------------------------------------


def responses_body(**fields: Any) -> dict[str, Any]:
    return {"model": M, "input": "hi", **fields}


CASES = [
    ("/v1/responses", responses_body(input="\ud800"), "input"),
    ("/v1/responses", responses_body(input=[{"role": "user", "content": [{"type": "input_text", "text": "a\udfffb"}]}]), "input[0].content[0].text"),
    ("/v1/responses", responses_body(input=[{"role": "user", "content": "hi"}] * (limits.MAX_MESSAGES + 1)), "input"),
    ("/v1/responses", responses_body(input=[{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"}
                                            for i in range(limits.MAX_TOOLS + 1)]), "input"),
    ("/v1/responses", responses_body(include=["message.output_text.logprobs"], top_logprobs=20, max_output_tokens=100_000), "top_logprobs"),
    ("/v1/responses", responses_body(temperature=float("nan")), "temperature"),
    ("/tokenize", {"model": M, "prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"model": M, "messages": [{"role": "user", "content": "hi"}] * 3000}, "messages"),
    ("/detokenize", {"model": M, "tokens": [1, -1]}, "tokens[1]"),
    ("/api/v1/token_check", {"prompts": [{"model": M, "prompt": "\udc00", "max_tokens": 1}]}, "prompts[0].prompt"),
    ("/v1/embeddings", {"model": M, "input": ["a", "\ud800"]}, "input"),
]
# Integers of thousands of digits, where a field's own bound or message would have to print them.
HUGE = int("9" * 4300)
CASES += [
    ("/v1/chat/completions", {"model": M, "messages": MSG, "max_tokens": HUGE}, ""),
    ("/v1/responses", responses_body(max_output_tokens=HUGE), ""),
    ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": HUGE, "logprobs": 1}, ""),
]


@pytest.mark.parametrize("path, body, param", CASES, ids=[f"{c[0]} {c[2]} {i}" for i, c in enumerate(CASES)])
async def test_bad_input_is_a_400_naming_the_field_on_every_route(path: str, body: dict[str, Any], param: str) -> None:
    engine = FakeEngine()
    async with running(make_app(engine)) as app, raw(app) as http:
        content = json.dumps(body, allow_nan=True)  # lone surrogates go out as JSON escapes
        response = await http.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert error_of(response)["type"] == "invalid_request_error"
        assert (error_of(response)["param"] or "").startswith(param), error_of(response)
        assert engine.served == 0


async def test_the_sdk_sees_a_responses_over_cap_as_a_bad_request() -> None:
    async with running(make_app(FakeEngine())) as app:
        items: Any = [{"role": "user", "content": "hi"}] * (limits.MAX_MESSAGES + 1)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk(app).responses.create(model=M, input=items)
        assert refused.value.status_code == 400


# Disconnects ---------------------------------------------------------------------------------


async def test_a_responses_client_that_leaves_frees_its_slot() -> None:
    engine = FakeEngine(token_delay=0.05)
    async with running(make_app(engine)) as app:
        leave, sent = asyncio.Event(), list[dict[str, Any]]()
        body = {"model": M, "input": "hi", "max_output_tokens": 200}
        task = asyncio.create_task(call(app, body, leave=leave, sent=sent, path="/v1/responses"))
        await until(lambda: engine.active == 1)
        leave.set()
        await asyncio.wait_for(task, 5)
        await until(lambda: engine.active == 0, 2.0)
        assert sent[0]["status"] == 499
