"""vLLM's `structured_outputs` / `guided_*` and llama.cpp's `grammar` / `json_schema` constrain
the real model's output on both runners, through the SDK (`extra_body`) and raw HTTP."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from fastapi import FastAPI

from tests.support.app import Messages, raw, sdk

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
CAPITAL: Messages = [{"role": "user", "content": "What is the capital of France?"}]
PHONE = r"\d{3}-\d{4}"
# A small arithmetic language, in llama.cpp's GBNF.
SUMS_GBNF = 'root ::= num (" + " num){1,3}\nnum ::= [1-9] [0-9]?'
SUMS = re.compile(r"[1-9][0-9]?( \+ [1-9][0-9]?){1,3}")
SUMS_LARK = 'start: NUM (" * " NUM)~1..2\nNUM: /[1-9]/'
PRODUCTS = re.compile(r"[1-9]( \* [1-9]){1,2}")
# Bounded, or the tiny model runs on digits until max_tokens.
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "y": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["x", "y"], "additionalProperties": False}


async def _chat(app: FastAPI, extra: dict[str, Any], *, temperature: float = 1.0, seed: int = 7) -> str:
    reply = await sdk(app).chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=temperature, seed=seed, max_tokens=40, extra_body=extra
    )
    assert reply.choices[0].finish_reason == "stop", reply
    return reply.choices[0].message.content or ""


@pytest.mark.parametrize("extra", [{"structured_outputs": {"choice": ["Paris", "London"]}},
                                   {"guided_choice": ["Paris", "London"]}])
async def test_choice_is_exactly_one_of_them(chat_app: FastAPI, extra: dict[str, Any]) -> None:
    # Sampled at temperature 1 with several seeds: the unconstrained model says much more.
    for seed in (1, 2, 3):
        assert await _chat(chat_app, extra, seed=seed) in ("Paris", "London")


@pytest.mark.parametrize("extra", [{"structured_outputs": {"regex": PHONE}}, {"guided_regex": PHONE}])
async def test_regex_is_matched(chat_app: FastAPI, extra: dict[str, Any]) -> None:
    for seed in (1, 2):
        assert re.fullmatch(PHONE, await _chat(chat_app, extra, seed=seed))


@pytest.mark.parametrize("extra", [{"grammar": SUMS_GBNF}, {"structured_outputs": {"grammar": SUMS_GBNF}},
                                   {"guided_grammar": SUMS_GBNF}])
async def test_gbnf_grammar_is_parsed(chat_app: FastAPI, extra: dict[str, Any]) -> None:
    for seed in (1, 2):
        assert SUMS.fullmatch(await _chat(chat_app, extra, seed=seed))


async def test_lark_grammar_is_parsed(chat_app: FastAPI) -> None:
    assert PRODUCTS.fullmatch(await _chat(chat_app, {"structured_outputs": {"grammar": SUMS_LARK}}))


@pytest.mark.parametrize("extra", [{"json_schema": POINT}, {"guided_json": POINT},
                                   {"structured_outputs": {"json": POINT}},
                                   {"structured_outputs": {"json": json.dumps(POINT)}}])
async def test_json_schema_fields_validate(chat_app: FastAPI, extra: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(await _chat(chat_app, extra, temperature=0)), POINT)


async def test_json_object_via_structured_outputs(chat_app: FastAPI) -> None:
    text = await _chat(chat_app, {"structured_outputs": {"json_object": True}}, temperature=0)
    assert isinstance(json.loads(text), dict)


async def test_completions_raw_http_and_streamed(chat_app: FastAPI) -> None:
    body = {"model": MODEL, "prompt": "My phone number is", "max_tokens": 20, "temperature": 1.0, "seed": 3,
            "structured_outputs": {"regex": PHONE}}
    async with raw(chat_app) as http:
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        assert re.fullmatch(PHONE, text)
        streamed = await sdk(chat_app).completions.create(
            model=MODEL, prompt="My phone number is", max_tokens=20, temperature=1.0, seed=3, stream=True,
            extra_body={"structured_outputs": {"regex": PHONE}},
        )
        assert "".join([c.choices[0].text async for c in streamed if c.choices]) == text


async def test_completions_response_format_json_schema(chat_app: FastAPI) -> None:
    """vLLM's completions take `response_format` as chat does: the continuation is JSON of the schema."""
    body = {"model": MODEL, "prompt": "A point on the grid, as JSON:", "max_tokens": 30, "temperature": 1.0, "seed": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}}
    async with raw(chat_app) as http:
        r = await http.post("/v1/completions", json=body)
        free = await http.post("/v1/completions", json={**body, "response_format": {"type": "text"}})
    assert r.status_code == 200 and free.status_code == 200, (r.text, free.text)
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), POINT)
    assert free.json()["choices"][0]["text"] != r.json()["choices"][0]["text"]


async def test_completions_choice_with_n_and_prompts(chat_app: FastAPI) -> None:
    r = await sdk(chat_app).completions.create(
        model=MODEL, prompt=["The capital of France is", "The capital of England is"], n=2, max_tokens=10,
        temperature=1.0, seed=5, extra_body={"guided_choice": ["Paris", "London"]},
    )
    assert len(r.choices) == 4 and all(c.text in ("Paris", "London") for c in r.choices)


async def test_unconstrained_reply_differs(chat_app: FastAPI) -> None:
    """The checks above could not pass by chance: unconstrained, the model says something else."""
    free = await sdk(chat_app).chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=40)
    text = free.choices[0].message.content or ""
    assert text not in ("Paris", "London") and not re.fullmatch(PHONE, text) and not SUMS.fullmatch(text)


async def test_regex_too_slow_to_follow_is_400(chat_app: FastAPI) -> None:
    """A regex that compiles at once but whose masks take seconds over the real vocabulary would
    stall the whole batch: the worker tries it first and refuses it, naming the field."""
    async with raw(chat_app) as http:
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": CAPITAL, "guided_regex": "(a{1000}){1000}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "guided_regex" and "too complex" in r.json()["error"]["message"]
