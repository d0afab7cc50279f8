"""One sequence's failure ends that sequence only; the rest of the batch finishes unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence as Seq
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from chatgate.engines.base import SamplingParams
from chatgate.engines.sampling import make_generator
from chatgate.engines.scheduler import Scheduler, SchedulerLimits
from chatgate.engines.sequence import OutputChannel, Sequence
from tests.support.polling import apoll
from tests.support.scheduler import VOCAB, prompts, scheduler_thread, tiny_model

pytestmark = pytest.mark.anyio
FAIL_AT = 4  # the faulty sequence fails at its fifth token


class Boom(RuntimeError):
    """The injected failure."""


@dataclass
class Fault:
    """Where a sequence fails: its constraint, its detokeniser or its logprobs."""

    kind: str
    steps: int = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps > FAIL_AT:
            raise Boom(self.kind)

    cut = False

    # A constraint that allows everything until it breaks.
    def mask(self, logits: torch.Tensor, remaining: int) -> None:
        if self.kind == "grammar mask":
            self.tick()

    def accept(self, token: int) -> bool:
        if self.kind == "grammar accept":
            self.tick()
        return True

    def decode(self, ids: Seq[int]) -> str:
        if self.kind == "detokenise":
            self.tick()
        return "x" * len(ids)


KINDS = ["grammar mask", "grammar accept", "detokenise", "logprobs"]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture
def scheduler(model: LlamaForCausalLM) -> Iterator[Scheduler]:
    with scheduler_thread(model, SchedulerLimits(max_running=8, prefill_chunk=16, prefill_budget=200)) as s:
        yield s


async def run(
    scheduler: Scheduler, prompt: list[int], fault: Fault | None = None, max_tokens: int = 16,
    started: asyncio.Event | None = None,
) -> list[int]:
    """Generate greedily; with a fault, the sequence fails as the fault says."""
    channel = OutputChannel(asyncio.get_running_loop())
    # An invalid logprobs count makes top-k fail while scoring this row only.
    logprobs = -1 if fault is not None and fault.kind == "logprobs" else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs)
    decode: Callable[[Seq[int]], str] = fault.decode if fault is not None else (lambda ids: "x" * len(ids))
    constraint: Any = fault if fault is not None and fault.kind.startswith("grammar") else None
    scheduler.inbox.put(Sequence(prompt_ids=prompt, params=params, decode=decode, eos_token_ids=frozenset(),
                                 channel=channel, generator=make_generator(0), constraint=constraint))
    tokens: list[int] = []
    while True:
        out = await asyncio.wait_for(channel.get(), timeout=60)
        tokens += out.token_ids
        if started is not None:
            started.set()
        if out.finish_reason:
            return tokens


@pytest.mark.parametrize("kind", KINDS)
async def test_one_failing_sequence_of_eight_fails_alone(scheduler: Scheduler, kind: str) -> None:
    batch = prompts()[:8]
    expected = await asyncio.gather(*(run(scheduler, p) for p in batch))
    faulty = 3
    results = await asyncio.gather(
        *(run(scheduler, p, Fault(kind) if i == faulty else None) for i, p in enumerate(batch)),
        return_exceptions=True,
    )
    assert isinstance(results[faulty], (Boom, RuntimeError)), results[faulty]
    assert [r for i, r in enumerate(results) if i != faulty] == [e for i, e in enumerate(expected) if i != faulty]
    await apoll(lambda: scheduler.pending() == 0, what="the scheduler drained", timeout=10)


async def test_a_failed_prefill_fails_only_the_prompts_it_was_prefilling(scheduler: Scheduler) -> None:
    batch = prompts()[:4]
    expected = await asyncio.gather(*(run(scheduler, p, max_tokens=40) for p in batch))
    events = [asyncio.Event() for _ in batch]
    running = [asyncio.ensure_future(run(scheduler, p, max_tokens=40, started=e)) for p, e in zip(batch, events)]
    for event in events:  # all four are decoding before the bad prompt arrives
        await asyncio.wait_for(event.wait(), timeout=60)
    bad = run(scheduler, [1, VOCAB + 5, 2])  # a token outside the embedding table breaks the forward pass
    with pytest.raises(IndexError):
        await bad
    assert await asyncio.gather(*running) == expected
    assert await run(scheduler, batch[0], max_tokens=40) == expected[0]
