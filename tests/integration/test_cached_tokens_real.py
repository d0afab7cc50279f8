"""Cached prompt tokens on the default model, on every runner: the second request sharing a
1,000-token system prompt reports at least 960 of them in `usage.prompt_tokens_details.cached_tokens`
(read by the openai SDK), in chat, completions, a stream's usage and Responses; a request's `n`
choices count their prompt once; another `cache_salt` reports none."""

from __future__ import annotations

import pytest

from chatgate.engines.base import Engine
from tests.support.app import Messages, make_app, running, sdk

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
# Distinct from every other test's prompts, so nothing else has cached it first.
SYSTEM = "You keep the harbour ledger. The berths today:\n" + "\n".join(
    f"Berth {i}: the {['Heron', 'Osprey', 'Tern', 'Gannet', 'Puffin'][i % 5]} {i}, {i * 11 % 17} crates of "
    f"{['salt', 'tea', 'wool', 'tin'][i % 4]}, leaves at {i * 5 % 24}:00."
    for i in range(34)
)


def conversation(question: str) -> Messages:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def test_the_second_request_sharing_a_long_system_prompt_reports_it_cached(chat_engine: Engine) -> None:
    async with running(make_app(chat_engine)) as app:
        system_tokens = len(chat_engine.encode(SYSTEM))
        assert 980 <= system_tokens <= 1200, system_tokens
        client = sdk(app)

        async def cached(question: str, **extra: object) -> tuple[int, int]:
            response = await client.chat.completions.create(
                model=MODEL, messages=conversation(question), temperature=0, max_tokens=1, **extra  # type: ignore[call-overload]
            )
            usage = response.usage
            assert usage is not None and usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens is not None
            return usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens

        first, prompt = await cached("Which ship is at berth 3?")
        assert first == 0 and prompt > system_tokens
        second, prompt = await cached("Which ship is at berth 9?")
        assert 960 <= second < prompt
        # n copies of one prompt: counted once, as the prompt is.
        many, prompt = await cached("What does berth 20 hold?", n=3)
        assert 960 <= many < prompt
        # Another salt shares nothing, however often the prompt was sent unsalted.
        salted, _ = await cached("Which ship is at berth 9?", extra_body={"cache_salt": "another tenant"})
        assert salted == 0
        again, _ = await cached("When does berth 30 leave?", extra_body={"cache_salt": "another tenant"})
        assert again >= 960

        stream = await client.chat.completions.create(
            model=MODEL, messages=conversation("What is at berth 12?"), temperature=0, max_tokens=1, stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk async for chunk in stream][-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert (usage.prompt_tokens_details.cached_tokens or 0) >= 960

        text = SYSTEM + "\n\nQuestion: which ship is at berth 4?\nAnswer:"
        cold = await client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0)
        warm = await client.completions.create(model=MODEL, prompt=text + " The", max_tokens=1, temperature=0)
        assert cold.usage is not None and warm.usage is not None
        assert cold.usage.prompt_tokens_details is not None and warm.usage.prompt_tokens_details is not None
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert (warm.usage.prompt_tokens_details.cached_tokens or 0) >= 960

        response = await client.responses.create(
            model=MODEL, instructions=SYSTEM, input="Which ship is at berth 15?", max_output_tokens=16, temperature=0
        )
        assert response.usage is not None
        assert response.usage.input_tokens_details.cached_tokens >= 960
