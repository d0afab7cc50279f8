"""Stored responses across real processes: a `serve` killed (SIGKILL, no shutdown) and started
again on the same SQLite file still has every response it acknowledged, and conversations go
on from them (the `openai` SDK and the Agents SDK); two `api` servers of one fleet sharing one
Redis see each other's responses, replay each other's background streams and cancel each
other's work."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.app import sdk
from tests.support.live_fleet import LiveFleet
from tests.support.polling import apoll
from tests.support.processes import Process, free_port
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.live, pytest.mark.anyio]

M = "fake-model"
KEYS = "sk-a,sk-b"
ADMIN = "sk-admin"


def serve(log: Path, *extra: str, delay: float = 0.01) -> tuple[Process, str]:
    """`chatgate serve` on the fake engine (`delay` seconds a token) with keys sk-a and sk-b, healthy."""
    port = free_port()
    args = ["serve", "--engine", "fake", "--fake-token-delay", str(delay), "--embedding-model-path", "none", "--no-playground",
            "--port", str(port), "--api-keys", KEYS, *extra]
    process = Process(args, log)
    url = f"http://127.0.0.1:{port}"
    process.wait_healthy(url)
    return process, url


@pytest.fixture
def started() -> Iterator[list[Process]]:
    processes: list[Process] = []
    yield processes
    for process in processes:
        process.stop()


async def test_a_killed_server_restarted_on_its_file_keeps_every_acknowledged_response(tmp_path: Path, started: list[Process]) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    path = str(tmp_path / "responses.sqlite3")
    first, url = serve(tmp_path / "first.log", "--responses-path", path)
    started.append(first)
    client = sdk(url, "sk-a")
    one = await client.responses.create(model=M, input="My name is Ann.", temperature=0)
    async with client.responses.stream(model=M, input="Streamed.", temperature=0, previous_response_id=one.id) as stream:
        two = await stream.get_final_response()
    set_tracing_disabled(True)
    agent = Agent(name="a", instructions="Be brief.", model=OpenAIResponsesModel(model=M, openai_client=client),
                  model_settings=ModelSettings(temperature=0, store=True))
    ran = await Runner.run(agent, "Hello agent.")
    first.signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
    first.proc.wait(timeout=10)

    second, url = serve(tmp_path / "second.log", "--responses-path", path)
    started.append(second)
    client = sdk(url, "sk-a")
    for kept in (one, two):
        again = await client.responses.retrieve(kept.id)
        assert again.output_text == kept.output_text and again.status == "completed"
    replayed = [e async for e in await client.responses.retrieve(two.id, stream=True, starting_after=1)]
    assert replayed[-1].type == "response.completed" and replayed[0].sequence_number == 2
    three = await client.responses.create(model=M, input="What is my name?", previous_response_id=two.id, temperature=0)
    whole: Any = [
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": [{"type": "output_text", "text": one.output_text}]},
        {"role": "user", "content": "Streamed."},
        {"role": "assistant", "content": [{"type": "output_text", "text": two.output_text}]},
        {"role": "user", "content": "What is my name?"},
    ]
    stateless = await client.responses.create(model=M, input=whole, temperature=0, store=False)
    assert three.output_text == stateless.output_text
    assert three.usage is not None and stateless.usage is not None and three.usage.input_tokens == stateless.usage.input_tokens
    agent = agent.clone(model=OpenAIResponsesModel(model=M, openai_client=client))
    on = await Runner.run(agent, "Still there?", previous_response_id=ran.last_response_id)
    assert (await client.responses.retrieve(str(on.last_response_id))).previous_response_id == ran.last_response_id
    with pytest.raises(openai.NotFoundError):  # still its owner's only
        await sdk(url, "sk-b").responses.retrieve(one.id)


async def test_two_api_servers_sharing_redis_see_and_cancel_each_others_responses(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    fleet = LiveFleet(logs=tmp_path)
    try:
        fleet.controller()
        fleet.worker("worker", delay=0.1)
        a_proc = fleet.api("api-a", "--redis-url", redis_server.url, "--api-keys", KEYS, "--admin-keys", ADMIN)
        fleet.api("api-b", "--redis-url", redis_server.url, "--api-keys", KEYS, "--admin-keys", ADMIN)
        a_url, b_url = fleet.url["api-a"], fleet.url["api-b"]
        for url in (a_url, b_url):
            await apoll(lambda: _serving(url), what=f"{url} seeing the worker", timeout=30, interval=0.2)
        a, b = sdk(a_url, "sk-a"), sdk(b_url, "sk-a")
        made = await a.responses.create(model=M, input="hello", temperature=0)
        assert (await b.responses.retrieve(made.id)).output_text == made.output_text
        follow = await b.responses.create(model=M, input="more", previous_response_id=made.id, temperature=0)
        assert (await a.responses.retrieve(follow.id)).previous_response_id == made.id
        with pytest.raises(openai.NotFoundError):
            await sdk(b_url, "sk-b").responses.retrieve(made.id)

        # A background response run by A, followed on B to its end.
        short = await a.responses.create(model=M, input="count", background=True, temperature=0)
        events = [e async for e in await b.responses.retrieve(short.id, stream=True)]
        assert events[-1].type == "response.completed" and [e.sequence_number for e in events] == list(range(len(events)))

        # A long one run by A, cancelled on B: A stops writing its events.
        long = await a.responses.create(model=M, input="😀" * 40, background=True)  # 141 tokens: 14 s

        # Followed on B while it runs: the first events arrive (the stream would go on for minutes).
        async with httpx.AsyncClient(timeout=20) as http, http.stream(
            "GET", f"{b_url}/v1/responses/{long.id}", params={"stream": "true"}, headers={"authorization": "Bearer sk-a"}
        ) as live:
            names = []
            async for line in live.aiter_lines():
                if line.startswith("event: "):
                    names.append(line.removeprefix("event: "))
                if len(names) == 6:
                    break
        assert names[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in names
        assert (await b.responses.cancel(long.id)).status == "cancelled"
        cancelled_at = time.monotonic()

        async def settled() -> bool:  # A found the cancel: its event count stops growing
            before = await _count(b, long.id)
            await _pause(2.5)
            return await _count(b, long.id) == before

        await apoll(settled, what="A stopping the cancelled response", timeout=20, interval=0.1)
        assert time.monotonic() - cancelled_at < 9  # well before it would have ended by itself
        kinds = [e.type async for e in await b.responses.retrieve(long.id, stream=True)]
        assert "response.completed" not in kinds and len(kinds) < 100
        assert (await a.responses.retrieve(long.id)).status == "cancelled"
        assert "cancelled elsewhere" in a_proc.log.read_text()
    finally:
        fleet.stop()
        redis_server.stop()


async def _serving(url: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        ready = (await http.get(f"{url}/ready", headers={"authorization": f"Bearer {ADMIN}"})).json()
    return bool(ready.get("workers") == {M: 1})


async def _count(client: openai.AsyncOpenAI, response_id: str) -> int:
    return len([e async for e in await client.responses.retrieve(response_id, stream=True)])


async def _pause(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)  # time passing is what is tested: A's heartbeat comes each second
