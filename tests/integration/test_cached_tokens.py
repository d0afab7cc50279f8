"""`usage.prompt_tokens_details.cached_tokens` end to end on the fake engine (which reports cached
prompt tokens as a prefix cache of 16-token blocks would): chat, completions and Responses, streamed
usage, a prompt's `n` choices counted once, salts, and an upstream's own count passed through."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from chatgate.upstream.wire import upstream_usage
from tests.support.app import Messages, make_app, raw, running, sdk, user

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
SYSTEM = "You answer questions about the fleet. " * 12  # 456 bytes: 28 whole blocks of the fake's 16 tokens


def chat(question: str) -> Messages:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    async with running(make_app(FakeEngine(name=MODEL))) as app:
        yield app


async def test_chat_reports_the_shared_prefix_as_cached_and_a_new_prompt_as_none(app: FastAPI) -> None:
    client = sdk(app)
    first = await client.chat.completions.create(model=MODEL, messages=chat("one?"), max_tokens=2)
    second = await client.chat.completions.create(model=MODEL, messages=chat("two?"), max_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and len(SYSTEM) - 16 <= cached < second.usage.prompt_tokens
    assert cached % 16 == 0


async def test_streamed_usage_completions_and_responses_carry_cached_tokens(app: FastAPI) -> None:
    client = sdk(app)
    await client.chat.completions.create(model=MODEL, messages=chat("warm"), max_tokens=1)
    stream = await client.chat.completions.create(
        model=MODEL, messages=chat("streamed"), max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) >= len(SYSTEM) - 16
    text = SYSTEM + "complete this"
    await client.completions.create(model=MODEL, prompt=text, max_tokens=1)
    again = await client.completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens  # all of it, as whole blocks and the rest
    response = await client.responses.create(model=MODEL, instructions=SYSTEM, input="respond", max_output_tokens=16)
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens >= len(SYSTEM) - 16
    async with raw(app) as http:  # OpenAI always sends the details, 0 when nothing was cached
        body = (await http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("fresh words"), "max_tokens": 1})).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_n_choices_count_their_shared_prompt_once(app: FastAPI) -> None:
    client = sdk(app)
    fresh = await client.chat.completions.create(model=MODEL, messages=user("a new prompt, never sent"), max_tokens=1, n=3)
    assert fresh.usage is not None and fresh.usage.prompt_tokens_details is not None
    # The three copies find each other's blocks, but the prompt was not cached before the request.
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    await client.chat.completions.create(model=MODEL, messages=chat("n"), max_tokens=1)
    many = await client.chat.completions.create(model=MODEL, messages=chat("n"), max_tokens=1, n=4)
    one = await client.chat.completions.create(model=MODEL, messages=chat("n"), max_tokens=1)
    assert many.usage is not None and one.usage is not None
    assert many.usage.prompt_tokens_details is not None and one.usage.prompt_tokens_details is not None
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.prompt_tokens_details.cached_tokens == one.usage.prompt_tokens_details.cached_tokens
    assert (one.usage.prompt_tokens_details.cached_tokens or 0) > 0
    await client.completions.create(model=MODEL, prompt=SYSTEM, max_tokens=1)
    prompts = await client.completions.create(model=MODEL, prompt=[SYSTEM + "x", SYSTEM + "y"], max_tokens=1, n=2)
    assert prompts.usage is not None and prompts.usage.prompt_tokens_details is not None
    # Two prompts, each counted once: the blocks the system prompt filled, twice.
    assert prompts.usage.prompt_tokens_details.cached_tokens == 2 * (len(SYSTEM) // 16 * 16)


async def test_another_salt_reports_nothing_cached(app: FastAPI) -> None:
    client = sdk(app)
    await client.chat.completions.create(model=MODEL, messages=chat("salted"), max_tokens=1, extra_body={"cache_salt": "a"})
    same = await client.chat.completions.create(model=MODEL, messages=chat("salted"), max_tokens=1, extra_body={"cache_salt": "a"})
    other = await client.chat.completions.create(model=MODEL, messages=chat("salted"), max_tokens=1, extra_body={"cache_salt": "b"})
    assert same.usage is not None and other.usage is not None
    assert same.usage.prompt_tokens_details is not None and (same.usage.prompt_tokens_details.cached_tokens or 0) > 0
    assert other.usage.prompt_tokens_details is not None and other.usage.prompt_tokens_details.cached_tokens == 0


def test_an_upstream_s_cached_tokens_pass_through_and_bad_ones_count_as_unknown() -> None:
    base = {"prompt_tokens": 1200, "completion_tokens": 3, "total_tokens": 1203}
    assert upstream_usage(base | {"prompt_tokens_details": {"cached_tokens": 1024}}).cached_tokens == 1024
    assert upstream_usage(base).cached_tokens == 0
    for bad in (None, {"cached_tokens": None}, {"cached_tokens": -5}, {"cached_tokens": "many"}, {"cached_tokens": True}, "x"):
        usage = upstream_usage(base | {"prompt_tokens_details": bad})
        assert usage.cached_tokens == 0 and usage.prompt_tokens == 1200
