"""The API server end to end on the fake engine, through the official openai SDK and raw HTTP."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from tests.support.app import Messages, as_dicts, make_app, raw, running, sdk

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
USER: Messages = [{"role": "user", "content": "What is up?"}]


def expected_reply(messages: Messages) -> str:
    engine = FakeEngine()
    return engine.reply_for(engine.render_chat(as_dicts(messages)))


async def test_models_list_and_retrieve(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("nope")
    assert err.value.code == "model_not_found"


async def test_chat_completion(fake_app: FastAPI) -> None:
    response = await sdk(fake_app).chat.completions.create(model=MODEL, messages=USER, temperature=0)
    choice = response.choices[0]
    assert choice.message.content == expected_reply(USER)
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    prompt = FakeEngine().render_chat(as_dicts(USER))
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(prompt.encode())
    assert response.usage.completion_tokens == len(expected_reply(USER).encode()) + 1  # + EOS
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


async def test_chat_stream_equals_non_stream(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    stream = await client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_reply(USER)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(expected_reply(USER).encode()) + 1


async def test_chat_n_choices_streamed_interleave_by_index(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    response = await client.chat.completions.create(model=MODEL, messages=USER, n=3, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage is not None
    assert response.usage.completion_tokens == 3 * (len(expected_reply(USER).encode()) + 1)
    stream = await client.chat.completions.create(model=MODEL, messages=USER, n=3, temperature=0, stream=True)
    texts = {0: "", 1: "", 2: ""}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert set(texts.values()) == {expected_reply(USER)}


async def test_max_tokens_gives_length(fake_app: FastAPI) -> None:
    response = await sdk(fake_app).chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 5


async def test_stop_sequence_is_not_returned(fake_app: FastAPI) -> None:
    reply = expected_reply(USER)
    response = await sdk(fake_app).chat.completions.create(model=MODEL, messages=USER, stop=["✓"], temperature=0)
    assert response.choices[0].message.content == reply.split("✓")[0]
    assert response.choices[0].finish_reason == "stop"


async def test_completions_prompt_list_n_echo_stop(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    prompts = ["Once upon a time", "In a galaxy"]
    response = await client.completions.create(model=MODEL, prompt=prompts, n=2, echo=True, max_tokens=200, temperature=0)
    assert len(response.choices) == 4
    for choice in response.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text == prompt + FakeEngine.reply_for(prompt)
    assert response.usage is not None
    assert response.usage.prompt_tokens == sum(len(p.encode()) for p in prompts)
    stopped = await client.completions.create(model=MODEL, prompt="Once", stop="✓", max_tokens=200, temperature=0)
    assert stopped.choices[0].text == FakeEngine.reply_for("Once").split("✓")[0]


async def test_completions_default_max_tokens_is_16(fake_app: FastAPI) -> None:
    response = await sdk(fake_app).completions.create(model=MODEL, prompt="Once upon a time")
    assert response.usage is not None and response.usage.completion_tokens == 16
    assert response.choices[0].finish_reason == "length"


async def test_completions_stream_and_token_prompts(fake_app: FastAPI) -> None:
    client = sdk(fake_app)
    stream = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=200, stream=True, temperature=0)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == FakeEngine.reply_for("Hello")
    tokens = list("Hello".encode())
    response = await client.completions.create(model=MODEL, prompt=[tokens, tokens], max_tokens=200, temperature=0)
    assert [c.text for c in response.choices] == [FakeEngine.reply_for("Hello")] * 2


async def test_unknown_model_is_404(fake_app: FastAPI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await sdk(fake_app).chat.completions.create(model="gpt-9", messages=USER)
    assert err.value.code == "model_not_found"


async def test_context_length_exceeded(fake_app: FastAPI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await sdk(fake_app).completions.create(model=MODEL, prompt="x" * 1000, max_tokens=100)
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in err.value.message


async def test_bad_request_is_400_with_param(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages[0].role"
        r = await http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "x-request-id" in r.headers


async def test_api_keys_are_checked(fake_engine: FakeEngine) -> None:
    async with running(make_app(fake_engine, api_keys=["sk-good"])) as app:
        with pytest.raises(openai.AuthenticationError):
            await sdk(app, api_key="sk-bad").models.list()
        assert (await sdk(app, api_key="sk-good").models.list()).data
        async with raw(app) as http:
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/v1/models")).status_code == 401


async def test_health(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}


async def test_raw_sse_format(fake_app: FastAPI) -> None:
    async with raw(fake_app) as http:
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"


BAD_RESPONSE_FORMATS = [
    ({"type": "json_schema"}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"minimum": "zero"}}}}}, "response_format.json_schema.schema"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
]


@pytest.mark.parametrize(("fmt", "param"), BAD_RESPONSE_FORMATS)
async def test_bad_response_format_is_400_before_any_engine(fake_app: FastAPI, fmt: dict[str, object], param: str) -> None:
    """The schema is checked in the protocol, so an engine without grammars gives the same 400."""
    async with raw(fake_app) as http:
        r = await http.post("/v1/chat/completions", json={"model": "fake-model", "messages": USER, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"
