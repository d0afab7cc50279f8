"""`priority` and `--scheduling-policy`, end to end on the fake engine built from settings with
`--max-running 1`: under `priority` a later, higher-priority request (lower value) overtakes
queued and running lower ones, and the one it preempted resumes before later equals, its stream
whole; under `fcfs` a non-zero priority is a 400 naming it, as in vLLM. Bad values are 400s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from chatgate.api.limits.policy import load_keys_file
from chatgate.engines import create_engine
from chatgate.engines.base import GenerationOutput, SamplingParams
from chatgate.engines.fake import FakeEngine
from chatgate.settings import EngineSettings, SchedulingPolicy, WorkerSettings
from chatgate.worker.app import create_worker_app
from tests.support.app import make_app, raw, running, sdk, user
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

M = "fake-model"


def engine(policy: SchedulingPolicy) -> FakeEngine:
    built = create_engine(EngineSettings(engine="fake", max_running=1, scheduling_policy=policy, fake_token_delay=0.005))
    assert isinstance(built, FakeEngine)
    return built


async def test_a_higher_priority_overtakes_and_the_preempted_resumes_before_later_equals() -> None:
    fake = engine("priority")
    async with running(make_app(fake)) as app:
        client = sdk(app)
        finished: list[str] = []

        async def chat(name: str, priority: int, **extra: Any) -> str:
            response = await client.chat.completions.create(
                model=M, messages=user(f"request {name}"), temperature=0, extra_body={"priority": priority}, **extra
            )
            finished.append(name)
            return response.choices[0].message.content or ""

        low = asyncio.ensure_future(chat("low", 5))
        await apoll(lambda: fake.batch.running == 1, what="the low one running", timeout=10)
        later = asyncio.ensure_future(chat("later", 5))
        await apoll(lambda: fake.batch.waiting == 1, what="the later one queued", timeout=10)
        completion = await client.completions.create(
            model=M, prompt="urgent", temperature=0, max_tokens=64, extra_body={"priority": -2}
        )
        finished.append("high")
        texts = await asyncio.gather(low, later)
    assert finished == ["high", "low", "later"]
    assert fake.batch.preemptions == 1
    assert completion.choices[0].text == FakeEngine.reply_for("urgent")
    # The preempted stream lost and repeated nothing.
    assert texts[0] == FakeEngine.reply_for(fake.render_chat([{"role": "user", "content": "request low"}]))


async def test_under_fcfs_requests_run_in_arrival_order_and_a_priority_is_refused() -> None:
    fake = engine("fcfs")
    async with running(make_app(fake)) as app:
        client = sdk(app)
        order: list[str] = []

        async def chat(name: str) -> None:
            await client.chat.completions.create(model=M, messages=user(name), temperature=0)
            order.append(name)

        first = asyncio.ensure_future(chat("first"))
        await apoll(lambda: fake.batch.running == 1, what="the first one running", timeout=10)
        second = asyncio.ensure_future(chat("second"))
        await apoll(lambda: fake.batch.waiting == 1, what="the second one queued behind it", timeout=10)
        await asyncio.gather(first, second)
        assert order == ["first", "second"]
        await client.chat.completions.create(model=M, messages=user("zero is the default"), extra_body={"priority": 0})
        for call in (
            client.chat.completions.create(model=M, messages=user("x"), extra_body={"priority": 1}),
            client.completions.create(model=M, prompt="x", extra_body={"priority": -1}),
            client.responses.create(model=M, input="x", extra_body={"priority": 3}),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                await call
            assert err.value.status_code == 400 and "priority" in str(err.value.body)


@pytest.mark.parametrize("bad", [10**30, -(2**63) - 1, 2**63, "high", 1.5, None, True, [1], {"a": 1}])
async def test_bad_priorities_are_400s_naming_the_field(bad: object, fake_app: FastAPI) -> None:
    bodies: dict[str, dict[str, Any]] = {
        "/v1/chat/completions": {"model": M, "messages": user("x")},
        "/v1/completions": {"model": M, "prompt": "x"},
        "/v1/responses": {"model": M, "input": "x"},
    }
    async with raw(fake_app) as http:
        for path, body in bodies.items():
            response = await http.post(path, json=body | {"priority": bad}, headers={"Authorization": "Bearer sk-test"})
            assert response.status_code == 400, (path, bad, response.text)
            assert response.json()["error"]["param"] == "priority", (path, bad, response.text)
        assert (await http.post("/v1/chat/completions", json=bodies["/v1/chat/completions"])).status_code == 200


class PriorityRecorder(FakeEngine):
    """The fake model, remembering the priority of every generation it is asked for."""

    def __init__(self, policy: SchedulingPolicy) -> None:
        super().__init__(name=M, scheduling_policy=policy)
        self.priorities: list[int] = []

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        self.priorities.append(params.priority)
        return super().generate(prompt_ids, params)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
async def test_priority_travels_the_worker_protocol_and_an_fcfs_worker_refuses_it(policy: SchedulingPolicy) -> None:
    engine = PriorityRecorder(policy)
    app = create_worker_app(WorkerSettings(no_register=True, engine="fake", model_names=[M]), engine=engine)
    async with running(app), raw(app) as http:
        response = await http.post("/worker_generate", json={"model": M, "prompt": "x", "max_new_tokens": 2, "priority": -7})
        body = response.json()
        if policy == "priority":
            assert body["error_code"] == 0 and engine.priorities == [-7]
        else:
            assert body["error_code"] != 0 and body["param"] == "priority" and engine.priorities == []
        too_big = await http.post("/worker_generate", json={"model": M, "prompt": "x", "priority": 2**63})
        assert too_big.status_code == 400 or too_big.json()["error_code"] != 0


async def test_a_key_may_not_ask_above_its_priority_floor(tmp_path: Path) -> None:
    """Without a floor any key could put itself ahead of all others: a key's `min_priority` bounds
    what it may ask on every route that takes `priority` (403 naming the field), its requests that
    ask for none run at the floor, and other keys are left alone."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-low": {"name": "batch", "min_priority": 5}, "sk-any": None}))
    recorder = PriorityRecorder("priority")
    async with running(make_app(recorder, api_keys_file=keys)) as app:
        low, anyone = sdk(app, api_key="sk-low"), sdk(app, api_key="sk-any")

        async def call(client: openai.AsyncOpenAI, body: dict[str, int]) -> None:
            if route == "chat":
                await client.chat.completions.create(model=M, messages=user("x"), extra_body=body)
            elif route == "completions":
                await client.completions.create(model=M, prompt="x", extra_body=body)
            else:
                await client.responses.create(model=M, input="x", extra_body=body)

        for route in ("chat", "completions", "responses"):
            for asked in (4, 0, -(2**63)):
                with pytest.raises(openai.PermissionDeniedError) as err:
                    await call(low, {"priority": asked})
                assert isinstance(err.value.body, dict) and err.value.body.get("param") == "priority", err.value.body
                assert "batch" in err.value.message and "below 5" in err.value.message
            assert recorder.priorities == []
            for body, runs_at in (({"priority": 5}, 5), ({"priority": 2**63 - 1}, 2**63 - 1), ({}, 5)):
                await call(low, body)
                assert recorder.priorities.pop() == runs_at
            await call(anyone, {"priority": -100})
            assert recorder.priorities.pop() == -100
            await call(anyone, {})
            assert recorder.priorities.pop() == 0


def test_a_floor_that_is_not_an_integer_stops_the_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-low": {"min_priority": "high"}}))
    with pytest.raises(ValueError, match="min_priority"):
        load_keys_file(keys)
