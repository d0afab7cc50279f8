"""`logprobs` on chat (with `top_logprobs`) and completions, in OpenAI's shapes, streamed and not."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI

from chatgate.engines.transformers import TransformersEngine
from tests.support.app import Messages, make_app, raw, running, sdk
from tests.support.runners import Served

pytestmark = pytest.mark.anyio

M = "fake-model"
MSG: Messages = [{"role": "user", "content": "hi"}]


async def test_chat_logprobs_shape_and_streaming(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    r = await client.chat.completions.create(model=M, messages=MSG, temperature=0, logprobs=True, top_logprobs=3)
    logprobs = r.choices[0].logprobs
    assert logprobs is not None
    content = logprobs.content
    assert content is not None and len(content) == len((r.choices[0].message.content or "").encode())
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs))  # greedy picks the top
        assert sum(math.exp(t.logprob) for t in item.top_logprobs) <= 1.0 + 1e-6
    stream = await client.chat.completions.create(model=M, messages=MSG, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed = [lp for c in [c async for c in stream] if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content or []]
    assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob) for x in content]
    plain = await client.chat.completions.create(model=M, messages=MSG)
    assert plain.choices[0].logprobs is None


async def test_completion_logprobs_legacy_shape(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    r = await client.completions.create(model=M, prompt="Hello", max_tokens=12, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 12 == len(lp.token_logprobs or [])
    assert "".join(lp.tokens or []) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in (lp.tokens or [])[:i]) for i in range(12)]
    assert all(len(top) <= 2 for top in lp.top_logprobs or [])
    stream = await client.completions.create(model=M, prompt="Hello", max_tokens=12, temperature=0, logprobs=2, stream=True)
    tokens = [t for c in [c async for c in stream] if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    assert tokens == lp.tokens


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": "yes"}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
])
async def test_bad_logprob_requests(fake_app: FastAPI, path: str, body: dict[str, object], param: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post(path, json={"model": M, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


async def test_echo_with_logprobs_needs_an_engine_that_scores_prompts(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/completions", json={"model": M, "prompt": "x", "logprobs": 1, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


@pytest.fixture(scope="module")
def reference(model_folder: Path) -> Any:
    """The default model in plain transformers, float32: the log-probabilities every engine must give."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model.train(False)  # inference: no dropout
    return model


def _log_softmax(reference: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.model
async def test_real_model_logprobs_are_the_models_own(served: Served, reference: Any, tokenizer: Any) -> None:
    r = await sdk(served.api).completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                                 max_tokens=1, temperature=0, logprobs=5)
    got = r.choices[0].logprobs
    assert got is not None and got.token_logprobs
    expected = _log_softmax(reference, tokenizer.encode("The capital of France is"))[-1]
    assert got.token_logprobs[0] == pytest.approx(float(expected.max()), abs=served.logprob_tolerance)
    assert got.top_logprobs is not None and len(got.top_logprobs[0]) == 5


@pytest.mark.model
async def test_real_model_echo_scores_the_prompt_too(served: Served, reference: Any, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    client = sdk(served.api)
    r = await client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=2,
                                        temperature=0, logprobs=2, echo=True)
    stream = await client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=2,
                                             temperature=0, logprobs=2, echo=True, stream=True)
    streamed = [t for c in [c async for c in stream] if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs or []]
    ids = tokenizer.encode(prompt)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(ids) + 2 and r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.token_logprobs[1] == pytest.approx(float(_log_softmax(reference, ids)[0, ids[1]]), abs=served.logprob_tolerance)
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)
