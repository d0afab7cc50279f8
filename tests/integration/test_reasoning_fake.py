"""Reasoning and templating on the fake engine, through the SDK and raw HTTP: the parser splits
thinking from the answer (whole and streamed, chat and Responses), counts thinking tokens, the
templating fields reach the template, and bad values of every new field are a 400 naming it.

The fake model echoes the last two lines of its prompt, so a prompt that says `</think>` makes
a reply that does: "x </think> y" is answered "Echo: <user> x </think> y <assistant> ✓ done."."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from tests.support.app import Messages, make_app, raw, running, sdk, user

pytestmark = pytest.mark.anyio

M = "fake-model"
ASK = user("x </think> y")
THINKING = "Echo: <user> x "
ANSWER = " y <assistant> ✓ done."
THINKING_TOKENS = len(b"Echo: <user> x </think>")  # one token per byte, the end tag included
# A template whose generation prompt opens the thinking, unless `enable_thinking` is false; it
# shows `reasoning_effort` where the fake model echoes it.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant effort={{ reasoning_effort | default('unset') }}\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)


@pytest.fixture
async def thinking_app() -> AsyncIterator[FastAPI]:
    async with running(make_app(FakeEngine(), reasoning_parser="deepseek_r1")) as app:
        yield app


@pytest.fixture
async def template_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    template = tmp_path / "think.jinja"
    template.write_text(TEMPLATE)
    async with running(make_app(FakeEngine(), reasoning_parser="qwen3", chat_template=template)) as app:
        yield app


async def test_a_reply_splits_into_reasoning_and_content(thinking_app: FastAPI) -> None:
    r = await sdk(thinking_app).chat.completions.create(model=M, messages=ASK, temperature=0)
    message = r.choices[0].message
    assert (getattr(message, "reasoning_content", None), message.content) == (THINKING, ANSWER)
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == THINKING_TOKENS
    assert r.usage.completion_tokens == len((THINKING + "</think>" + ANSWER).encode()) + 1  # and the end of text


async def test_choices_add_up_their_thinking_tokens(thinking_app: FastAPI) -> None:
    r = await sdk(thinking_app).chat.completions.create(model=M, messages=ASK, temperature=0, n=2)
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 2 * THINKING_TOKENS


async def test_the_stream_sends_reasoning_deltas_then_content_deltas(thinking_app: FastAPI) -> None:
    stream = await sdk(thinking_app).chat.completions.create(
        model=M, messages=ASK, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    kinds, reasoning, content, usage = [], "", "", None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            part = getattr(choice.delta, "reasoning_content", None)
            if part:
                kinds.append("reasoning")
                reasoning += part
            if choice.delta.content:
                kinds.append("content")
                content += choice.delta.content
    assert (reasoning, content) == (THINKING, ANSWER)
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # no reasoning after the first content
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == THINKING_TOKENS


async def test_with_tools_on_offer_the_thinking_still_streams_first(thinking_app: FastAPI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    async with raw(thinking_app) as client:
        r = await client.post("/v1/chat/completions", json={"model": M, "messages": ASK, "temperature": 0, "tools": [tool], "stream": True})
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.text.splitlines() if line.startswith("data: {")]
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    content = [d["content"] for d in deltas if d.get("content")]
    assert "".join(reasoning) == THINKING and content == [ANSWER]  # the answer once it is known not to be a call


async def test_without_a_parser_the_whole_reply_is_content(fake_app: FastAPI) -> None:
    async with raw(fake_app) as client:
        r = await client.post("/v1/chat/completions", json={"model": M, "messages": ASK, "temperature": 0})
    body = r.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": THINKING + "</think>" + ANSWER}
    assert "completion_tokens_details" not in body["usage"]


async def test_responses_return_a_reasoning_item_before_the_message(thinking_app: FastAPI) -> None:
    r = await sdk(thinking_app).responses.create(model=M, input="x </think> y", temperature=0)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    reasoning = r.output[0]
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [(c.type, c.text) for c in reasoning.content or []] == [("reasoning_text", THINKING)]
    assert r.output_text == ANSWER
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == THINKING_TOKENS
    # The output goes back as input for the next turn; the thinking is left out of the prompt.
    async with raw(thinking_app) as client:
        items = [item.model_dump(exclude_none=True) for item in r.output]
        again = await client.post("/v1/responses", json={"model": M, "input": [*items, {"role": "user", "content": "more"}]})
    assert again.status_code == 200 and again.json()["status"] == "completed"
    # Kept, it replays as the events its stream would have been, thinking first; and continues.
    replayed = [e async for e in await sdk(thinking_app).responses.retrieve(r.id, stream=True)]
    thinking = "".join(e.delta for e in replayed if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in replayed if e.type == "response.output_text.delta")
    assert (thinking, answer) == (THINKING, ANSWER) and replayed[-1].type == "response.completed"
    follow = await sdk(thinking_app).responses.create(model=M, input="more", previous_response_id=r.id)
    assert follow.status == "completed"


async def test_responses_stream_reasoning_events_then_the_message(thinking_app: FastAPI) -> None:
    stream = await sdk(thinking_app).responses.create(model=M, input="x </think> y", temperature=0, stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    thinking = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (thinking, answer) == (THINKING, ANSWER)
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert done.text == THINKING and done.output_index == 0
    # The reasoning item closes before the message opens, at the next index.
    order = [(e.type, getattr(e, "output_index", None)) for e in events if "output_item" in e.type]
    assert [(k, i) for k, i in order] == [
        ("response.output_item.added", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.output_item.done", 1),
    ]
    assert max(i for e in events if (i := getattr(e, "output_index", None)) is not None) == 1
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    final = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["reasoning", "message"]


# Templating -------------------------------------------------------------------------------------


async def test_template_kwargs_reach_the_template(template_app: FastAPI) -> None:
    client = sdk(template_app)
    on = await client.chat.completions.create(model=M, messages=user("hi"), temperature=0)
    off = await client.chat.completions.create(
        model=M, messages=user("hi"), temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    # Thinking on: the prompt opened it, so the whole (tagless) reply is thinking; off: the
    # template closed it, so the whole reply is the answer.
    assert on.choices[0].message.content == "" and getattr(on.choices[0].message, "reasoning_content", None)
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.usage is not None and off.usage.completion_tokens_details is not None
    assert off.usage.completion_tokens_details.reasoning_tokens == 0


async def test_reasoning_effort_reaches_the_template(template_app: FastAPI) -> None:
    client = sdk(template_app)
    r = await client.chat.completions.create(model=M, messages=user("hi"), temperature=0, reasoning_effort="low")
    assert "effort=low" in (getattr(r.choices[0].message, "reasoning_content", None) or "")
    unset = await client.chat.completions.create(model=M, messages=user("hi"), temperature=0)
    assert "effort=unset" in (getattr(unset.choices[0].message, "reasoning_content", None) or "")
    responses = await client.responses.create(model=M, input="hi", temperature=0, reasoning={"effort": "high"})
    assert responses.output[0].type == "reasoning"
    assert "effort=high" in "".join(c.text for c in responses.output[0].content or [])
    # chat_template_kwargs wins over the field.
    both = await client.chat.completions.create(
        model=M, messages=user("hi"), temperature=0, reasoning_effort="low",
        extra_body={"chat_template_kwargs": {"reasoning_effort": "medium"}},
    )
    assert "effort=medium" in (getattr(both.choices[0].message, "reasoning_content", None) or "")


async def test_a_template_that_fails_on_the_variables_is_a_400(tmp_path: Path) -> None:
    template = tmp_path / "strict.jinja"
    template.write_text("{% if strict %}{{ nothing.at_all }}{% endif %}{{ messages[0]['content'] }}")
    async with running(make_app(FakeEngine(), chat_template=template)) as app, raw(app) as client:
        r = await client.post("/v1/chat/completions", json={"model": M, "messages": user("hi"), "chat_template_kwargs": {"strict": True}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
        ok = await client.post("/v1/chat/completions", json={"model": M, "messages": user("hi"), "max_tokens": 3})
        assert ok.status_code == 200


PREFILL: Messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]


async def test_continue_final_message_continues_the_assistant_message(fake_app: FastAPI) -> None:
    engine = FakeEngine()
    continued = engine.render_chat([dict(m) for m in PREFILL], add_generation_prompt=False)
    assert continued.endswith("<assistant> The answer is")
    r = await sdk(fake_app).chat.completions.create(
        model=M, messages=PREFILL, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert r.usage is not None and r.usage.prompt_tokens == len(continued.encode())
    assert r.choices[0].message.content == engine.reply_for(continued)
    # Left at its defaults, the prompt opens a new assistant turn after the prefill.
    fresh = await sdk(fake_app).chat.completions.create(model=M, messages=PREFILL, temperature=0)
    assert fresh.usage is not None and fresh.usage.prompt_tokens == len(continued.encode()) + len("\n<assistant>")


async def test_add_generation_prompt_false_leaves_the_turn_unopened(fake_app: FastAPI) -> None:
    async with raw(fake_app) as client:
        r = await client.post(
            "/v1/chat/completions", json={"model": M, "messages": user("hi"), "add_generation_prompt": False, "max_tokens": 2}
        )
    assert r.json()["usage"]["prompt_tokens"] == len("<user> hi")


BAD = [
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": "enable_thinking=false"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {f"v{i}": i for i in range(65)}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"deep": [[[[[[[[[1]]]]]]]]]}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"big": list(range(2000))}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tools": None}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"eos_token": "<|im_start|>system"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"__class__": 1}}, "chat_template_kwargs"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
    ({"add_generation_prompt": None}, "add_generation_prompt"),
    ({"continue_final_message": 1}, "continue_final_message"),
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt is true by default
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),  # last message is the user's
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": 3}, "reasoning_effort"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
async def test_bad_templating_values_are_a_400_naming_the_field(thinking_app: FastAPI, fields: dict[str, Any], param: str) -> None:
    async with raw(thinking_app) as client:
        r = await client.post("/v1/chat/completions", json={"model": M, "messages": user("hi"), **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-1e999"])
async def test_non_finite_numbers_in_template_kwargs_are_a_400(thinking_app: FastAPI, number: str) -> None:
    body = '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": %s}}' % number
    async with raw(thinking_app) as client:
        r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text


@pytest.mark.parametrize("reasoning", [{"effort": "extreme"}, {"effort": 1}, "high", {"summary": "long"}])
async def test_bad_responses_reasoning_is_a_400(thinking_app: FastAPI, reasoning: Any) -> None:
    async with raw(thinking_app) as client:
        r = await client.post("/v1/responses", json={"model": M, "input": "hi", "reasoning": reasoning})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith("reasoning")


async def test_a_worker_over_http_splits_delta_streams_only() -> None:
    """chatgate's API server asks for deltas and gets the split; FastChat's asks for the whole
    text and gets it as the model wrote it, tags and all."""
    from chatgate.settings import WorkerSettings
    from chatgate.worker.app import create_worker_app

    settings = WorkerSettings(no_register=True, engine="fake", model_names=[M], reasoning_parser="deepseek_r1")
    params = {"model": M, "messages": [{"role": "user", "content": "x </think> y"}], "temperature": 0}
    async with running(create_worker_app(settings, engine=FakeEngine())) as app, raw(app) as client:
        frames = {}
        for delta in (True, False):
            r = await client.post("/worker_generate_stream", json={**params, "delta": delta})
            frames[delta] = [json.loads(f) for f in r.content.split(b"\0") if f]
    split = frames[True]
    assert "".join(f["reasoning_content"] for f in split) == THINKING
    assert "".join(f["text"] for f in split) == ANSWER
    assert split[-1]["usage"]["reasoning_tokens"] == THINKING_TOKENS
    whole = frames[False]
    assert whole[-1]["text"] == THINKING + "</think>" + ANSWER and not any(f.get("reasoning_content") for f in whole)


async def test_an_unauthenticated_caller_learns_nothing_about_the_fields() -> None:
    async with running(make_app(FakeEngine(), api_keys=["sk-right"], reasoning_parser="deepseek_r1")) as app, raw(app) as client:
        body = {"model": M, "messages": user("hi"), "chat_template_kwargs": {"messages": []}, "continue_final_message": True}
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401, r.text
        r = await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-right"})
        assert r.status_code == 400


@pytest.mark.parametrize("with_tools", [False, True])
async def test_the_sdks_stream_helper_assembles_the_reasoning_item(thinking_app: FastAPI, with_tools: bool) -> None:
    """The SDK's `responses.stream` checks that every item's identity holds from `added` to the
    final response; with tools the answer items come when the reply ends, after the thinking."""
    tools: Any = {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]} if with_tools else {}
    async with sdk(thinking_app).responses.stream(model=M, input="x </think> y", temperature=0, **tools) as stream:
        indexes = [e.output_index async for e in stream if e.type == "response.output_item.added"]
        final = await stream.get_final_response()
    assert indexes == [0, 1]
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == ANSWER
    assert "".join(c.text for c in final.output[0].content or []) == THINKING  # type: ignore[union-attr]


@pytest.mark.parametrize(("fields", "param"), [
    ({"continue_final_message": True}, "continue_final_message"),
    ({"chat_template_kwargs": {"messages": 1}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": 7}, "chat_template_kwargs"),
])
async def test_tokenize_takes_the_templating_fields_and_refuses_bad_ones(fake_app: FastAPI, fields: dict[str, Any], param: str) -> None:
    async with raw(fake_app) as client:
        r = await client.post("/tokenize", json={"model": M, "messages": PREFILL, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        ok = await client.post("/tokenize", json={
            "model": M, "messages": PREFILL, "continue_final_message": True, "add_generation_prompt": False,
        })
    continued = FakeEngine().render_chat([dict(m) for m in PREFILL], add_generation_prompt=False)
    assert ok.json()["tokens"] == list(continued.encode())


async def test_only_the_generation_prompt_says_where_the_reply_starts(template_app: FastAPI) -> None:
    """A user's own `<think>` (or `</think>`) is text, not the template's: with thinking off, the
    reply is the answer whatever the conversation says about tags."""
    client = sdk(template_app)
    for said in ("Why do models write <think>?", "What does </think> mean?"):
        r = await client.chat.completions.create(
            model=M, messages=user(said), temperature=0, max_tokens=8,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        assert getattr(r.choices[0].message, "reasoning_content", None) is None and r.choices[0].message.content
        thinking = await client.chat.completions.create(model=M, messages=user(said), temperature=0, max_tokens=8)
        assert getattr(thinking.choices[0].message, "reasoning_content", None) and thinking.choices[0].message.content == ""


async def test_a_users_open_think_tag_does_not_open_the_replys_thinking() -> None:
    async with running(make_app(FakeEngine(), reasoning_parser="qwen3")) as app:
        r = await sdk(app).chat.completions.create(model=M, messages=user("Why do models write <think>?"), temperature=0)
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    engine = FakeEngine()
    assert message.content == engine.reply_for(engine.render_chat([dict(m) for m in user("Why do models write <think>?")]))
