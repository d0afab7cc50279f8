"""Completions' `suffix`: a fill-in-the-middle prompt where the model has FIM tokens, a 400 naming
`suffix` where it has none (the default model), never silently ignored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

PREFIX, SUFFIX = "def add(a, b):\n", "\n    return total\n"
MARKS = 3  # <fim_prefix>, <fim_suffix>, <fim_middle>


@pytest.fixture
async def fim_app() -> AsyncIterator[FastAPI]:
    async with running(make_app(FakeEngine(name="fake-model", fim=True))) as app:
        yield app


async def test_suffix_builds_a_fill_in_the_middle_prompt(fim_app: FastAPI) -> None:
    r = await sdk(fim_app).completions.create(model="fake-model", prompt=PREFIX, suffix=SUFFIX, max_tokens=64, temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens == len(PREFIX) + len(SUFFIX) + MARKS
    # The fake model answers the prompt's text: prefix and suffix, the marks being special.
    assert r.choices[0].text == FakeEngine.reply_for(PREFIX + SUFFIX)


async def test_suffix_with_token_ids_lists_and_n(fim_app: FastAPI) -> None:
    """Every prompt of a list, text or token ids, is the prefix of its own FIM prompt."""
    ids = list(PREFIX.encode())
    r = await sdk(fim_app).completions.create(model="fake-model", prompt=[ids, list(b"x = 1")], suffix=SUFFIX, n=2, max_tokens=8)
    assert len(r.choices) == 4
    one = await sdk(fim_app).completions.create(model="fake-model", prompt=ids, suffix=SUFFIX, max_tokens=8)
    assert one.usage is not None and one.usage.prompt_tokens == len(ids) + len(SUFFIX) + MARKS


async def test_empty_suffix_is_still_fill_in_the_middle(fim_app: FastAPI) -> None:
    r = await sdk(fim_app).completions.create(model="fake-model", prompt=PREFIX, suffix="", max_tokens=8)
    assert r.usage is not None and r.usage.prompt_tokens == len(PREFIX) + MARKS


async def test_suffix_on_a_model_without_fim_tokens_is_400(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model="fake-model", prompt=PREFIX, suffix=SUFFIX, stream=stream)
        assert err.value.param == "suffix" and "fill-in-the-middle" in err.value.message


@pytest.mark.parametrize(("extra", "param"), [
    ({"suffix": SUFFIX, "echo": True}, "suffix"),
    ({"suffix": 5}, "suffix"),
    ({"suffix": ["a"]}, "suffix"),
])
async def test_bad_suffix_is_400(fim_app: FastAPI, extra: dict[str, Any], param: str) -> None:
    async with raw(fim_app) as http:
        r = await http.post("/v1/completions", json={"model": "fake-model", "prompt": PREFIX, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_fim_token_ids_in_the_prompt_are_checked(fim_app: FastAPI) -> None:
    async with raw(fim_app) as http:
        r = await http.post("/v1/completions", json={"model": "fake-model", "prompt": [1, 99999], "suffix": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.model
async def test_default_model_has_no_fim_tokens(chat_app: FastAPI) -> None:
    """SmolLM2's vocabulary has no FIM tokens: the suffix is refused, on each runner, by SDK and HTTP."""
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(chat_app).completions.create(model="SmolLM2-135M-Instruct", prompt=PREFIX, suffix=SUFFIX)
    assert err.value.param == "suffix"
    async with raw(chat_app) as http:
        r = await http.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": [42, 43], "suffix": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix", r.text
