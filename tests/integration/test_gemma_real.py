"""Gemma 3 270M (`--model-path gemma3-270m`, a second architecture: Gemma norms, sliding-window
attention) served end to end on both runners: greedy text alone equals greedy text batched, the
runners agree with each other, and streaming, logprobs, n, seed, stop, grammars and /tokenize are
checked against the model's own answers, never fixed strings. It is a pretrained model whose GGUF
has no chat template: chat is a 400 naming that."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi import FastAPI

from chatgate.engines.base import Engine
from chatgate.engines.loading import GEMMA_MODEL_PATH, GEMMA_NAME
from tests.support.app import make_app, raw, running, sdk, user
from tests.support.runners import RUNNERS, runner_of

pytestmark = [pytest.mark.anyio, pytest.mark.model]

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]
TOKENS = 16


_LOADED: dict[str, Engine] = {}


def _engine(runner: str) -> Engine:
    """Gemma on `runner`, built once per session (each app starts and stops it)."""
    if runner not in _LOADED:
        _LOADED[runner] = _build(runner)
    return _LOADED[runner]


def _build(runner: str) -> Engine:
    from chatgate.settings import EngineSettings

    # A 2,048-token context keeps llama.cpp's KV small (Gemma 3 was trained on 32,768).
    settings = EngineSettings(model_path=GEMMA_MODEL_PATH, max_model_len=2048, num_threads=1)
    if runner == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it)")
        from chatgate.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(settings)
    from chatgate.engines.transformers import TransformersEngine

    return TransformersEngine(settings)


@pytest.fixture(scope="module", params=RUNNERS)
def gemma_engine(request: pytest.FixtureRequest) -> Engine:
    """Gemma on each runner, loaded once per module."""
    return _engine(str(request.param))


@pytest.fixture
async def gemma(gemma_engine: Engine) -> AsyncIterator[FastAPI]:
    async with running(make_app(gemma_engine)) as app:
        yield app


class Greedy:
    """A greedy answer: its tokens and, at each, the two best log-probabilities."""

    def __init__(self, text: str, tokens: list[str], top: list[dict[str, float]]) -> None:
        self.text, self.tokens, self.top = text, tokens, top

    def margin(self, at: int) -> float:
        """How far the best token led the second at position `at` (nats)."""
        best = sorted(self.top[at].values(), reverse=True)
        return best[0] - best[1]


async def greedy(app: FastAPI, prompt: str, **extra: Any) -> Greedy:
    """Greedy answer to `prompt`, with the two best tokens at each step."""
    reply = await sdk(app).completions.create(
        model=GEMMA_NAME, prompt=prompt, max_tokens=TOKENS, temperature=0, logprobs=2, **extra
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    return Greedy(reply.choices[0].text, logprobs.tokens, logprobs.top_logprobs)


def assert_alike(a: Greedy, b: Greedy, *, tie: float) -> None:
    """`a` and `b` are one greedy answer, or part where `a`'s two best tokens were within `tie`
    nats, a near-tie that a different summation order may tip (never before their 4th token)."""
    parted = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), None)
    if parted is None:
        assert a.text == b.text
        return
    assert parted >= 4 and a.margin(parted) < tie, (parted, a.tokens, b.tokens, a.top[parted])
    assert b.tokens[parted] in a.top[parted]  # the runner-up there


async def test_greedy_alone_equals_greedy_batched(gemma: FastAPI, gemma_engine: Engine) -> None:
    """Bit-equal on torch; llama.cpp's Q4_K kernels sum a batch of rows in another order than one
    row, so there the answers may part at a near-tie (a few hundredths of a nat)."""
    alone = [await greedy(gemma, p) for p in PROMPTS]
    together = await asyncio.gather(*(greedy(gemma, p) for p in PROMPTS))
    tie = 0.0 if runner_of(gemma_engine) == "torch" else 0.1
    for a, b in zip(alone, together, strict=True):
        assert_alike(a, b, tie=tie)
    assert all(len(a.tokens) == TOKENS for a in alone)  # a pretrained model runs on
    assert sum(a.text == b.text for a, b in zip(alone, together)) >= len(PROMPTS) // 2


async def test_the_runners_agree_on_greedy_text() -> None:
    """llama.cpp multiplies the Q4_K_M weights as they are, torch their float32 dequantization:
    the sums differ a little more, so answers may part at a closer call, never at the start."""
    answers: dict[str, list[Greedy]] = {}
    for runner in RUNNERS:
        async with running(make_app(_engine(runner))) as app:
            answers[runner] = [await greedy(app, p) for p in PROMPTS]
    first, second = (answers[r] for r in RUNNERS)
    for a, b in zip(first, second, strict=True):
        assert_alike(a, b, tie=0.5)
    assert sum(a.text == b.text for a, b in zip(first, second)) >= len(PROMPTS) // 2


async def test_streaming_sends_the_greedy_text(gemma: FastAPI) -> None:
    text = (await greedy(gemma, PROMPTS[1])).text
    stream = await sdk(gemma).completions.create(
        model=GEMMA_NAME, prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len(pieces) > 1 and "".join(pieces) == text


async def test_logprobs_rank_the_greedy_token_first(gemma: FastAPI) -> None:
    reply = await sdk(gemma).completions.create(
        model=GEMMA_NAME, prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0, logprobs=3
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.tokens is not None and len(logprobs.tokens) == TOKENS
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen is not None and chosen <= 0
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-3)
        assert top.get(token) == pytest.approx(chosen, abs=1e-3)


async def test_n_choices_with_a_seed_repeat_and_greedy_n_are_alike(gemma: FastAPI) -> None:
    client = sdk(gemma)

    async def sampled(seed: int) -> list[str]:
        reply = await client.completions.create(
            model=GEMMA_NAME, prompt=PROMPTS[1], max_tokens=TOKENS, temperature=1.0, n=3, seed=seed
        )
        assert [c.index for c in reply.choices] == [0, 1, 2]
        return [c.text for c in reply.choices]

    first, again = await sampled(7), await sampled(7)
    assert first == again
    assert len(set(first)) > 1  # three draws, not one copied
    greedy_n = await client.completions.create(model=GEMMA_NAME, prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0, n=2)
    text = (await greedy(gemma, PROMPTS[1])).text
    assert [c.text for c in greedy_n.choices] == [text, text]


async def test_stop_cuts_the_greedy_text_at_the_stop_string(gemma: FastAPI) -> None:
    text = (await greedy(gemma, PROMPTS[0])).text
    words = text.split()
    stop = words[len(words) // 2]
    reply = await sdk(gemma).completions.create(
        model=GEMMA_NAME, prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0, stop=[stop]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text[: text.index(stop)]


async def test_a_json_schema_and_a_regex_constrain_the_answer(gemma: FastAPI) -> None:
    """vLLM's `structured_outputs` on completions (chat's `response_format` needs a chat template)."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "year": {"type": "integer"}},
              "required": ["city", "year"], "additionalProperties": False}
    async with raw(gemma) as http:
        r = await http.post("/v1/completions", json={
            "model": GEMMA_NAME, "prompt": "A city and a year, as JSON:", "max_tokens": 60, "temperature": 0,
            "structured_outputs": {"json": schema},
        })
        assert r.status_code == 200, r.text
        answer = json.loads(r.json()["choices"][0]["text"])
        assert set(answer) == {"city", "year"} and isinstance(answer["year"], int)
        date = r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-2]\d"
        r = await http.post("/v1/completions", json={
            "model": GEMMA_NAME, "prompt": "The date today is", "max_tokens": 20, "temperature": 0,
            "structured_outputs": {"regex": date},
        })
        assert r.status_code == 200, r.text
        assert re.fullmatch(date, r.json()["choices"][0]["text"])


async def test_tokenize_counts_what_generation_takes(gemma: FastAPI, gemma_engine: Engine) -> None:
    async with raw(gemma) as http:
        r = await http.post("/tokenize", json={"model": GEMMA_NAME, "prompt": PROMPTS[2]})
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        back = await http.post("/detokenize", json={"model": GEMMA_NAME, "tokens": tokens})
    assert tokens == gemma_engine.encode(PROMPTS[2]) and tokens[0] == 2  # Gemma's <bos>
    assert r.json()["max_model_len"] == 2048
    assert back.json()["prompt"].endswith(PROMPTS[2])
    reply = await sdk(gemma).completions.create(model=GEMMA_NAME, prompt=PROMPTS[2], max_tokens=1, temperature=0)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(tokens)


async def test_chat_without_a_chat_template_is_a_400_saying_so(gemma: FastAPI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(gemma).chat.completions.create(model=GEMMA_NAME, messages=[{"role": "user", "content": "Hi"}])
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "messages"
    assert "no chat template" in error["message"] and "--chat-template" in error["message"]
    async with raw(gemma) as http:
        r = await http.post("/tokenize", json={"model": GEMMA_NAME, "messages": [{"role": "user", "content": "Hi"}]})
        streamed = await http.post("/v1/chat/completions", json={
            "model": GEMMA_NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
        })
        responses = await http.post("/v1/responses", json={"model": GEMMA_NAME, "input": "Hi"})
        messages = await http.post("/v1/messages", json={
            "model": GEMMA_NAME, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
        })
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert streamed.status_code == 400 and "no chat template" in streamed.json()["error"]["message"]
    for other in (responses, messages):  # the Responses and Anthropic Messages APIs, in their shapes
        assert other.status_code == 400 and "no chat template" in other.json()["error"]["message"], other.text


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


async def test_chat_with_a_chat_template_file(tmp_path: Any) -> None:
    """`--chat-template FILE` gives a model without one a chat template (Gemma's turn markers)."""
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    engine = _engine("llama.cpp")
    async with running(make_app(engine, chat_template=template)) as app:
        messages = [{"role": "user", "content": "Name a colour."}]
        async with raw(app) as http:
            r = await http.post("/tokenize", json={"model": GEMMA_NAME, "messages": messages})
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        turn = engine.encode("<start_of_turn>", add_special_tokens=False)
        assert tokens[0] == 2 and len(turn) == 1 and tokens.count(turn[0]) == 2  # user's turn, model's turn
        reply = await sdk(app).chat.completions.create(
            model=GEMMA_NAME, messages=user("Name a colour."), max_tokens=8, temperature=0
        )
        assert reply.usage is not None and reply.usage.prompt_tokens == len(tokens)
        assert reply.choices[0].message.content
