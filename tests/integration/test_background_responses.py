"""`background: true` on the default SQLite store, with the `openai` SDK and raw HTTP: the reply
is the response queued, GET follows it to its end (the same answer as in the foreground), a
background stream resumes with `starting_after`, `cancel` stops the generation and keeps it
`cancelled`, the work is charged to the key, bounded per key and per server (a flood gets
429s), other keys get 404 everywhere, and shutdown keeps running ones as cancelled."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from openai.types.responses import ResponseCompletedEvent, ResponseCreatedEvent

from chatgate.api.stored.backend import Bounds
from chatgate.api.stored.sqlite import SqliteBackend
from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running, sdk
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

M = "fake-model"
SLOW = 0.2  # seconds per token of the slow engine: LONG's answer (141 tokens) runs for 28 s
LONG = "😀" * 40  # the fake model echoes it: its longest answer


def settings(tmp_path: Path, **more: Any) -> dict[str, Any]:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-a": {"tpm": 1_000_000}, "sk-b": {}}))
    return {"api_keys_file": keys, "responses_store": "sqlite", "responses_path": tmp_path / "r.sqlite3", **more}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(name=M, token_delay=0.01)


@pytest.fixture
def slow() -> FakeEngine:
    return FakeEngine(name=M, token_delay=SLOW)


@pytest.fixture
async def app(engine: FakeEngine, tmp_path: Path) -> AsyncIterator[FastAPI]:
    async with running(make_app(engine, **settings(tmp_path, responses_max_background_per_key=3))) as made:
        yield made


@pytest.fixture
async def slow_app(slow: FakeEngine, tmp_path: Path) -> AsyncIterator[FastAPI]:
    async with running(make_app(slow, **settings(tmp_path, responses_max_background_per_key=3))) as made:
        yield made


async def finished(client: openai.AsyncOpenAI, response_id: str) -> Any:
    """The response once it is no longer queued or in progress."""
    seen: list[Any] = []

    async def ended() -> bool:
        seen.append(await client.responses.retrieve(response_id))
        return seen[-1].status not in ("queued", "in_progress")

    await apoll(ended, what=f"{response_id} ending", timeout=30, interval=0.1)
    return seen[-1]


async def test_a_background_response_runs_after_its_reply(app: FastAPI, engine: FakeEngine) -> None:
    client = sdk(app, "sk-a")
    queued = await client.responses.create(model=M, input="hello there", background=True, temperature=0)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    done = await finished(client, queued.id)
    assert done.status == "completed" and done.background is True and done.id == queued.id
    foreground = await client.responses.create(model=M, input="hello there", temperature=0, store=False)
    assert done.output_text == foreground.output_text and done.usage is not None
    assert [i.type for i in (await client.responses.input_items.list(queued.id)).data] == ["message"]
    follow = await client.responses.create(model=M, input="and then?", previous_response_id=queued.id, temperature=0)
    assert follow.usage is not None and done.usage is not None and follow.usage.input_tokens > done.usage.input_tokens
    # Its events replay as they were made: the created event says in_progress, the last completed.
    events = [e async for e in await client.responses.retrieve(queued.id, stream=True)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed" and "".join(getattr(e, "delta", "") for e in events if e.type == "response.output_text.delta") == done.output_text


async def test_a_background_stream_resumes_after_the_last_event_seen(app: FastAPI) -> None:
    client = sdk(app, "sk-a")
    stream = await client.responses.create(model=M, input="count slowly", background=True, stream=True, temperature=0)
    seen = []
    async for event in stream:
        seen.append(event)
        if len(seen) == 5:
            break  # the connection drops
    await stream.close()
    first = seen[0]
    assert isinstance(first, ResponseCreatedEvent)
    response_id = first.response.id
    rest = [e async for e in await client.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number)]
    assert [e.sequence_number for e in rest] == list(range(5, 5 + len(rest)))
    last = rest[-1]
    assert isinstance(last, ResponseCompletedEvent)
    text = "".join(getattr(e, "delta", "") for e in [*seen, *rest] if e.type == "response.output_text.delta")
    assert text == last.response.output_text


async def test_cancel_stops_the_generation(slow_app: FastAPI, slow: FakeEngine) -> None:
    client = sdk(slow_app, "sk-a")
    queued = await client.responses.create(model=M, input=LONG, background=True)

    async def running_now() -> bool:
        return slow.active == 1 and (await client.responses.retrieve(queued.id)).status == "in_progress"

    await apoll(running_now, what="the background response running", timeout=10)
    with pytest.raises(openai.BadRequestError) as caught:  # its conversation has not ended yet
        await client.responses.create(model=M, input="go on", previous_response_id=queued.id)
    assert caught.value.param == "previous_response_id"
    cancelled = await client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.id == queued.id
    await apoll(lambda: slow.active == 0, what="the generation stopping", timeout=5)
    assert (await client.responses.retrieve(queued.id)).status == "cancelled"
    assert (await client.responses.cancel(queued.id)).status == "cancelled"  # again: the same


async def test_only_a_running_background_response_can_be_cancelled(app: FastAPI) -> None:
    client = sdk(app, "sk-a")
    done = await finished(client, (await client.responses.create(model=M, input="hi", background=True)).id)
    foreground = await client.responses.create(model=M, input="hi")
    for response_id in (done.id, foreground.id):
        with pytest.raises(openai.BadRequestError):
            await client.responses.cancel(response_id)
    assert (await client.responses.retrieve(done.id)).status == "completed"
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_nope")


async def test_another_key_gets_404_everywhere(slow_app: FastAPI) -> None:
    app = slow_app
    a, b = sdk(app, "sk-a"), sdk(app, "sk-b")
    queued = await a.responses.create(model=M, input="secret " + LONG, background=True)
    for attempt in (
        b.responses.retrieve(queued.id), b.responses.cancel(queued.id), b.responses.delete(queued.id),
        b.responses.input_items.list(queued.id), b.responses.create(model=M, input="x", previous_response_id=queued.id),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            await attempt
        assert "secret" not in str(caught.value.body)
    assert (await a.responses.retrieve(queued.id)).status in ("queued", "in_progress")  # untouched
    async with raw(app) as http:
        assert (await http.post(f"/v1/responses/{queued.id}/cancel")).status_code == 401
        r = await http.post(f"/v1/responses/{'x' * 5000}/cancel", headers={"authorization": "Bearer sk-a"})
        assert r.status_code == 404 and len(r.text) < 1000
    await a.responses.cancel(queued.id)


async def test_background_needs_store(app: FastAPI) -> None:
    async with raw(app) as http:
        r = await http.post("/v1/responses", json={"model": M, "input": "hi", "background": True, "store": False},
                            headers={"authorization": "Bearer sk-a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "background", r.text


async def test_a_flood_of_background_responses_is_bounded_per_key(slow_app: FastAPI) -> None:
    app = slow_app
    a, b = sdk(app, "sk-a"), sdk(app, "sk-b")
    started = [await a.responses.create(model=M, input=LONG, background=True) for _ in range(3)]
    for _ in range(5):
        with pytest.raises(openai.RateLimitError) as caught:
            await a.responses.create(model=M, input=LONG, background=True)
        assert "background" in str(caught.value.body)
    other = await b.responses.create(model=M, input="x", background=True, max_output_tokens=5)  # another key's own
    await a.responses.cancel(started[0].id)

    async def admitted() -> bool:
        try:
            started.append(await a.responses.create(model=M, input="x", background=True, max_output_tokens=5))
        except openai.RateLimitError:
            return False
        return True

    await apoll(admitted, what="a slot freed by the cancel", timeout=10, interval=0.1)
    for response in started[1:3]:
        await a.responses.cancel(response.id)
    assert (await finished(b, other.id)).status == "incomplete"  # cut at its max_output_tokens


async def test_the_server_bound_holds_for_all_keys(slow: FakeEngine, tmp_path: Path) -> None:
    async with running(make_app(slow, **settings(tmp_path, responses_max_background=2))) as app:
        a, b = sdk(app, "sk-a"), sdk(app, "sk-b")
        await a.responses.create(model=M, input=LONG, background=True)
        await b.responses.create(model=M, input=LONG, background=True)
        with pytest.raises(openai.RateLimitError):
            await b.responses.create(model=M, input="x", background=True)


async def test_background_work_is_charged_to_the_key(app: FastAPI) -> None:
    client = sdk(app, "sk-a")

    async def charged() -> int:
        async with raw(app) as http:
            r = await http.get("/v1/models", headers={"authorization": "Bearer sk-a"})
        return 1_000_000 - int(r.headers["x-ratelimit-remaining-tokens"])

    before = await charged()
    done = await finished(client, (await client.responses.create(model=M, input="hello", background=True)).id)
    assert done.usage is not None
    await apoll(lambda: _at_least(charged, before + done.usage.total_tokens), what="the tokens charged", timeout=5)


async def _at_least(count: Any, floor: int) -> bool:
    return bool(await count() >= floor)


async def test_shutdown_keeps_running_ones_as_cancelled(slow: FakeEngine, tmp_path: Path) -> None:
    async with running(make_app(slow, **settings(tmp_path))) as app:
        client = sdk(app, "sk-a")
        queued = await client.responses.create(model=M, input=LONG, background=True)
        await apoll(lambda: slow.active == 1, what="the background response running", timeout=10)
    assert slow.active == 0
    backend = await SqliteBackend.open(tmp_path / "r.sqlite3", Bounds(ttl=3600, max_count=10, max_bytes=10**7))
    record = await backend.get(queued.id)
    assert record is not None and record.status == "cancelled"
    await backend.close()


@pytest.mark.model
async def test_background_on_the_real_model(chat_engine: Any, tmp_path: Path) -> None:
    real = "SmolLM2-135M-Instruct"
    async with running(make_app(chat_engine, **settings(tmp_path))) as app:
        client = sdk(app, "sk-a")
        queued = await client.responses.create(model=real, input="What is the capital of France?", background=True,
                                               temperature=0, max_output_tokens=30)
        done = await finished(client, queued.id)
        assert done.status in ("completed", "incomplete") and "Paris" in done.output_text
        events = [e async for e in await client.responses.retrieve(queued.id, stream=True)]
        assert "".join(getattr(e, "delta", "") for e in events if e.type == "response.output_text.delta") == done.output_text
        story = await client.responses.create(model=real, input="Write a very long story about a dragon.", background=True,
                                              temperature=0, max_output_tokens=2000)
        await apoll(lambda: _status_is(client, story.id, "in_progress"), what="the story running", timeout=60, interval=0.1)
        assert (await client.responses.cancel(story.id)).status == "cancelled"
        kept = await client.responses.retrieve(story.id)
        assert kept.status == "cancelled" and kept.usage is None  # stopped before its end
        counts: list[int] = []

        async def stopped() -> bool:  # its events no longer grow: the generation ended
            counts.append(len([e async for e in await client.responses.retrieve(story.id, stream=True)]))
            return len(counts) > 1 and counts[-1] == counts[-2]

        await apoll(stopped, what="the story's generation stopping", timeout=30, interval=0.5)
        kinds = [e.type async for e in await client.responses.retrieve(story.id, stream=True)]
        assert "response.completed" not in kinds and "response.incomplete" not in kinds


async def _status_is(client: openai.AsyncOpenAI, response_id: str, status: str) -> bool:
    return bool((await client.responses.retrieve(response_id)).status == status)


async def test_two_apps_sharing_redis_cancel_each_others_work(redis_url: str, tmp_path: Path) -> None:
    on_a, on_b = FakeEngine(name=M, token_delay=SLOW), FakeEngine(name=M, token_delay=0.01)
    shared = {"redis_url": redis_url, "responses_store": "auto"}
    async with running(make_app(on_a, **settings(tmp_path, **shared))) as app_a, running(make_app(on_b, **settings(tmp_path, **shared))) as app_b:
        a, b = sdk(app_a, "sk-a"), sdk(app_b, "sk-a")
        queued = await a.responses.create(model=M, input=LONG, background=True)
        await apoll(lambda: _status_is(b, queued.id, "in_progress"), what="B seeing A run it", timeout=10, interval=0.05)
        assert on_a.active == 1 and on_b.active == 0
        assert (await b.responses.cancel(queued.id)).status == "cancelled"
        await apoll(lambda: on_a.active == 0, what="A finding the cancel and stopping", timeout=5)
        assert (await a.responses.retrieve(queued.id)).status == "cancelled"
        with pytest.raises(openai.NotFoundError):
            await sdk(app_b, "sk-b").responses.cancel(queued.id)
        follow = await b.responses.create(model=M, input="again", previous_response_id=queued.id)
        assert (await a.responses.retrieve(follow.id)).previous_response_id == queued.id
