"""`/v1/models/load` and `/v1/models/unload` behind an admin key, the drain per model, the
heartbeat that tells the controller, and `--idle-unload` on the real default model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from chatgate.errors import InvalidRequestError
from chatgate.protocol.worker import GenerateParams, HeartBeat, RegisterWorker
from chatgate.settings import EngineSettings
from chatgate.worker.backend import open_backend
from chatgate.worker.heartbeat import Heartbeat
from chatgate.worker.served import ServedModels
from tests.support.app import make_app, raw, running, sdk
from tests.support.fake_lora import LoraFakeEngine
from tests.support.runners import runner_engine

pytestmark = pytest.mark.anyio

ADMIN, USER = "sk-admin", "sk-user"


async def _post(app: FastAPI, path: str, body: Any, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with raw(app) as http:
        return await http.post(path, json=body, headers=headers)


async def _models(app: FastAPI) -> list[str]:
    return [m.id async for m in sdk(app, USER).models.list()]


async def _ask(app: FastAPI, model: str) -> str:
    answer = await sdk(app, USER).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=0)
    return answer.choices[0].message.content or ""


def two_models(**settings: Any) -> FastAPI:
    return make_app(FakeEngine(), FakeEngine(name="other", token_delay=0.01), api_keys=[USER], admin_keys=[ADMIN], **settings)


async def test_unload_then_load_a_model_by_name() -> None:
    async with running(two_models()) as app:
        assert set(await _models(app)) == {"fake-model", "other"}
        unloaded = await _post(app, "/v1/models/unload", {"model": "other"})
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json() == {"object": "admin.result", "status": "unloaded", "model": "other"}
        assert await _models(app) == ["fake-model"]
        with pytest.raises(openai.NotFoundError):
            await _ask(app, "other")
        assert "Echo" in await _ask(app, "fake-model")  # the other model is untouched
        again = await _post(app, "/v1/models/unload", {"model": "other"})
        assert again.status_code == 200  # unloading an unloaded model changes nothing
        loaded = await _post(app, "/v1/models/load", {"model": "other"})
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
        assert set(await _models(app)) == {"fake-model", "other"}
        assert "Echo" in await _ask(app, "other")


@pytest.mark.parametrize(
    ("path", "body", "key", "status", "param"),
    [
        ("/v1/models/unload", {"model": "other"}, None, 401, None),
        ("/v1/models/unload", {"model": "other"}, USER, 403, None),
        ("/v1/models/load", {"model": "other"}, USER, 403, None),
        ("/v1/models/load", {"model": "/etc/passwd"}, ADMIN, 404, "model"),
        ("/v1/models/unload", {"model": "nobody"}, ADMIN, 404, "model"),
        ("/v1/models/load", {"model": ""}, ADMIN, 400, "model"),
        ("/v1/models/load", {"model": 5}, ADMIN, 400, "model"),
        ("/v1/models/load", {"model": "x" * 300}, ADMIN, 400, "model"),
        ("/v1/models/load", {}, ADMIN, 400, "model"),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"}, ADMIN, 400, "lora_path"),
        ("/v1/unload_lora_adapter", {"lora_name": "a"}, ADMIN, 404, "lora_name"),
        ("/v1/unload_lora_adapter", {"lora_name": "a"}, USER, 403, None),
    ],
)
async def test_admin_routes_refuse_clearly(path: str, body: Any, key: str | None, status: int, param: str | None) -> None:
    async with running(two_models()) as app:
        refused = await _post(app, path, body, key)
        assert refused.status_code == status, refused.text
        assert refused.json()["error"]["param"] == param
        assert set(await _models(app)) == {"fake-model", "other"}  # nothing served was hurt


async def test_requests_running_on_a_model_finish_before_it_unloads() -> None:
    other = FakeEngine(name="other", token_delay=0.01)
    async with running(make_app(FakeEngine(), other, api_keys=[USER], admin_keys=[ADMIN])) as app:
        asking = asyncio.create_task(_ask(app, "other"))  # ~30 tokens at 10 ms each
        while not other.active:
            await asyncio.sleep(0.01)
        unloaded = await _post(app, "/v1/models/unload", {"model": "other"})
        assert unloaded.status_code == 200
        # The unload returned only once the running generation had finished, whole.
        assert other.active == 0 and other.served == 1
        assert (await asking).endswith("done.")


async def test_the_heartbeat_registers_again_when_the_models_change() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    def controller(request: httpx.Request) -> httpx.Response:
        import json

        sent.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, json={"exist": True} if request.url.path == "/receive_heart_beat" else {"ok": True})

    async with open_backend(EngineSettings(engine="fake")) as service:
        async with httpx.AsyncClient(transport=httpx.MockTransport(controller)) as http:
            beat = Heartbeat(http=http, controller="http://controller", address="http://w", models=ServedModels([service]), interval=1)
            await beat.register()
            await beat.beat()
            await service.unload_model()
            await beat.beat()
            await service.load_model()
            await beat.beat()
    paths = [path for path, _ in sent]
    assert paths == ["/register_worker", "/receive_heart_beat", "/register_worker", "/register_worker"]
    statuses = [RegisterWorker.model_validate(body).worker_status for path, body in sent if path == "/register_worker"]
    names = [status.model_names if status is not None else None for status in statuses]
    assert names == [["fake-model"], [], ["fake-model"]]
    HeartBeat.model_validate(sent[1][1])


@pytest.mark.model
async def test_idle_unload_frees_the_model_and_the_next_request_loads_it() -> None:
    engine = runner_engine("torch")
    async with running(make_app(engine, idle_unload=1.0, embedding_model_path="none")) as app:
        first = await sdk(app).completions.create(model=engine.info.name, prompt="The capital of France is", max_tokens=8, temperature=0)
        deadline = time.monotonic() + 30
        while getattr(engine, "_loaded") is not None:  # freed after a second without requests
            assert time.monotonic() < deadline, "the idle model was not freed"
            await asyncio.sleep(0.2)
        assert engine.info.name in await _models_open(app)  # still listed: it loads on demand
        began = time.monotonic()
        second = await sdk(app).completions.create(model=engine.info.name, prompt="The capital of France is", max_tokens=8, temperature=0)
        waited = time.monotonic() - began
        print(f"first request after an idle unload took {waited:.1f} s (the load included)")
        assert second.choices[0].text == first.choices[0].text
        assert getattr(engine, "_loaded") is not None


async def _models_open(app: FastAPI) -> list[str]:
    return [m.id async for m in sdk(app).models.list()]


class CountingEngine(FakeEngine):
    """The fake model, counting the times it was freed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.freed = 0

    async def unload(self) -> None:
        self.freed += 1
        await super().unload()


async def test_an_unload_whose_caller_leaves_still_frees_the_model() -> None:
    """An admin's client that times out while running requests drain cancels its call; the
    model, already refusing requests, must still be freed once they end (not left held)."""
    engine = CountingEngine(name="other", token_delay=0.02)
    async with open_backend(EngineSettings(engine="fake"), engine=engine) as service:
        models = ServedModels([service])
        async def stream() -> int:
            return len([c async for c in service.generate(GenerateParams(model="other", prompt="hi", max_new_tokens=20))])

        asking = asyncio.create_task(stream())
        while not engine.active:
            await asyncio.sleep(0.01)
        unloading = asyncio.create_task(models.unload_model("other"))
        await asyncio.sleep(0.05)
        unloading.cancel()  # the caller left while the stream drains
        with pytest.raises(asyncio.CancelledError):
            await unloading
        assert await asking > 1 and service.model_names == []
        await asyncio.wait_for(_until(lambda: engine.freed == 1), timeout=10)
        await models.load_model("other")
        assert service.model_names == ["other"]


async def _until(done: Any) -> None:
    while not done():
        await asyncio.sleep(0.01)


class StartedLoraEngine(LoraFakeEngine):
    """A LoRA fake that, as the real runners, takes adapters only while its model is loaded."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.resident = False

    async def start(self) -> None:
        await super().start()
        self.resident = True

    async def unload(self) -> None:
        self.resident = False
        await super().unload()

    async def load_lora(self, name: str, path: str) -> None:
        if not self.resident:
            raise InvalidRequestError("its base model is not loaded", param="lora_name")
        await super().load_lora(name, path)


async def test_an_adapter_load_wakes_a_model_freed_for_idleness() -> None:
    """A model freed by --idle-unload is still listed and loads for the next request; an adapter
    load is such a request (it was a 400 saying the base was not loaded)."""
    engine = StartedLoraEngine(name="base")
    async with running(make_app(engine, idle_unload=0.3, embedding_model_path="none",
                                api_keys=[USER], admin_keys=[ADMIN])) as app:
        await asyncio.wait_for(_until(lambda: not engine.resident), timeout=10)
        loaded = await _post(app, "/v1/load_lora_adapter", {"lora_name": "tuned", "lora_path": "/adapters/tuned"})
        assert loaded.status_code == 200, loaded.text
        assert engine.resident and "tuned" in await _models(app)
