"""An `openai` upstream's thinking passes through, streamed and not, under vLLM's older field
name (`reasoning_content`) and its newer one (`reasoning`), with its count of thinking tokens;
the templating fields reach the upstream only when the request set them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.settings import ServeSettings
from tests.support.app import raw, running, sdk, user
from tests.support.fake_upstream import THOUGHTS, WORDS, thinking_upstream, upstream_pool

pytestmark = pytest.mark.anyio

M = "fake-model"


@pytest.fixture(params=["reasoning_content", "reasoning"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FastAPI, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    app = create_api_app(ServeSettings(), upstream_pool(thinking_upstream(received, field=request.param)))
    async with running(app):
        yield app, received


async def test_the_upstreams_thinking_passes_through(upstream: tuple[FastAPI, list[dict[str, Any]]]) -> None:
    app, received = upstream
    r = await sdk(app).chat.completions.create(model=M, messages=user("hi"))
    message = r.choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == ("".join(THOUGHTS), "".join(WORDS))
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 2
    # Left at their defaults, the templating fields are not sent (a strict upstream may refuse them).
    assert not {"chat_template_kwargs", "add_generation_prompt", "continue_final_message", "reasoning_effort"} & set(received[0])


async def test_the_upstreams_thinking_streams_before_the_answer(upstream: tuple[FastAPI, list[dict[str, Any]]]) -> None:
    app, _ = upstream
    stream = await sdk(app).chat.completions.create(model=M, messages=user("hi"), stream=True, stream_options={"include_usage": True})
    parts: list[tuple[str, str]] = []
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if thought := getattr(choice.delta, "reasoning_content", None):
                parts.append(("reasoning", thought))
            if choice.delta.content:
                parts.append(("content", choice.delta.content))
    assert parts == [("reasoning", t) for t in THOUGHTS] + [("content", w) for w in WORDS]
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 2


async def test_responses_show_the_upstreams_thinking(upstream: tuple[FastAPI, list[dict[str, Any]]]) -> None:
    app, _ = upstream
    r = await sdk(app).responses.create(model=M, input="hi")
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output_text == "".join(WORDS)
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 2


async def test_templating_fields_reach_the_upstream(upstream: tuple[FastAPI, list[dict[str, Any]]]) -> None:
    app, received = upstream
    body = {
        "model": M, "messages": [*user("hi"), {"role": "assistant", "content": "Well"}],
        "chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "low",
        "add_generation_prompt": False, "continue_final_message": True,
    }
    async with raw(app) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    sent = received[-1]
    assert sent["chat_template_kwargs"] == {"enable_thinking": False} and sent["reasoning_effort"] == "low"
    assert (sent["add_generation_prompt"], sent["continue_final_message"]) == (False, True)
