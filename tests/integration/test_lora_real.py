"""LoRA adapters served as models of their own on the torch runner, over the real default model.

Each adapter is a small random PEFT adapter; what it must answer is what `peft`'s merged weights
(`merge_and_unload`) answer greedily through transformers. Served alone, batched with the base
model and with each other, the adapter's tokens are the merged model's and the base model's are
its own. The admin routes load and unload adapters while serving, behind an admin key; a bad
path, an adapter for another base model, a taken name are 400s naming the field, and the base
model keeps serving throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI

from chatgate.bench.quality import greedy
from chatgate.engines.base import Engine, SamplingParams
from chatgate.engines.lora import AdapterError
from tests.support.app import make_app, raw, running, sdk
from tests.support.lora import convert_to_gguf, other_base_adapter, random_adapter
from tests.support.runners import runner_engine

pytestmark = [pytest.mark.model, pytest.mark.anyio]

ADMIN, USER = "sk-admin", "sk-user"
TOKENS = 20
QUESTIONS = ["What is the capital of France?", "Give three tips for sleeping well.", "Name a large animal."]


@dataclass
class Adapters:
    """Adapter folders, and the greedy tokens their merged models (and the base) give each prompt."""

    tuned: Path
    second: Path
    other_base: Path
    prompts: list[list[int]]
    expected: dict[str, list[list[int]]]  # "base", "tuned", "second" -> per prompt


@pytest.fixture(scope="module")
def adapters(model_folder: Path, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("lora")
    base: Any = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    base.eval()
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False))
        for q in QUESTIONS
    ]
    models = {"base": base, "tuned": random_adapter(base, folder / "tuned", seed=1),
              "second": random_adapter(base, folder / "second", seed=2)}
    other_base_adapter(folder / "other-base")
    with torch.inference_mode():
        expected = {name: [greedy(model, [p], TOKENS)[0] for p in prompts] for name, model in models.items()}
    assert expected["tuned"] != expected["base"] and expected["second"] != expected["tuned"]  # the adapters matter
    return Adapters(tuned=folder / "tuned", second=folder / "second", other_base=folder / "other-base",
                    prompts=prompts, expected=expected)


@pytest.fixture(scope="module")
def lora_engine(adapters: Adapters) -> Engine:
    """The default model on the torch runner, serving `tuned` from the start (`--lora`)."""
    return runner_engine("torch", lora=[f"tuned={adapters.tuned}"])


@pytest.fixture
async def app(lora_engine: Engine) -> AsyncIterator[FastAPI]:
    async with running(make_app(lora_engine, api_keys=[USER], admin_keys=[ADMIN])) as served:
        yield served


def _text(engine: Engine, tokens: list[int]) -> str:
    """What the server sends for these greedy tokens: up to the first end-of-turn token."""
    stops = set(engine.eos_token_ids)
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return engine.decode(tokens[:cut])


async def _complete(app: FastAPI, model: str, prompt: list[int]) -> str:
    client = sdk(app, USER)
    answer = await client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
    return answer.choices[0].text


async def _admin(app: FastAPI, path: str, body: dict[str, Any], key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with raw(app) as http:
        return await http.post(path, json=body, headers=headers)


def _default_name(engine: Engine) -> str:
    return engine.info.name


async def test_the_adapter_answers_as_the_merged_weights_alone(app: FastAPI, lora_engine: Engine, adapters: Adapters) -> None:
    listed = [m.id async for m in sdk(app, USER).models.list()]
    assert "tuned" in listed and _default_name(lora_engine) in listed
    for prompt, tokens in zip(adapters.prompts, adapters.expected["tuned"], strict=True):
        assert await _complete(app, "tuned", prompt) == _text(lora_engine, tokens)


async def test_adapter_and_base_batched_together_each_keep_their_own_tokens(
    app: FastAPI, lora_engine: Engine, adapters: Adapters
) -> None:
    base = _default_name(lora_engine)
    # The same prompt under both models first, one after the other: the adapter must not reuse
    # the base model's cached KV for it (nor the base the adapter's).
    assert await _complete(app, base, adapters.prompts[0]) == _text(lora_engine, adapters.expected["base"][0])
    assert await _complete(app, "tuned", adapters.prompts[0]) == _text(lora_engine, adapters.expected["tuned"][0])
    jobs = [(model, index) for index in range(len(adapters.prompts)) for model in (base, "tuned")]
    answers = await asyncio.gather(*(_complete(app, model, adapters.prompts[i]) for model, i in jobs))
    for (model, index), answer in zip(jobs, answers, strict=True):
        key = "base" if model == base else "tuned"
        assert answer == _text(lora_engine, adapters.expected[key][index]), (model, index)


async def test_chat_streams_through_the_adapter(app: FastAPI, lora_engine: Engine, adapters: Adapters) -> None:
    stream = await sdk(app, USER).chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=TOKENS, temperature=0, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == _text(lora_engine, adapters.expected["tuned"][1])


async def test_admin_routes_load_serve_and_unload_an_adapter(app: FastAPI, lora_engine: Engine, adapters: Adapters) -> None:
    body = {"lora_name": "second", "lora_path": str(adapters.second)}
    assert (await _admin(app, "/v1/load_lora_adapter", body, key=None)).status_code == 401
    refused = await _admin(app, "/v1/load_lora_adapter", body, key=USER)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    loaded = await _admin(app, "/v1/load_lora_adapter", body)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"object": "admin.result", "status": "loaded", "model": "second"}
    try:
        assert "second" in [m.id async for m in sdk(app, USER).models.list()]
        answers = await asyncio.gather(*(_complete(app, m, adapters.prompts[2]) for m in ("second", "tuned", _default_name(lora_engine))))
        assert answers == [_text(lora_engine, adapters.expected[k][2]) for k in ("second", "tuned", "base")]
        again = await _admin(app, "/v1/load_lora_adapter", body)
        assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    finally:
        unloaded = await _admin(app, "/v1/unload_lora_adapter", {"lora_name": "second"})
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        await _complete(app, "second", adapters.prompts[0])
    gone = await _admin(app, "/v1/unload_lora_adapter", {"lora_name": "second"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"lora_name": "x", "lora_path": "/nonexistent/adapter"}, "lora_path", "not a PEFT adapter folder"),
        ({"lora_name": "x", "lora_path": "~nosuchuser4f7a/adapter"}, "lora_path", "names no home directory"),
        ({"lora_name": "x", "lora_path": "OTHER"}, "lora_path", "another base model"),
        ({"lora_name": "tuned", "lora_path": "TUNED"}, "lora_name", "already served"),
        ({"lora_name": "bad name!", "lora_path": "TUNED"}, "lora_name", "not a usable model name"),
        ({"lora_name": "x" * 129, "lora_path": "TUNED"}, "lora_name", ""),
        ({"lora_name": "x", "lora_path": 5}, "lora_path", ""),
        ({"lora_name": "x"}, "lora_path", ""),
    ],
)
async def test_adapters_that_cannot_be_served_are_400s_naming_the_field(
    app: FastAPI, lora_engine: Engine, adapters: Adapters, body: dict[str, Any], param: str, words: str
) -> None:
    paths = {"OTHER": str(adapters.other_base), "TUNED": str(adapters.tuned)}
    body = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    refused = await _admin(app, "/v1/load_lora_adapter", body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == param and words in error["message"], error
    # Nothing served was hurt.
    assert await _complete(app, "tuned", adapters.prompts[0]) == _text(lora_engine, adapters.expected["tuned"][0])
    assert "x" not in [m.id async for m in sdk(app, USER).models.list()]


async def test_an_unload_waits_for_the_requests_running_through_the_adapter(
    app: FastAPI, lora_engine: Engine, adapters: Adapters
) -> None:
    """Driven at the engine: the in-process transport hands over a response only once it is whole."""
    loaded = await _admin(app, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": str(adapters.second)})
    assert loaded.status_code == 200, loaded.text
    outputs = lora_engine.generate(adapters.prompts[1], SamplingParams(max_tokens=TOKENS, temperature=0, lora="second"))
    tokens = list((await anext(outputs)).token_ids)
    unload = asyncio.create_task(_admin(app, "/v1/unload_lora_adapter", {"lora_name": "second"}))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not unload.done()  # it waits for the running sequence
    with pytest.raises(openai.NotFoundError):  # but refuses new requests at once
        await _complete(app, "second", adapters.prompts[0])
    async for output in outputs:
        tokens += output.token_ids
    assert tokens == adapters.expected["second"][1][: len(tokens)] and len(tokens) == TOKENS
    assert (await unload).status_code == 200
    assert "second" not in [m.id async for m in sdk(app, USER).models.list()]


async def test_adapters_come_back_when_an_unloaded_model_loads_again(
    app: FastAPI, lora_engine: Engine, adapters: Adapters
) -> None:
    unloaded = await _admin(app, "/v1/models/unload", {"model": _default_name(lora_engine)})
    assert unloaded.status_code == 200, unloaded.text
    assert await _models(app) == []  # the base and its adapters leave together
    with pytest.raises(openai.NotFoundError):
        await _complete(app, "tuned", adapters.prompts[0])
    loaded = await _admin(app, "/v1/models/load", {"model": _default_name(lora_engine)})
    assert loaded.status_code == 200, loaded.text
    assert set(await _models(app)) >= {"tuned", _default_name(lora_engine)}
    assert await _complete(app, "tuned", adapters.prompts[0]) == _text(lora_engine, adapters.expected["tuned"][0])


async def _models(app: FastAPI) -> list[str]:
    return [m.id async for m in sdk(app, USER).models.list()]


# llama.cpp: GGUF adapters converted by llama.cpp's own script, on the model in float32 (as the
# merged weights are), applied a context at a time (one decode per adapter in a step).


@pytest.fixture(scope="module")
def gguf_adapters(adapters: Adapters, model_folder: Path) -> dict[str, Path]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    return {name: convert_to_gguf(folder, model_folder, folder.parent / f"{name}.gguf")
            for name, folder in [("tuned", adapters.tuned), ("second", adapters.second)]}


@pytest.fixture(scope="module")
def gguf_engine(gguf_adapters: dict[str, Path]) -> Engine:
    return runner_engine("llama.cpp", dtype="float32", lora=[f"tuned={gguf_adapters['tuned']}"])


async def test_llama_cpp_serves_gguf_adapters_beside_the_base(
    gguf_engine: Engine, gguf_adapters: dict[str, Path], adapters: Adapters
) -> None:
    async with running(make_app(gguf_engine, api_keys=[USER], admin_keys=[ADMIN])) as served:
        base = _default_name(gguf_engine)
        alone = [await _complete(served, "tuned", p) for p in adapters.prompts]
        assert alone == [_text(gguf_engine, t) for t in adapters.expected["tuned"]]
        loaded = await _admin(served, "/v1/load_lora_adapter", {"lora_name": "second", "lora_path": str(gguf_adapters["second"])})
        assert loaded.status_code == 200, loaded.text
        jobs = [(model, index) for index in range(len(adapters.prompts)) for model in (base, "tuned", "second")]
        answers = await asyncio.gather(*(_complete(served, model, adapters.prompts[i]) for model, i in jobs))
        for (model, index), answer in zip(jobs, answers, strict=True):
            key = "base" if model == base else model
            assert answer == _text(gguf_engine, adapters.expected[key][index]), (model, index)
        for body, words in [
            ({"lora_name": "x", "lora_path": str(adapters.tuned)}, "is a PEFT adapter folder"),  # not converted
            ({"lora_name": "x", "lora_path": "/no/such/file.gguf"}, "not a file"),
            ({"lora_name": "x", "lora_path": str(adapters.other_base / "adapter_config.json")}, "not a .gguf file"),
        ]:
            refused = await _admin(served, "/v1/load_lora_adapter", body)
            assert refused.status_code == 400 and words in refused.json()["error"]["message"], refused.text
        assert (await _admin(served, "/v1/unload_lora_adapter", {"lora_name": "second"})).status_code == 200
        assert await _complete(served, base, adapters.prompts[0]) == _text(gguf_engine, adapters.expected["base"][0])


def test_a_bad_adapter_at_start_stops_the_start_naming_it(adapters: Adapters) -> None:
    for spec, words in [(f"broken={adapters.other_base}", "another base model"), ("missing=/no/such/dir", "/no/such/dir")]:
        engine = runner_engine("torch", lora=[spec])
        with pytest.raises(AdapterError) as failure:
            asyncio.run(_start_and_close(engine))
        assert spec.split("=")[0] in failure.value.message and words in failure.value.message


async def _start_and_close(engine: Engine) -> None:
    try:
        await engine.start()
    finally:
        await engine.close()

