"""The continuous-batching scheduler on a tiny random Llama: batching must not change results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaForCausalLM

from chatgate.engines.kernels import use_skinny_linears
from chatgate.engines.kvcache import BatchKV
from chatgate.engines.scheduler import SchedulerLimits
from tests.support.scheduler import VOCAB, Harness, prompts, tiny_model

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture
def harness(model: LlamaForCausalLM) -> Iterator[Harness]:
    h = Harness(model, SchedulerLimits(max_running=8, prefill_chunk=16, prefill_budget=40))
    yield h
    h.close()


def reference(model: LlamaForCausalLM, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    generated: list[int] = out[0, len(prompt):].tolist()
    return generated


async def test_alone_matches_hugging_face_generate(harness: Harness, model: LlamaForCausalLM) -> None:
    for prompt in prompts()[:4]:
        assert await harness.generate(prompt) == reference(model, prompt, 12)


async def test_batched_equals_alone(harness: Harness) -> None:
    alone = [await harness.generate(p) for p in prompts()]
    together = await asyncio.gather(*(harness.generate(p) for p in prompts()))
    assert together == alone


async def test_staggered_joins_and_different_lengths(harness: Harness) -> None:
    ps = prompts()
    alone = [await harness.generate(p, max_tokens=4 + 3 * i) for i, p in enumerate(ps)]

    async def later(i: int) -> list[int]:
        await asyncio.sleep(0.01 * i)
        return await harness.generate(ps[i], max_tokens=4 + 3 * i)

    assert await asyncio.gather(*(later(i) for i in range(len(ps)))) == alone


async def test_seeded_sampling_ignores_batch_company(harness: Harness) -> None:
    prompt = prompts()[1]
    alone = await harness.generate(prompt, temperature=1.0, seed=42)
    crowd = await asyncio.gather(harness.generate(prompt, temperature=1.0, seed=42),
                                 *(harness.generate(p, temperature=1.0) for p in prompts()))
    assert crowd[0] == alone
    assert await harness.generate(prompt, temperature=1.0, seed=43) != alone


async def test_identical_prompts_share_a_prefill_row(harness: Harness) -> None:
    prompt = prompts()[2]
    outs = await asyncio.gather(*(harness.generate(prompt) for _ in range(4)))
    assert all(o == outs[0] for o in outs)


async def test_cancelled_sequence_leaves_and_others_finish(harness: Harness) -> None:
    ps = prompts()
    expected = await harness.generate(ps[0], max_tokens=30)
    results = await asyncio.gather(harness.generate(ps[1], max_tokens=200, cancel_after=3),
                                   harness.generate(ps[0], max_tokens=30))
    assert results[1] == expected
    for _ in range(100):
        if harness.scheduler.pending() == 0:
            break
        await asyncio.sleep(0.02)
    assert harness.scheduler.pending() == 0


async def test_more_sequences_than_slots_queue(model: LlamaForCausalLM) -> None:
    h = Harness(model, SchedulerLimits(max_running=2, prefill_chunk=16, prefill_budget=40))
    try:
        ps = prompts()[:6]
        alone = [await h.generate(p) for p in ps]
        assert await asyncio.gather(*(h.generate(p) for p in ps)) == alone
    finally:
        h.close()


def test_skinny_linears_match_linear(model: LlamaForCausalLM) -> None:
    copy = tiny_model()
    use_skinny_linears(copy)
    for rows in (1, 2, 4, 7):
        x = torch.randint(1, VOCAB, (rows, 5))
        with torch.inference_mode():
            assert torch.allclose(copy(x).logits, model(x).logits, atol=1e-4)


def test_batch_kv_extend_and_select_keep_rows_aligned() -> None:
    kv = BatchKV(1)
    kv.pads = [0]
    kv.layers[0].update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    other = BatchKV(1)
    other.pads = [0]
    other.layers[0].update(torch.full((1, 1, 5, 2), 2.0), torch.full((1, 1, 5, 2), 2.0))
    kv.extend(other)
    assert kv.pads == [2, 0] and kv.length == 5
    assert kv.attention_mask(1).tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert kv.positions(1).tolist() == [[3], [5]]
    kv.select([1])
    assert kv.pads == [0] and kv.length == 5
    kv.select([0, 0])
    assert kv.rows == 2 and torch.equal(kv.layers[0].valid()[0][0], kv.layers[0].valid()[0][1])
