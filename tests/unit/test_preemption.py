"""Admission by real KV occupancy and preemption by recompute, on a tiny random Llama: requests
that may run to the whole context still run together, and a sequence preempted mid-decode streams
exactly what it would have streamed alone (greedy, seeded sampling, constrained)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaForCausalLM

from chatgate.engines.base import GenerationOutput, SamplingParams
from chatgate.engines.runners.torch import TorchRunner
from chatgate.engines.scheduler import HEADROOM, Scheduler, SchedulerLimits
from chatgate.engines.sequence import OutputChannel, Sequence
from tests.support.polling import apoll
from tests.support.scheduler import VOCAB, Harness, RowCounter, tiny_model

pytestmark = pytest.mark.anyio

PROMPT = 20  # longer than one prefix-cache block, so a re-prefill can start from a cached one
CONTEXT = 256  # the context these tests pretend the model has: no max_tokens means the rest of it


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def prompts(count: int, seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (PROMPT,), generator=gen).tolist() for _ in range(count)]


def spell(ids: Seq[int]) -> str:
    """A detokeniser under which a lost, repeated or reordered token changes the text."""
    return "".join(f"<{i}>" for i in ids)


class Alternating:
    """A stateful constraint: even tokens at even positions, odd at odd ones. Were its state
    replayed or reset by a preemption, the tokens it allows (and the stream) would change."""

    cut = False

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def mask(self, logits: torch.Tensor, remaining: int) -> None:
        parity = len(self.accepted) % 2
        logits[torch.arange(logits.shape[-1]) % 2 != parity] = float("-inf")

    def accept(self, token: int) -> bool:
        ok = token % 2 == len(self.accepted) % 2
        self.accepted.append(token)
        return ok


@dataclass
class Stream:
    """One request's sequence and everything it streamed."""

    seq: Sequence
    outputs: list[GenerationOutput] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for out in self.outputs for t in out.token_ids]

    @property
    def text(self) -> str:
        return "".join(out.text for out in self.outputs)


async def stream(scheduler: Scheduler, prompt: list[int], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, constrained: bool = False) -> Stream:
    """Submit one sequence and collect its outputs until it finishes."""
    channel = OutputChannel(asyncio.get_running_loop())
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    seq = Sequence(prompt_ids=prompt, params=params, decode=spell, eos_token_ids=frozenset(), channel=channel,
                   constraint=Alternating() if constrained else None)
    scheduler.inbox.put(seq)
    result = Stream(seq)
    while not result.outputs or result.outputs[-1].finish_reason is None:
        result.outputs.append(await asyncio.wait_for(channel.get(), timeout=60))
    return result


def limits(*, kv_tokens: int | None, cache: bool = True) -> SchedulerLimits:
    return SchedulerLimits(max_running=16, prefill_chunk=16, prefill_budget=200, kv_tokens=kv_tokens,
                           prefix_cache_bytes=(1 << 20) if cache else 0, prefix_block=16)


@pytest.fixture
def alone(model: LlamaForCausalLM) -> Iterator[Harness]:
    h = Harness(model, limits(kv_tokens=None, cache=False))
    yield h
    h.close()


def assert_streamed_whole(result: Stream, expected: list[int]) -> None:
    """The stream holds `expected` once, in order: no token lost, repeated or reordered."""
    assert result.tokens == expected
    assert result.text == spell(expected)
    assert [out.completion_tokens for out in result.outputs] == list(range(1, len(expected) + 1))
    assert result.outputs[-1].finish_reason == "length"


async def test_requests_that_may_fill_the_context_run_together_and_all_finish(model: LlamaForCausalLM) -> None:
    counter = RowCounter(model)
    budget = 2 * CONTEXT  # two full contexts: reserving them, only two requests could run at once
    h = Harness(counter, limits(kv_tokens=budget))
    try:
        # As a request without max_tokens: it may run to the end of the context.
        results = await asyncio.gather(*(stream(h.scheduler, p, max_tokens=CONTEXT - PROMPT) for p in prompts(8)))
        assert all(len(r.tokens) == CONTEXT - PROMPT for r in results)
        assert max(counter.decode_rows) == 8 > budget // CONTEXT
        assert h.scheduler.preemptions > 0  # they outgrew the budget together, and were taken in turns
        await apoll(lambda: h.scheduler.kv_used == 0, what="every row released", timeout=5)
    finally:
        h.close()


@pytest.mark.parametrize("cache", [True, False], ids=["prefix cache", "no prefix cache"])
async def test_preempted_sequences_stream_what_they_would_alone(model: LlamaForCausalLM, alone: Harness, cache: bool) -> None:
    ps, max_tokens = prompts(4), 40
    expected = [await alone.generate(p, max_tokens=max_tokens) for p in ps]
    # Four fit when admitted (4 x (20 + HEADROOM) tokens) but not once they have grown to 30 each.
    budget = 4 * (PROMPT + HEADROOM) + 8
    h = Harness(model, limits(kv_tokens=budget, cache=cache))
    try:
        results = await asyncio.gather(*(stream(h.scheduler, p, max_tokens=max_tokens) for p in ps))
        for result, tokens in zip(results, expected, strict=True):
            assert_streamed_whole(result, tokens)
        assert sum(r.seq.preemptions for r in results) == h.scheduler.preemptions > 0
        assert results[0].seq.preemptions == 0  # the first admitted is never taken while others run
    finally:
        h.close()


async def test_seeded_sampling_is_unchanged_by_preemption(model: LlamaForCausalLM, alone: Harness) -> None:
    ps, max_tokens, seeds = prompts(4, seed=9), 40, [11, 12, 13, 14]
    h = Harness(model, limits(kv_tokens=4 * (PROMPT + HEADROOM) + 8))
    try:
        expected = [await alone.generate(p, max_tokens=max_tokens, temperature=1.0, seed=s) for p, s in zip(ps, seeds, strict=True)]
        results = await asyncio.gather(*(
            stream(h.scheduler, p, max_tokens=max_tokens, temperature=1.0, seed=s) for p, s in zip(ps, seeds, strict=True)
        ))
        assert [r.tokens for r in results] == expected
        assert any(r.seq.preemptions for r in results)
    finally:
        h.close()


async def test_a_constraint_carries_on_across_a_preemption(model: LlamaForCausalLM) -> None:
    ps, max_tokens = prompts(4, seed=13), 40
    free = Harness(model, limits(kv_tokens=None))
    tight = Harness(model, limits(kv_tokens=4 * (PROMPT + HEADROOM) + 8))
    try:
        expected = [(await stream(free.scheduler, p, max_tokens=max_tokens, constrained=True)).tokens for p in ps]
        results = await asyncio.gather(*(stream(tight.scheduler, p, max_tokens=max_tokens, constrained=True) for p in ps))
        for result, tokens in zip(results, expected, strict=True):
            assert_streamed_whole(result, tokens)
            assert isinstance(result.seq.constraint, Alternating) and result.seq.constraint.accepted == tokens
            assert all(t % 2 == i % 2 for i, t in enumerate(tokens))
        assert any(r.seq.preemptions for r in results)
    finally:
        free.close()
        tight.close()


async def test_the_last_sequence_is_never_preempted(model: LlamaForCausalLM, alone: Harness) -> None:
    # One sequence may grow to the whole budget: it runs to its end without giving its KV back.
    prompt, budget = prompts(1)[0], 64
    h = Harness(model, limits(kv_tokens=budget))
    try:
        result = await stream(h.scheduler, prompt, max_tokens=budget - PROMPT)
        assert_streamed_whole(result, await alone.generate(prompt, max_tokens=budget - PROMPT))
        assert h.scheduler.preemptions == 0
    finally:
        h.close()


def test_a_preempted_cache_hit_does_not_block_a_prompt_still_prefilling(model: LlamaForCausalLM) -> None:
    """Found in review: a whole-prompt cache hit admitted while a long prompt was mid-way through
    its chunked prefill was preempted to the head of the queue, where it could not fit beside that
    prompt's KV, while only the head may advance: nothing ever moved again."""
    loop = asyncio.new_event_loop()
    try:
        scheduler = Scheduler(runner=TorchRunner(model, pad_token_id=0), limits=SchedulerLimits(
            max_running=16, prefill_chunk=2, prefill_budget=200, kv_tokens=200, prefix_cache_bytes=1 << 22, prefix_block=16,
        ))

        def submit(prompt: list[int], max_tokens: int) -> Sequence:
            seq = Sequence(prompt_ids=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                           decode=spell, eos_token_ids=frozenset(), channel=OutputChannel(loop))
            scheduler.inbox.put(seq)
            return seq

        gen = torch.Generator().manual_seed(1)
        cached, chunked = (torch.randint(1, VOCAB, (80,), generator=gen).tolist() for _ in range(2))
        submit(cached, 1)  # someone sends it once: now the prefix cache holds it whole
        while scheduler.pending():
            scheduler.step()
        long = submit(chunked, 10)
        scheduler.step()  # its prefill starts, two tokens a step
        hit = submit(cached, 100)  # a whole-prompt hit: it starts at once, admitted after `long`
        for _ in range(400):
            if not scheduler.pending():
                break
            scheduler.step()
        assert scheduler.preemptions >= 1  # the hit outgrew the budget beside the prefilling prompt
        assert (len(hit.output_ids), len(long.output_ids)) == (100, 10)
    finally:
        loop.close()
