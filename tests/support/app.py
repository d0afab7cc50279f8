"""The whole API stack in one process, and the typed helpers tests call it with (SDK, raw HTTP).

The helpers for the openai SDK are typed so tests type-check under `mypy --strict`: annotate
message lists as `Messages` (or build one with `user("...")`), tools with `function_tool`,
`response_format` with `json_schema_format`, and narrow returned tool calls with `function_calls`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import httpx
import httpx2
import openai
from fastapi import FastAPI
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)
from openai.types.shared_params import ResponseFormatJSONSchema

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.base import Engine
from chatgate.settings import ServeSettings

Target = FastAPI | str
"""Where a test's requests go: an app in this process, or a live server's base URL."""


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    """Run the app's lifespan around a test."""
    async with app.router.lifespan_context(app):
        yield app


def make_app(*engines: Engine, **settings: Any) -> FastAPI:
    """An API app serving `engines` in-process; `settings` are `ServeSettings` fields (stored
    responses in memory unless they say otherwise: tests leave no file in the cache)."""
    serve = ServeSettings(**{"responses_store": "memory", **settings})
    return create_api_app(serve, local_pool(serve, engines=list(engines)))


def sdk(app: Target, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    """The official SDK, talking to `app` without a network (or to a live server at that URL)."""
    if isinstance(app, str):
        # No kept-alive connections: a client the test never closes leaves nothing for the
        # garbage collector to close on a later test's event loop.
        http = httpx2.AsyncClient(timeout=300, limits=httpx2.Limits(max_keepalive_connections=0))
        return openai.AsyncOpenAI(base_url=f"{app}/v1", api_key=api_key, http_client=http, max_retries=0)
    transport = httpx2.ASGITransport(app=app)
    http_client = httpx2.AsyncClient(transport=transport, base_url="http://chatgate")
    return openai.AsyncOpenAI(
        base_url="http://chatgate/v1", api_key=api_key, http_client=http_client, max_retries=0
    )


Messages = list[ChatCompletionMessageParam]
"""A conversation as the SDK takes it: `ASK: Messages = [{"role": "user", "content": "..."}]`."""


def user(content: str) -> Messages:
    """A one-turn conversation: `messages=user("hi")`."""
    return [{"role": "user", "content": content}]


def as_dicts(items: Iterable[Mapping[str, object]]) -> list[dict[str, Any]]:
    """SDK params (messages, tools) as the plain dicts an engine renders: `engine.render_chat(as_dicts(USER))`."""
    return [dict(item) for item in items]


def function_tool(name: str, description: str, parameters: dict[str, object]) -> ChatCompletionFunctionToolParam:
    """A `tools` entry offering one function."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def json_schema_format(name: str, schema: dict[str, object], strict: bool = True) -> ResponseFormatJSONSchema:
    """A JSON-schema `response_format`."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def function_calls(message: ChatCompletionMessage) -> list[ChatCompletionMessageFunctionToolCall]:
    """A reply's tool calls, each checked to be a function call (the SDK also types custom-tool calls)."""
    calls = message.tool_calls or []
    assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls), calls
    return [call for call in calls if isinstance(call, ChatCompletionMessageFunctionToolCall)]


def raw(app: Target) -> httpx.AsyncClient:
    """A raw HTTP client for `app` (or a live server at that URL)."""
    if isinstance(app, str):
        return httpx.AsyncClient(base_url=app, timeout=300)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatgate")
