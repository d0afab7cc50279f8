"""Shared fixtures: the whole API stack in one process, reached through in-process transports."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.base import Engine
from chatgate.engines.fake import FakeEngine
from chatgate.settings import ServeSettings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    """Run the app's lifespan around a test."""
    async with app.router.lifespan_context(app):
        yield app


def make_app(*engines: Engine, **settings: object) -> FastAPI:
    """An API app serving `engines` in-process."""
    serve = ServeSettings(**settings)  # type: ignore[arg-type]
    return create_api_app(serve, local_pool(serve, engines=list(engines)))


def sdk(app: FastAPI, api_key: str = "sk-test") -> openai.AsyncOpenAI:
    """The official SDK, talking to `app` without a network."""
    transport = httpx2.ASGITransport(app=app)
    http_client = httpx2.AsyncClient(transport=transport, base_url="http://chatgate")
    return openai.AsyncOpenAI(
        base_url="http://chatgate/v1", api_key=api_key, http_client=http_client, max_retries=0
    )


def raw(app: FastAPI) -> httpx.AsyncClient:
    """A raw HTTP client for `app`."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chatgate")


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(name="fake-model", context_length=1024)


@pytest.fixture
async def fake_app(fake_engine: FakeEngine) -> AsyncIterator[FastAPI]:
    async with running(make_app(fake_engine)) as app:
        yield app


@pytest.fixture(scope="session")
def chat_engine() -> Engine:
    """The default chat model, loaded once per test session (each app starts and stops it)."""
    from chatgate.engines.transformers import TransformersEngine
    from chatgate.settings import EngineSettings

    return TransformersEngine(EngineSettings())


@pytest.fixture
async def chat_app(chat_engine: Engine) -> AsyncIterator[FastAPI]:
    """An API app serving the real default chat model."""
    async with running(make_app(chat_engine)) as app:
        yield app
