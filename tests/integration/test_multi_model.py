"""`chatgate serve --model A --model B`: every model in /v1/models, each request on its own
model's engine (built from its own --model settings), a name served twice refused at start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI

import chatgate.engines
from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.base import Engine
from chatgate.engines.fake import FakeEngine
from chatgate.errors import StartupError
from chatgate.settings import EngineSettings, ServeSettings
from tests.support.app import raw, running, sdk

pytestmark = pytest.mark.anyio

SPECS = ["one engine=fake model-names=alpha fake-token-delay=0.002", "two engine=fake model-names=beta,b2 max-running=2"]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[EngineSettings, Engine]]:
    """The engines `serve` builds, by model path, with the settings each was built from."""
    engines: dict[str, tuple[EngineSettings, Engine]] = {}
    create = chatgate.engines.create_engine

    def recording(settings: EngineSettings) -> Engine:
        engine = create(settings)
        engines[settings.model_path] = (settings, engine)
        return engine

    monkeypatch.setattr(chatgate.engines, "create_engine", recording)
    return engines


def serve_app(specs: list[str], **settings: Any) -> FastAPI:
    serve = ServeSettings(model=specs, embedding_model_path="none", **settings)
    return create_api_app(serve, local_pool(serve))


@pytest.fixture
async def two(built: dict[str, tuple[EngineSettings, Engine]]) -> AsyncIterator[FastAPI]:
    async with running(serve_app(SPECS)) as app:
        yield app


async def test_models_lists_every_name_of_every_model(two: FastAPI) -> None:
    listed = [m.id async for m in sdk(two).models.list()]
    assert sorted(listed) == ["alpha", "b2", "beta"]


async def test_each_request_runs_on_its_own_models_engine(two: FastAPI, built: dict[str, tuple[EngineSettings, Engine]]) -> None:
    (one_settings, one), (two_settings, other) = built["one"], built["two"]
    assert isinstance(one, FakeEngine) and isinstance(other, FakeEngine)
    assert (one_settings.fake_token_delay, two_settings.max_running) == (0.002, 2)  # each its own settings
    client = sdk(two)
    for name in ["alpha", "beta", "b2", "beta"]:
        reply = await client.completions.create(model=name, prompt=f"hello {name}", max_tokens=4)
        assert reply.model == name
    assert (one.served, other.served) == (1, 3)
    streams = await asyncio.gather(*(
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        for name in ["alpha", "beta", "alpha"]
    ))
    assert [s.model for s in streams] == ["alpha", "beta", "alpha"] and (one.served, other.served) == (3, 4)


async def test_an_unknown_model_is_a_404_naming_it(two: FastAPI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk(two).completions.create(model="gamma", prompt="x", max_tokens=2)
    assert "gamma" in str(caught.value)
    async with raw(two) as http:
        r = await http.post("/tokenize", json={"model": "gamma", "prompt": "x"})
    assert r.status_code == 404


async def test_two_models_under_one_name_stop_the_start(built: dict[str, tuple[EngineSettings, Engine]]) -> None:
    # Both fakes answer to the fake engine's default name: settings cannot know it, the pool refuses it.
    with pytest.raises(StartupError, match="two models are served under the name 'fake-model'"):
        async with running(serve_app(["one engine=fake", "two engine=fake"])):
            pass
    assert all(not engine.active for _, engine in built.values() if isinstance(engine, FakeEngine))
