"""The structured-output fields at the door: one constraint per request, bad regexes and grammars
refused with the compiler's message, caps, wrong types: every one a 400 naming the field."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from fastapi import FastAPI

from chatgate.protocol.limits import MAX_REQUEST_SCHEMA_VALUES
from chatgate.protocol.structured import MAX_CHOICES, MAX_GRAMMAR_CHARS
from chatgate.engines.fake import FakeEngine
from tests.support.app import make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

CHAT: dict[str, Any] = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "fake-model", "prompt": "hi"}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
BIG_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_REQUEST_SCHEMA_VALUES)}}

# (extra fields, the param named, words the message must hold)
BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "guided_regex, guided_choice"),
    ({"structured_outputs": {"regex": "a"}, "grammar": 'root ::= "a"'}, "grammar", "structured_outputs, grammar"),
    ({"json_schema": {"type": "object"}, "guided_json": {"type": "object"}}, "json_schema", "guided_json, json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "regex, choice"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "("}, "guided_regex", "unclosed group"),
    ({"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"grammar": 'start: "a" | b'}}, "structured_outputs.grammar", 'unknown name: "b"'),
    ({"grammar": "root ::= ("}, "grammar", "neither Lark nor GBNF"),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar", "foo"),
    ({"grammar": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000}, "grammar", "neither Lark nor GBNF"),  # converter's recursion
    ({"grammar": "start: " + "(" * 3000 + '"a"' + ")" * 3000}, "grammar", "too deeply nested"),
    ({"json_schema": {"type": "nonsense"}}, "json_schema", "invalid JSON schema"),
    ({"guided_json": "{not json"}, "guided_json", "not JSON"),
    ({"guided_json": "[1, 2]"}, "guided_json", "must be an object"),
    ({"structured_outputs": {"json": {"type": 5}}}, "structured_outputs.json", "invalid JSON schema"),
    ({"guided_json": BIG_SCHEMA}, "guided_json", "more than"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "not supported"),
    ({"structured_outputs": {"regex": "a", "disable_additional_properties": True}},
     "structured_outputs.disable_additional_properties", "not supported"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "not supported"),
    ({"guided_regex": "a" * (MAX_GRAMMAR_CHARS + 1)}, "guided_regex", "at most"),
    ({"guided_regex": ""}, "guided_regex", "at least"),
    ({"guided_choice": []}, "guided_choice", ""),
    ({"guided_choice": [""]}, "guided_choice[0]", ""),
    ({"guided_choice": ["a"] * (MAX_CHOICES + 1)}, "guided_choice", ""),
    ({"guided_choice": ["a" * 40_000, "b" * 40_000]}, "guided_choice", "characters together"),
    ({"guided_choice": ["a", 1]}, "guided_choice[1]", ""),
    ({"guided_regex": 5}, "guided_regex", ""),
    ({"structured_outputs": "regex"}, "structured_outputs", ""),
    ({"structured_outputs": {"choice": "Paris"}}, "structured_outputs.choice", ""),
    ({"guided_decoding_backend": 3}, "guided_decoding_backend", ""),
    ({"guided_decoding_backend": "x" * 65}, "guided_decoding_backend", ""),
]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(("extra", "param", "words"), BAD)
async def test_bad_structured_fields_are_400(fake_app: FastAPI, route: str, extra: dict[str, Any], param: str, words: str) -> None:
    body = {**(CHAT if "chat" in route else COMPLETION), **extra}
    async with raw(fake_app) as http:
        r = await http.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"choice": ["a"]}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}, "grammar": 'root ::= "a"'}, "tool_choice"),
    ({"functions": [TOOLS[0]["function"]], "function_call": {"name": "f"}, "json_schema": {"type": "object"}}, "function_call"),
])
async def test_chat_conflicts_with_response_format_and_forced_tools(fake_app: FastAPI, extra: dict[str, Any], param: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "only one way of constraining" in error["message"]
    assert param in error["message"] and error["param"] in ("response_format", param, *extra)


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format"),  # the second named, as on chat
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BIG_SCHEMA}}},
     "response_format.json_schema.schema"),
])
async def test_completions_response_format_is_checked_as_chats(fake_app: FastAPI, extra: dict[str, Any], param: str) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/completions", json={**COMPLETION, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


async def test_completions_response_format_reaches_the_engine(fake_app: FastAPI) -> None:
    """Not accepted and ignored: the fake engine, which has no grammars, refuses it by name; `text` is free."""
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(fake_app).completions.create(model="fake-model", prompt="hi", extra_body={"response_format": {"type": "json_object"}})
    assert "does not support structured output" in err.value.message
    free = await sdk(fake_app).completions.create(model="fake-model", prompt="hi", extra_body={"response_format": {"type": "text"}})
    assert free.choices[0].text


async def test_tool_choice_auto_and_text_format_do_not_conflict(fake_app: FastAPI) -> None:
    """Only constraints conflict: tools offered freely, or a text response format, do not."""
    client = sdk(fake_app)
    for extra in ({"tools": TOOLS, "tool_choice": "auto"}, {"response_format": {"type": "text"}}):
        with pytest.raises(openai.BadRequestError) as err:  # the fake engine has no grammars
            await client.chat.completions.create(model="fake-model", messages=CHAT["messages"],
                                                 extra_body={**extra, "guided_regex": "a"})
        assert err.value.param == "guided_regex" and "does not support structured output" in err.value.message


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_regex": r"\d+", "guided_decoding_backend": "xgrammar"}, "guided_regex"),
    ({"structured_outputs": {"choice": ["a", "b"], "disable_fallback": True}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs.json"),
    ({"grammar": 'root ::= "a"'}, "grammar"),
])
async def test_valid_constraint_reaches_the_engine(fake_app: FastAPI, extra: dict[str, Any], param: str) -> None:
    """Past the door, a valid constraint reaches the worker, which names the same field when its
    engine cannot constrain (the fake engine has no grammars)."""
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(fake_app).completions.create(model="fake-model", prompt="hi", extra_body=extra)
    assert err.value.param == param


async def test_backend_name_alone_is_accepted_and_ignored(fake_app: FastAPI) -> None:
    r = await sdk(fake_app).chat.completions.create(model="fake-model", messages=CHAT["messages"],
                                                    extra_body={"guided_decoding_backend": "outlines"})
    assert r.choices[0].message.content


async def test_lone_surrogate_is_400(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/chat/completions", content=b'{"model": "fake-model", "messages": [{"role": "user", '
                            b'"content": "hi"}], "guided_regex": "\\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text


async def test_fields_are_in_the_openapi_schema() -> None:
    """The schema fuzz reaches only what the schema declares."""
    async with running(make_app(FakeEngine(), docs=True)) as app, raw(app) as http:
        schema = (await http.get("/openapi.json")).json()["components"]["schemas"]
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        fields = schema[model]["properties"]
        assert {"structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                "guided_decoding_backend", "grammar", "json_schema"} <= set(fields)
    assert {"json", "regex", "choice", "grammar", "json_object"} <= set(schema["StructuredOutputs"]["properties"])
