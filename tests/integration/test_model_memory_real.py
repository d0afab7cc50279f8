"""The memory check and an out-of-memory load on the real default model, on every runner: a load
the memory set by the test cannot hold is refused (409) before it starts; one that runs out of
memory after its weights are read frees them and is refused the same way; a later load with
enough memory answers as before; a LoRA adapter that would not fit is refused naming
`lora_path`, and the base model keeps answering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.base import Engine
from chatgate.engines.memory import adapter_bytes
from chatgate.settings import ServeSettings
from tests.support.app import raw, running, sdk
from tests.support.memory import GIB, SetMemory
from tests.support.runners import RUNNERS, runner_engine

pytestmark = [pytest.mark.model, pytest.mark.anyio]


def serve(engine: Engine, memory: SetMemory) -> FastAPI:
    config = ServeSettings(responses_store="memory", embedding_model_path="none")
    return create_api_app(config, local_pool(config, engines=[engine], memory=memory))


async def _post(app: FastAPI, path: str, body: dict[str, Any]) -> httpx.Response:
    async with raw(app) as http:
        return await http.post(path, json=body)


async def _complete(app: FastAPI, model: str) -> str:
    answer = await sdk(app).completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    return answer.choices[0].text


def _refused(response: httpx.Response, param: str) -> str:
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("insufficient_memory", param)
    return str(error["message"])


@pytest.mark.parametrize("runner", RUNNERS)
async def test_a_real_model_is_refused_when_it_would_not_fit_and_freed_when_it_runs_out(runner: str) -> None:
    engine = runner_engine(runner)
    memory = SetMemory(64 * GIB)
    async with running(serve(engine, memory)) as app:
        name = engine.info.name
        first = await _complete(app, name)
        assert (await _post(app, "/v1/models/unload", {"model": name})).status_code == 200
        need = engine.memory_need()
        assert need is not None and need.weights > 100 * 2**20  # the weights' real size, not a guess of 0
        memory.available_bytes = need.total  # the weights fit, the 0.5 GiB headroom does not
        message = _refused(await _post(app, "/v1/models/load", {"model": name}), "model")
        assert f"`{name}`" in message and "available on cpu" in message
        assert getattr(engine, "_loaded") is None  # refused before reading anything

        memory.available_bytes = 64 * GIB
        load = getattr(engine, "_load")

        def runs_out() -> Any:
            load()  # the weights are read, then the next allocation fails
            raise MemoryError

        setattr(engine, "_load", runs_out)
        try:
            assert "ran out of memory" in _refused(await _post(app, "/v1/models/load", {"model": name}), "model")
        finally:
            delattr(engine, "_load")
        assert getattr(engine, "_loaded") is None and getattr(engine, "_model", None) is None  # freed
        assert [m.id async for m in sdk(app).models.list()] == []  # unloaded, not half served

        assert (await _post(app, "/v1/models/load", {"model": name})).status_code == 200
        assert await _complete(app, name) == first


async def test_a_lora_adapter_that_would_not_fit_is_refused_and_the_base_keeps_answering(
    model_folder: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from tests.support.lora import random_adapter

    base: Any = AutoModelForCausalLM.from_pretrained(model_folder)
    random_adapter(base, tmp_path / "tuned", seed=1)
    del base
    engine = runner_engine("torch")
    memory = SetMemory(64 * GIB)
    async with running(serve(engine, memory)) as app:
        first = await _complete(app, engine.info.name)
        memory.available_bytes = GIB // 2  # the adapter's few MB, but not the headroom
        body = {"lora_name": "tuned", "lora_path": str(tmp_path / "tuned")}
        message = _refused(await _post(app, "/v1/load_lora_adapter", body), "lora_path")
        assert "the LoRA adapter `tuned`" in message
        assert engine.lora_names() == []
        assert await _complete(app, engine.info.name) == first
        memory.available_bytes = 64 * GIB
        alone = engine.memory_need()
        assert (await _post(app, "/v1/load_lora_adapter", body)).status_code == 200
        assert engine.lora_names() == ["tuned"]
        # The model's next load reads its adapters again: they count in what it needs.
        with_adapter, size = engine.memory_need(), adapter_bytes(tmp_path / "tuned")
        assert alone is not None and with_adapter is not None and size
        assert with_adapter.weights == alone.weights + size
