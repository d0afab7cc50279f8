"""A model load that would not fit in memory is refused (409 insufficient_memory, naming the
model and the sizes) and one that runs out of memory midway is freed and refused the same way,
while the other models served by the same process keep answering; on the fake engine, with the
memory the guard reads set by the test."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.fake import FakeEngine
from chatgate.errors import InsufficientMemoryError, StartupError
from chatgate.settings import ServeSettings
from tests.support.app import raw, running, sdk
from tests.support.memory import GIB, SetMemory

pytestmark = pytest.mark.anyio

ADMIN, USER = "sk-admin", "sk-user"


class FailingLoad(FakeEngine):
    """A fake model whose next loads run out of memory after taking some (`failures` of them)."""

    def __init__(self, *, failures: int, error: BaseException, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.error = error
        self.partial: bytearray | None = None  # what a failed load had taken
        self.unloads = 0

    async def start(self) -> None:
        if self.failures:
            self.failures -= 1
            self.partial = bytearray(1 << 20)
            raise self.error

    async def unload(self) -> None:
        self.unloads += 1
        self.partial = None


def serve(*engines: FakeEngine, memory: SetMemory, **settings: Any) -> FastAPI:
    config = ServeSettings(responses_store="memory", api_keys=[USER], admin_keys=[ADMIN], **settings)
    return create_api_app(config, local_pool(config, engines=list(engines), memory=memory))


async def _post(app: FastAPI, path: str, body: Any, key: str = ADMIN) -> httpx.Response:
    async with raw(app) as http:
        return await http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


async def _models(app: FastAPI) -> set[str]:
    return {m.id async for m in sdk(app, USER).models.list()}


async def _stream(app: FastAPI, model: str) -> str:
    text = ""
    chunks = await sdk(app, USER).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=60, temperature=0
    )
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


async def _ask(app: FastAPI, model: str) -> str:
    answer = await sdk(app, USER).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], temperature=0
    )
    return answer.choices[0].message.content or ""


async def _generating(engine: FakeEngine) -> None:
    """Wait until `engine` is generating (the in-process transport hands over a stream whole)."""
    for _ in range(1000):
        if engine.active:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stream did not start")


def _refusal(response: httpx.Response, model: str) -> str:
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "insufficient_memory", "model")
    assert f"`{model}`" in error["message"]
    return str(error["message"])


async def test_a_load_that_would_not_fit_is_refused_while_another_models_stream_goes_on() -> None:
    memory = SetMemory(64 * GIB)
    big = FakeEngine(name="big", weights_bytes=3 * GIB)
    small = FakeEngine(name="small", token_delay=0.05)
    async with running(serve(big, small, memory=memory, memory_headroom_gib=0.5)) as app:
        assert (await _post(app, "/v1/models/unload", {"model": "big"})).status_code == 200
        streaming = asyncio.create_task(_stream(app, "small"))
        await _generating(small)
        memory.available_bytes = 3 * GIB  # 3 GiB of weights fit, but not with 0.5 GiB to spare
        refused = await _post(app, "/v1/models/load", {"model": "big"})
        message = _refusal(refused, "big")
        assert "3.00 GiB" in message and "0.50 GiB" in message and "(3.00 GiB)" in message, message
        assert small.active == 1 and not streaming.done()  # refused while the other stream runs
        assert (await streaming).endswith("done.")
        assert await _models(app) == {"small"}  # big stays unloaded; small still served
        memory.available_bytes = 4 * GIB
        loaded = await _post(app, "/v1/models/load", {"model": "big"})
        assert loaded.status_code == 200, loaded.text
        assert await _models(app) == {"big", "small"}


async def test_the_check_can_be_turned_off_and_stops_a_start_that_does_not_fit() -> None:
    memory = SetMemory(1 * GIB)
    big = FakeEngine(name="big", weights_bytes=2 * GIB)
    async with running(serve(big, FakeEngine(name="small"), memory=memory, memory_check=False)) as app:
        assert (await _post(app, "/v1/models/unload", {"model": "big"})).status_code == 200
        assert (await _post(app, "/v1/models/load", {"model": "big"})).status_code == 200  # not checked
    with pytest.raises(StartupError, match="`big`"):  # checked, a model that does not fit stops the start
        async with running(serve(FakeEngine(name="big", weights_bytes=2 * GIB), memory=memory)):
            pass


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
async def test_a_load_that_runs_out_of_memory_midway_is_freed_and_refused(error: BaseException) -> None:
    memory = SetMemory(64 * GIB)
    flaky = FailingLoad(name="flaky", failures=0, error=error, weights_bytes=1 * GIB)
    small = FakeEngine(name="small", token_delay=0.05)
    async with running(serve(flaky, small, memory=memory)) as app:
        assert (await _post(app, "/v1/models/unload", {"model": "flaky"})).status_code == 200
        flaky.failures, unloads = 1, flaky.unloads
        streaming = asyncio.create_task(_stream(app, "small"))
        await _generating(small)
        refused = await _post(app, "/v1/models/load", {"model": "flaky"})
        assert "ran out of memory" in _refusal(refused, "flaky")
        assert flaky.partial is None and flaky.unloads == unloads + 1  # what it had taken was freed
        assert await _models(app) == {"small"}  # marked unloaded: not listed, not routed to
        with pytest.raises(openai.NotFoundError):
            await _ask(app, "flaky")
        assert (await streaming).endswith("done.")
        again = await _post(app, "/v1/models/load", {"model": "flaky"})  # enough memory now
        assert again.status_code == 200, again.text
        assert (await _ask(app, "flaky")).endswith("done.")


async def test_a_start_that_runs_out_of_memory_names_the_model_and_frees_it() -> None:
    flaky = FailingLoad(name="flaky", failures=1, error=MemoryError())
    with pytest.raises(StartupError, match="Loading the model `flaky` ran out of memory"):
        async with running(serve(flaky, memory=SetMemory(64 * GIB))):
            pass
    assert flaky.partial is None and flaky.unloads == 1


async def test_a_load_that_fails_otherwise_is_not_called_out_of_memory() -> None:
    flaky = FailingLoad(name="flaky", failures=0, error=RuntimeError("bad weights"))
    async with running(serve(flaky, FakeEngine(name="small"), memory=SetMemory(64 * GIB))) as app:
        assert (await _post(app, "/v1/models/unload", {"model": "flaky"})).status_code == 200
        flaky.failures = 1
        failed = await _post(app, "/v1/models/load", {"model": "flaky"})
        assert failed.status_code == 500 and failed.json()["error"]["code"] != "insufficient_memory", failed.text
        assert await _models(app) == {"small"}


async def test_the_reload_after_idle_unload_is_refused_when_memory_is_short() -> None:
    memory = SetMemory(64 * GIB)
    idle = FailingLoad(name="idle", failures=0, error=MemoryError(), weights_bytes=2 * GIB)
    async with running(serve(idle, FakeEngine(name="small"), memory=memory, idle_unload=0.2)) as app:
        for _ in range(100):  # freed after 0.2 s without requests (checked every 0.2 s)
            if idle.unloads:
                break
            await asyncio.sleep(0.05)
        assert idle.unloads == 1
        memory.available_bytes = 1 * GIB
        with pytest.raises(openai.ConflictError) as refused:
            await _ask(app, "idle")
        assert refused.value.code == "insufficient_memory" and "`idle`" in refused.value.message
        assert "idle" in await _models(app)  # still listed: a later request tries the load again
        memory.available_bytes = 64 * GIB
        assert (await _ask(app, "idle")).endswith("done.")
