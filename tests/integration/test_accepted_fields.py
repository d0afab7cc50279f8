"""OpenAI fields the server cannot act on: hints and labels accepted without changing the answer,
values that ask for what the server lacks refused with a 400 naming the field."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi import FastAPI

from tests.support.app import raw, sdk, user

pytestmark = pytest.mark.anyio

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "hello there"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
BODY: dict[str, dict[str, Any]] = {CHAT: {"model": "fake-model", "messages": MESSAGES}, COMPLETIONS: {"model": "fake-model", "prompt": "hello there"},
        RESPONSES: {"model": "fake-model", "input": "hello there"}}
LABELS: dict[str, Any] = {"metadata": {"team": "a"}, "safety_identifier": "user-1", "prompt_cache_key": "k",
                          "prompt_cache_retention": "in-memory", "service_tier": "auto", "user": "u"}

ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    (CHAT, LABELS),
    (CHAT, {"service_tier": "default", "store": False, "modalities": ["text"], "verbosity": "medium",
            "prediction": {"type": "content", "content": "hello"}}),
    (CHAT, {"prediction": {"type": "content", "content": [{"type": "text", "text": "hi"}]}}),
    (COMPLETIONS, {**LABELS, "best_of": 1}),
    (RESPONSES, {**LABELS, "truncation": "disabled", "max_tool_calls": 3, "text": {"verbosity": "medium"}}),
]


@pytest.mark.parametrize(("route", "extra"), ACCEPTED)
async def test_hints_and_labels_leave_the_answer_alone(fake_app: FastAPI, route: str, extra: dict[str, Any]) -> None:
    async with raw(fake_app) as http:
        plain = await http.post(route, json={**BODY[route], "temperature": 0})
        labelled = await http.post(route, json={**BODY[route], "temperature": 0, **extra})
    assert labelled.status_code == 200, labelled.text
    assert _text(labelled.json()) == _text(plain.json())


def _text(body: dict[str, Any]) -> str:
    if "output" in body:
        return str(body["output"][0]["content"][0]["text"])
    choice = body["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (CHAT, {"service_tier": "flex"}, "service_tier"),
    (CHAT, {"service_tier": "gold"}, "service_tier"),
    (CHAT, {"store": True}, "store"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
    (CHAT, {"modalities": ["video"]}, "modalities[0]"),
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"web_search_options": {}}, "web_search_options"),
    (CHAT, {"verbosity": "low"}, "verbosity"),
    (CHAT, {"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
    (CHAT, {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    (CHAT, {"metadata": {"k" * 65: "v"}}, "metadata"),
    (CHAT, {"metadata": {"k": "v" * 513}}, "metadata.k"),
    (CHAT, {"metadata": {"k": 1}}, "metadata.k"),
    (CHAT, {"safety_identifier": "x" * 65}, "safety_identifier"),
    (CHAT, {"prediction": {"type": "other", "content": "x"}}, "prediction.type"),
    (CHAT, {"prediction": "x"}, "prediction"),
    (CHAT, {"stream": True, "stream_options": {"include_obfuscation": "yes"}}, "stream_options.include_obfuscation"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
    (COMPLETIONS, {"best_of": 1, "n": 2}, "best_of"),
    (COMPLETIONS, {"best_of": 0}, "best_of"),
    (COMPLETIONS, {"best_of": 1.5}, "best_of"),
    (COMPLETIONS, {"service_tier": "priority"}, "service_tier"),
    (RESPONSES, {"truncation": "auto"}, "truncation"),
    (RESPONSES, {"prompt": {"id": "pmpt_1"}}, "prompt"),
    (RESPONSES, {"conversation": "conv_1"}, "conversation"),
    (RESPONSES, {"text": {"verbosity": "high"}}, "text.verbosity"),
    (RESPONSES, {"service_tier": "flex"}, "service_tier"),
    (RESPONSES, {"max_tool_calls": 0}, "max_tool_calls"),
    (RESPONSES, {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
]


@pytest.mark.parametrize(("route", "extra", "param"), REFUSED)
async def test_what_cannot_be_honoured_is_400(fake_app: FastAPI, route: str, extra: dict[str, Any], param: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post(route, json={**BODY[route], **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


async def test_sdk_parameters(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    r = await client.chat.completions.create(model="fake-model", messages=user("hi"), metadata={"a": "b"}, store=False,
                                             service_tier="auto", safety_identifier="s", prompt_cache_key="p")
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="fake-model", messages=user("hi"), service_tier="flex")
    assert err.value.param == "service_tier" and "one tier" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="fake-model", prompt="hi", best_of=2)
    assert err.value.param == "best_of"
