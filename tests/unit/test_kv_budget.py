"""Admission by KV budget on a tiny random Llama: sequences queue while the budget is full, results
do not change, and a sequence that could never fit is refused at once."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatgate.engines.kvbudget import kv_bytes_per_token, kv_token_budget, unmap_freed_buffers
from chatgate.engines.kvcache import BatchKV
from chatgate.engines.scheduler import SchedulerLimits
from chatgate.errors import ContextLengthExceededError
from tests.support.polling import apoll
from tests.support.scheduler import VOCAB, Harness, RowCounter, tiny_model

pytestmark = pytest.mark.anyio

PROMPT, MAX_TOKENS = 10, 12


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (PROMPT,), generator=gen).tolist() for _ in range(count)]


@pytest.fixture
def unbounded(model: LlamaForCausalLM) -> Iterator[Harness]:
    h = Harness(model, SchedulerLimits(max_running=8))
    yield h
    h.close()


async def test_sequences_queue_while_the_budget_is_full_and_results_do_not_change(
    model: LlamaForCausalLM, unbounded: Harness
) -> None:
    counter = RowCounter(model)
    bounded = Harness(counter, SchedulerLimits(max_running=8, kv_tokens=2 * (PROMPT + MAX_TOKENS)))
    try:
        ps = prompts(6)
        expected = [await unbounded.generate(p, max_tokens=MAX_TOKENS) for p in ps]
        assert await asyncio.gather(*(bounded.generate(p, max_tokens=MAX_TOKENS) for p in ps)) == expected
        assert max(counter.decode_rows) == 2
        await apoll(lambda: bounded.scheduler.kv_used == 0, what="every row released", timeout=5)
    finally:
        bounded.close()


async def test_a_sequence_that_could_never_fit_is_refused_and_others_carry_on(model: LlamaForCausalLM) -> None:
    h = Harness(model, SchedulerLimits(max_running=8, kv_tokens=PROMPT + MAX_TOKENS))
    try:
        ps = prompts(2)
        with pytest.raises(ContextLengthExceededError, match="KV cache"):
            await h.generate(ps[0], max_tokens=MAX_TOKENS + 1)
        assert len(await h.generate(ps[1], max_tokens=MAX_TOKENS)) == MAX_TOKENS
    finally:
        h.close()


def test_the_cache_grows_no_further_than_the_longest_reservation() -> None:
    kv = BatchKV(1)
    kv.pads = [0]
    kv.limit_columns(100)
    for _ in range(99):
        kv.layers[0].update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    keys, _ = kv.layers[0].valid()
    assert kv.length == 99 and keys.untyped_storage().nbytes() <= 100 * 2 * 4


def test_the_budget_comes_from_memory_and_the_model_shape() -> None:
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    per_token = kv_bytes_per_token(config, torch.float32)
    assert per_token == 2 * 30 * 3 * 64 * 4
    assert kv_bytes_per_token(config, torch.bfloat16) == per_token // 2
    assert kv_token_budget(gib=1.0, bytes_per_token=per_token, free_bytes=0, ceiling=10) == 2**30 // per_token
    # Unset: a quarter of free memory, but never more than the batch could use.
    assert kv_token_budget(gib=None, bytes_per_token=1000, free_bytes=8_000_000, ceiling=10**9) == 2000
    assert kv_token_budget(gib=None, bytes_per_token=1000, free_bytes=8_000_000, ceiling=500) == 500


def test_freed_cache_buffers_go_back_to_the_os_under_glibc() -> None:
    assert unmap_freed_buffers() is (platform.libc_ver()[0] == "glibc")
