"""The KV budget on the default model, through the SDK: the context reported is capped at what the
budget holds, a request beyond it gets a 400 at once, and requests beyond the batch's room queue
and all complete."""

from __future__ import annotations

import asyncio

import openai
import pytest

from chatgate.engines.transformers import TransformersEngine
from chatgate.settings import EngineSettings
from tests.conftest import make_app, running, sdk, user
from tests.polling import apoll

pytestmark = [pytest.mark.anyio, pytest.mark.model]

MODEL = "SmolLM2-135M-Instruct"
# SmolLM2-135M keeps 45 KiB of float32 keys and values per token: 0.01 GiB holds 233 tokens.
BUDGET_GIB, BUDGET_TOKENS = 0.01, 233


async def test_a_small_kv_budget_refuses_what_cannot_fit_and_queues_the_rest() -> None:
    engine = TransformersEngine(EngineSettings(kv_cache_gib=BUDGET_GIB))
    async with running(make_app(engine)) as app:
        client = sdk(app)
        assert engine.info.context_length == BUDGET_TOKENS
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=BUDGET_TOKENS)
        assert refused.value.code == "context_length_exceeded"
        assert f"maximum context length is {BUDGET_TOKENS} tokens" in refused.value.message
        # Each needs ~100 tokens of KV: two run at a time, the others wait their turn.
        answers = await asyncio.gather(*(
            client.chat.completions.create(model=MODEL, messages=user(f"Count to {i}."), max_tokens=60, temperature=0)
            for i in range(5)
        ))
        assert all(a.choices[0].message.content for a in answers)
        stats = engine.stats()
        assert stats is not None and stats.kv_cache_budget_tokens == BUDGET_TOKENS

        def released() -> bool:
            now = engine.stats()
            return now is not None and now.kv_cache_used_tokens == 0

        await apoll(released, what="the finished sequences' KV released", timeout=5)
