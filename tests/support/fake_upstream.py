"""An OpenAI-compatible upstream in the test process (`httpx.MockTransport`), and the worker
pool that serves it through chatgate's `openai` engine, as `serve --engine openai` does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from chatgate.api.workers.base import PoolSource, WorkerPool
from chatgate.api.workers.local import LocalPool
from chatgate.upstream.service import UpstreamService
from chatgate.upstream.tokens import TokenCounter
from chatgate.worker.queue import RequestQueue

URL = "http://operator:hunter2-secret@upstream.internal:8001/v1"
API_KEY = "sk-operator-0123456789abcdef-wxyz"


def sse_response(events: list[dict[str, Any]], *, delay: float = 0.01) -> httpx.Response:
    """A 200 event stream of `events`, one every `delay` seconds, then `[DONE]`."""

    async def body() -> AsyncIterator[bytes]:
        for event in events:
            await asyncio.sleep(delay)  # a token at a time, as a real server streams
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})


def upstream_pool(
    handler: Callable[[httpx.Request], httpx.Response], *, model: str = "fake-model", url: str = URL, api_key: str = API_KEY
) -> PoolSource:
    """A pool serving `model` from the upstream `handler` answers for."""

    @contextlib.asynccontextmanager
    async def pool() -> AsyncIterator[WorkerPool]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            service = UpstreamService(
                http=http, url=url, model_names=[model], upstream_model=None, context_length=(4096, "flag"),
                counter=TokenCounter(), queue=RequestQueue(model=model, limit=8), api_key=api_key,
            )
            yield LocalPool([service])

    return pool


THOUGHTS = ["The user ", "greets me."]
WORDS = ["Hello", " there!"]


def thinking_upstream(
    received: list[dict[str, Any]], *, field: str = "reasoning_content"
) -> Callable[[httpx.Request], httpx.Response]:
    """A reasoning model's chat server, as vLLM streams one with a reasoning parser: thinking
    deltas under `field` (vLLM's older `reasoning_content` or newer `reasoning`), then content,
    then usage with the thinking tokens counted. The request bodies go to `received`."""

    def handle(request: httpx.Request) -> httpx.Response:
        received.append(json.loads(request.content))
        deltas = [{"role": "assistant", "content": ""}] + [{field: t} for t in THOUGHTS] + [{"content": w} for w in WORDS]
        events: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11, "completion_tokens_details": {"reasoning_tokens": 2}}
        events.append({"choices": [], "usage": usage})
        return sse_response(events, delay=0)

    return handle
