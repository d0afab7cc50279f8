"""The bench's answers check over HTTP, on the default model served by each runner: float32's greedy
answers come back from the float32 torch runner, and bf16 llama.cpp stays close and says Paris."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatgate.bench.answers import encode_replies, reference_answers, score_answers, target_answers
from chatgate.bench.quality import QUALITY_PROMPTS
from chatgate.engines.base import Engine
from chatgate.settings import EngineSettings
from tests.support.runners import runner_of

pytestmark = [pytest.mark.model, pytest.mark.anyio]


# A fifth of the quality prompts, one of each kind and the France question: what the bench does
# for all 50, in a fifth of the time.
PROMPTS = QUALITY_PROMPTS[::5]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return reference_answers(EngineSettings(), prompts=PROMPTS)


async def test_served_answers_are_scored_against_float32(chat_engine: Engine, chat_app: FastAPI, reference: list[list[int]]) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=chat_app), base_url="http://chatgate", timeout=300) as http:
        texts = await target_answers(http, "http://chatgate/v1", model="SmolLM2-135M-Instruct", api_key="sk-test", prompts=PROMPTS)
    scored: dict[str, Any] = score_answers(reference, encode_replies(EngineSettings(), {"t": texts})["t"], texts, PROMPTS)
    assert scored["paris"], scored
    # float32 on torch is float32's greedy path, batched with other rows and re-tokenized from text
    # (measured 0.96 on all 50 prompts); bf16 on llama.cpp drifts further (0.89 on all 50, 0.68
    # on these 10), but keeps most tokens: a broken pairing of prompts and replies scores near 0.
    floor = 0.8 if runner_of(chat_engine) == "torch" else 0.5
    assert scored["agreement_before_first_difference"] >= floor, scored
