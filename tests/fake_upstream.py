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
