"""SmolLM2 and Gemma 3 served together by one `serve` (`--model default --model gemma3-270m`):
each request reaches its model, with its own tokenizer and context, and one model's work does not
change the other's answers. (That one model's long prefill does not stall the other's stream is
measured over real HTTP: `tests/live/test_multi_model_serve.py`.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.local import local_pool
from chatgate.engines.loading import DEFAULT_CHAT_NAME, GEMMA_NAME
from chatgate.settings import ServeSettings
from tests.support.app import raw, running, sdk

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")

pytestmark = [pytest.mark.anyio, pytest.mark.model]

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def both() -> AsyncIterator[FastAPI]:
    settings = ServeSettings(
        model=["default engine=llama.cpp", "gemma3-270m engine=llama.cpp max-model-len=2048 model-names=gemma-3-270m,gemma"],
        embedding_model_path="none", num_threads=1,
    )
    async with running(create_api_app(settings, local_pool(settings))) as app:
        yield app


async def test_both_models_are_listed_and_each_answers_with_its_own_tokenizer(both: FastAPI) -> None:
    assert sorted([m.id async for m in sdk(both).models.list()]) == sorted([DEFAULT_CHAT_NAME, GEMMA_NAME, "gemma"])
    async with raw(both) as http:
        smol = (await http.post("/tokenize", json={"model": DEFAULT_CHAT_NAME, "prompt": PROMPT})).json()
        gemma = (await http.post("/tokenize", json={"model": "gemma", "prompt": PROMPT})).json()
    assert smol["tokens"] != gemma["tokens"] and gemma["tokens"][0] == 2  # Gemma's <bos>
    assert (smol["max_model_len"], gemma["max_model_len"]) == (8192, 2048)  # each its own context


async def test_greedy_answers_do_not_depend_on_the_other_model_running(both: FastAPI) -> None:
    client = sdk(both)

    async def answer(model: str) -> str:
        reply = await client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        return reply.choices[0].text

    alone = [await answer(DEFAULT_CHAT_NAME), await answer(GEMMA_NAME)]
    together = await asyncio.gather(answer(DEFAULT_CHAT_NAME), answer(GEMMA_NAME))
    assert list(together) == alone and alone[0] != alone[1]
    chat = await client.chat.completions.create(
        model=DEFAULT_CHAT_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content  # SmolLM2 has a chat template; Gemma's 400 is tested apart
