"""One `chatgate worker` serving real models side by side (`--model default --model gemma3-270m`),
behind a controller and an API server, through the openai SDK: /v1/models lists both, and each
request reaches its own model (its answer is that model's own greedy answer, not the other's).
And a worker serving the default model twice takes a PEFT adapter beside the copy its
`base_model_name` names: the adapter answers as `peft`'s merged weights do; an adapter made for
another base, or a load that names no base, is a 400 naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from chatgate.engines.loading import DEFAULT_CHAT_NAME
from chatgate.settings import WorkerSettings
from chatgate.worker.app import create_worker_app
from tests.support.app import raw, running, sdk
from tests.support.fleet import fleet_of
from tests.support.lora import other_base_adapter, random_adapter

pytestmark = [pytest.mark.anyio, pytest.mark.model]

PROMPT = "The capital of France is"
TOKENS = 12


async def _direct(worker_http: httpx.AsyncClient, model: str) -> str:
    """The model's greedy completion of PROMPT, asked of the worker itself."""
    body = {"model": model, "prompt": PROMPT, "max_new_tokens": TOKENS, "temperature": 0, "delta": True}
    answer = (await worker_http.post("/worker_generate", json=body)).json()
    assert answer["error_code"] == 0, answer
    return str(answer["text"])


async def test_one_worker_serves_smollm_and_gemma_each_by_its_name() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
    settings = WorkerSettings(
        no_register=True, num_threads=1,
        model=["default engine=llama.cpp", "gemma3-270m engine=llama.cpp max-model-len=2048 model-names=gemma"],
    )
    worker = create_worker_app(settings)
    async with fleet_of(worker) as (api, _beat, _pool):
        client = sdk(api)
        assert sorted([m.id async for m in client.models.list()]) == sorted([DEFAULT_CHAT_NAME, "gemma"])
        async with raw(worker) as http:
            direct = {model: await _direct(http, model) for model in (DEFAULT_CHAT_NAME, "gemma")}
            lengths = {m: (await http.post("/model_details", json={"model": m})).json()["context_length"] for m in direct}
        assert direct[DEFAULT_CHAT_NAME] != direct["gemma"] and all(direct.values())
        assert lengths["gemma"] == 2048 and lengths[DEFAULT_CHAT_NAME] != 2048
        for model, expected in direct.items():
            answer = await client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
            assert answer.choices[0].text == expected and answer.model == model
        chat = await client.chat.completions.create(
            model=DEFAULT_CHAT_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
        )
        assert "Paris" in (chat.choices[0].message.content or "")


def _text(tokenizer: Any, tokens: list[int]) -> str:
    """What the server sends for these greedy tokens: up to the first end-of-sequence token."""
    cut = next((i for i, t in enumerate(tokens) if t == tokenizer.eos_token_id), len(tokens))
    return str(tokenizer.decode(tokens[:cut]))


async def test_an_adapter_joins_the_copy_its_base_model_name_names(
    model_folder: Path, tokenizer: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from chatgate.bench.quality import greedy

    base: Any = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    base.eval()
    merged = random_adapter(base, tmp_path / "tuned", seed=1)
    other_base_adapter(tmp_path / "other")
    prompt = list(tokenizer(PROMPT)["input_ids"])
    with torch.inference_mode():
        expected = {"tuned": greedy(merged, [prompt], TOKENS)[0], "base": greedy(base, [prompt], TOKENS)[0]}
    assert expected["tuned"] != expected["base"]  # the adapter matters
    del base, merged

    settings = WorkerSettings(
        no_register=True, num_threads=1,
        model=["default engine=transformers", "default engine=transformers model-names=smol-b"],
    )
    worker = create_worker_app(settings)
    async with fleet_of(worker) as (api, beat, pool):
        async with raw(worker) as http:
            body = {"lora_name": "tuned", "lora_path": str(tmp_path / "tuned")}
            unnamed = await http.post("/v1/load_lora_adapter", json=body)
            assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "base_model_name"
            other = await http.post("/v1/load_lora_adapter", json={**body, "lora_path": str(tmp_path / "other"), "base_model_name": "smol-b"})
            assert other.status_code == 400 and "another base" in other.json()["error"]["message"]
            loaded = await http.post("/v1/load_lora_adapter", json={**body, "base_model_name": "smol-b"})
            assert loaded.status_code == 200, loaded.text
            second = worker.state.models.backends()[1]
            assert second.lora_names() == ["tuned"] and worker.state.models.backends()[0].lora_names() == []
        await beat.beat()  # the fleet learns the adapter at the next heartbeat
        await pool.refresh()
        client = sdk(api)
        assert sorted([m.id async for m in client.models.list()]) == sorted([DEFAULT_CHAT_NAME, "smol-b", "tuned"])
        for model, want in (("tuned", expected["tuned"]), ("smol-b", expected["base"]), (DEFAULT_CHAT_NAME, expected["base"])):
            answer = await client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
            assert answer.choices[0].text == _text(tokenizer, want), model


async def test_an_adapter_for_the_embedding_model_is_a_400_naming_its_base() -> None:
    from chatgate.api.app import create_api_app
    from chatgate.api.workers.local import local_pool
    from chatgate.settings import ServeSettings

    settings = ServeSettings(engine="fake", embedding_model_path="default", responses_store="memory")
    async with running(create_api_app(settings, local_pool(settings))) as app:
        names = [m.id async for m in sdk(app).models.list()]
        embedding = next(name for name in names if name != "fake-model")
        body = {"lora_name": "x", "lora_path": "/adapters/x", "base_model_name": embedding}
        async with raw(app) as http:
            refused = await http.post("/v1/load_lora_adapter", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "base_model_name" and "takes no LoRA adapters" in refused.json()["error"]["message"]
        assert sorted([m.id async for m in sdk(app).models.list()]) == sorted(names)
