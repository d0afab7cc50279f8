"""Tokens per minute are charged for the tokens a request actually used, streamed or not,
finished or left early, whatever the engine: also through an `openai` upstream, which reports
usage only in its stream's last event (or never)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.fake import FakeEngine
from chatgate.settings import ServeSettings
from tests.support.app import raw, running
from tests.support.asgi import scope
from tests.support.fake_upstream import sse_response, upstream_pool
from tests.support.polling import apoll

pytestmark = pytest.mark.anyio

M = "fake-model"
KEY = "sk-metered"
BUDGET = 100_000
WORDS = 30  # tokens the upstream streams, one per event
UPSTREAM_USAGE = {"prompt_tokens": 9, "completion_tokens": WORDS, "total_tokens": 9 + WORDS}


def upstream(*, usage: bool) -> Callable[[httpx.Request], httpx.Response]:
    """An OpenAI-compatible chat server: one word per event, usage (if at all) after the last."""

    def handle(request: httpx.Request) -> httpx.Response:
        deltas = [{"role": "assistant", "content": ""}] + [{"content": f"w{i} "} for i in range(WORDS)]
        events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if usage:
            events.append({"choices": [], "usage": UPSTREAM_USAGE})
        return sse_response(events)

    return handle


def metered_app(tmp_path: Path, engine: str, *, usage: bool = True) -> FastAPI:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({KEY: {"tpm": BUDGET}}))
    settings = ServeSettings(api_keys_file=keys)
    if engine == "openai":
        return create_api_app(settings, upstream_pool(upstream(usage=usage)))
    return create_api_app(settings, local_pool(settings, engines=[FakeEngine(token_delay=0.01)]))


async def charged(app: FastAPI) -> int:
    """Tokens charged to the key so far (what the next request's headers say is gone)."""
    async with raw(app) as http:
        response = await http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return BUDGET - int(response.headers["x-ratelimit-remaining-tokens"])


async def leave_after(app: FastAPI, body: dict[str, Any], pieces: int) -> None:
    """Stream a chat and disconnect once `pieces` chunks of content have arrived."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    leave = asyncio.Event()
    seen = 0

    async def receive() -> MutableMapping[str, Any]:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal seen
        if message["type"] == "http.response.body":
            text = message.get("body", b"")
            seen += text.count(b'"content":"') - text.count(b'"content":""')
            if seen >= pieces:
                leave.set()

    await asyncio.wait_for(app(scope("/v1/chat/completions", [(b"authorization", f"Bearer {KEY}".encode())]), receive, send), 10)


CHAT = {"model": M, "messages": [{"role": "user", "content": "count for me"}], "max_tokens": 50}


@pytest.mark.parametrize("engine", ["fake", "openai"])
async def test_a_stream_left_early_is_charged_for_what_it_got(tmp_path: Path, engine: str) -> None:
    async with running(metered_app(tmp_path, engine)) as app:
        await leave_after(app, {**CHAT, "stream": True}, pieces=3)
        # Charged when the generation is closed, just after the client left.
        await apoll(lambda: _at_least(app, 3), what="the delivered tokens charged", timeout=5)
        left = await charged(app)
        async with raw(app) as http:  # the whole reply costs more: the rest was never generated
            whole = await http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"})
        assert left < whole.json()["usage"]["total_tokens"]


async def _at_least(app: FastAPI, tokens: int) -> bool:
    return await charged(app) >= tokens


async def test_an_upstream_that_never_reports_usage_is_charged_what_it_streamed(tmp_path: Path) -> None:
    async with running(metered_app(tmp_path, "openai", usage=False)) as app, raw(app) as http:
        response = await http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == WORDS
        assert await charged(app) >= WORDS + 1  # every word, and the prompt as counted here


async def test_an_upstreams_own_usage_is_what_a_finished_stream_is_charged(tmp_path: Path) -> None:
    async with running(metered_app(tmp_path, "openai")) as app, raw(app) as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
        assert await charged(app) == UPSTREAM_USAGE["total_tokens"]
