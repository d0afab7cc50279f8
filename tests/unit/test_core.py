"""The scheduler core on a runner without a model (`runners/fake.py`), driven one step at a time,
and its scheduling policy (`policy.py`) on its own.

The fake runner's logits depend only on the tokens a row holds, so every schedule must give each
sequence the tokens it gets alone; it also counts the rows and spans the core has not given
back, which a runner owning memory outside Python (llama.cpp) would leak.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from chatgate.engines.base import SamplingParams
from chatgate.engines.policy import Policy
from chatgate.engines.runners.fake import FakeRunner
from chatgate.engines.scheduler import Scheduler, SchedulerLimits
from chatgate.engines.sequence import OutputChannel, Sequence

VOCAB = 64


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The loop the output channels post to (never run: the tests read the sequences' state)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def sequence(loop: asyncio.AbstractEventLoop, ids: list[int], max_tokens: int, **params: object) -> Sequence:
    return Sequence(prompt_ids=ids, params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),  # type: ignore[arg-type]
                    decode=lambda t: "x" * len(t), eos_token_ids=frozenset(), channel=OutputChannel(loop))


def run(scheduler: Scheduler, seqs: list[Sequence], *, steps: int = 10_000) -> list[list[int]]:
    """Submit `seqs`, step until every one has ended, and return their outputs."""
    for queued in seqs:
        scheduler.inbox.put(queued)
    for _ in range(steps):
        scheduler.step()
        if all(s.finished or s.cancelled for s in seqs) and not scheduler.running:
            return [s.output_ids for s in seqs]
    raise AssertionError("the scheduler did not finish")


def limits(**overrides: int) -> SchedulerLimits:
    values = {"max_running": 8, "prefill_chunk": 16, "prefill_budget": 48, "prefix_cache_bytes": 0} | overrides
    return SchedulerLimits(**values)


def alone(loop: asyncio.AbstractEventLoop, ids: list[int], max_tokens: int) -> list[int]:
    return run(Scheduler(runner=FakeRunner(vocab=VOCAB), limits=limits()), [sequence(loop, ids, max_tokens)])[0]


WORK = [(prompt(n, seed), 6 + 3 * seed) for seed, n in enumerate([3, 9, 20, 5, 40, 12, 7, 33])]


@pytest.mark.parametrize("padded", [True, False])
def test_a_batch_gives_every_sequence_what_it_gets_alone_and_frees_every_row(loop: asyncio.AbstractEventLoop, padded: bool) -> None:
    runner = FakeRunner(vocab=VOCAB, padded=padded)
    together = run(Scheduler(runner=runner, limits=limits()), [sequence(loop, ids, n) for ids, n in WORK])
    assert together == [alone(loop, ids, n) for ids, n in WORK]
    assert runner.rows_held == 0


def test_preemption_under_a_tight_budget_changes_no_stream(loop: asyncio.AbstractEventLoop) -> None:
    runner = FakeRunner(vocab=VOCAB, padded=False)
    scheduler = Scheduler(runner=runner, limits=limits(kv_tokens=120, prefix_cache_bytes=1 << 16))
    work = [(prompt(20, seed), 40) for seed in range(6)]
    assert run(scheduler, [sequence(loop, ids, n) for ids, n in work]) == [alone(loop, ids, n) for ids, n in work]
    assert scheduler.preemptions > 0
    assert runner.rows_held == 0


def test_unpadded_rows_count_only_their_own_tokens(loop: asyncio.AbstractEventLoop) -> None:
    # After one step both prompts are prefilled and have decoded one token: 11 and 31 held.
    for padded, expected in ((True, 2 * 31), (False, 11 + 31)):
        scheduler = Scheduler(runner=FakeRunner(vocab=VOCAB, padded=padded), limits=limits(prefill_budget=64, prefill_chunk=64))
        short, long = sequence(loop, prompt(10, 1), 50), sequence(loop, prompt(30, 2), 50)
        for queued in (short, long):
            scheduler.inbox.put(queued)
        scheduler.step()
        assert scheduler.kv_demand() == expected


def test_the_prefix_cache_saves_prefills_and_gives_every_span_back(loop: asyncio.AbstractEventLoop) -> None:
    runner = FakeRunner(vocab=VOCAB)
    scheduler = Scheduler(runner=runner, limits=limits(prefix_cache_bytes=1 << 16))
    system = prompt(40, 9)
    first = run(scheduler, [sequence(loop, system + [1, 2], 8)])
    before = runner.forward_tokens
    second = run(scheduler, [sequence(loop, system + [3, 4], 8)])
    assert runner.forward_tokens - before < 20  # the 32 cached tokens were not run again
    assert first == [alone(loop, system + [1, 2], 8)] and second == [alone(loop, system + [3, 4], 8)]
    assert scheduler.prefix_stats.hits == 1 and runner.spans_held > 0
    while scheduler._prefix.evict_oldest():
        pass
    assert runner.spans_held == 0 and runner.rows_held == 0


def test_equal_prompts_share_one_prefill_under_one_salt_only(loop: asyncio.AbstractEventLoop) -> None:
    runner = FakeRunner(vocab=VOCAB)
    ids = prompt(12, 4)
    outputs = run(Scheduler(runner=runner, limits=limits()), [sequence(loop, ids, 5) for _ in range(3)] + [sequence(loop, ids, 5, cache_salt="b")])
    assert outputs == [alone(loop, ids, 5)] * 4
    assert runner.forward_tokens == 2 * len(ids) + 4 * 4  # two prefill rows (two salts), then 4 steps of 4 rows
    assert runner.rows_held == 0


def test_cancelled_and_failed_sequences_give_their_rows_back(loop: asyncio.AbstractEventLoop) -> None:
    runner = FakeRunner(vocab=VOCAB)
    scheduler = Scheduler(runner=runner, limits=limits())
    long, running = sequence(loop, prompt(60, 3), 5), sequence(loop, prompt(5, 4), 50)
    scheduler.inbox.put(running)
    scheduler.step()
    scheduler.inbox.put(long)
    scheduler.step()  # the long prompt is part-way through its chunked prefill
    assert long.prefilled and runner.rows_held == 2
    assert long.channel is not None
    long.channel.cancelled = True
    scheduler.step()
    assert runner.rows_held == 1
    runner.fail_next_decode = True  # the running batch's step fails: every row ends
    scheduler.step()
    assert running.finished is False and runner.rows_held == 0 and not scheduler.running


def test_cached_tokens_count_what_the_prefix_cache_served_at_first_admission(loop: asyncio.AbstractEventLoop) -> None:
    runner = FakeRunner(vocab=VOCAB, padded=False)
    scheduler = Scheduler(runner=runner, limits=limits(kv_tokens=160, prefix_cache_bytes=1 << 16))
    system = prompt(40, 21)  # two whole 16-token blocks, then 8 tokens no other prompt shares
    first = sequence(loop, system, 4)
    run(scheduler, [first])
    assert first.cached_tokens == 0
    again = sequence(loop, list(system), 4)  # the whole prompt is cached, with its logits
    run(scheduler, [again])
    assert again.cached_tokens == len(system)
    # Under a tight budget these are preempted; readmitted, the cache holds their own prompt and
    # more, which must not be reported as served to the prompt.
    work = [sequence(loop, system + prompt(4, 30 + i), 40) for i in range(5)]
    reused = scheduler.prefix_stats.reused_tokens
    run(scheduler, work)
    assert scheduler.preemptions > 0 and any(s.preemptions for s in work)
    assert [s.cached_tokens for s in work] == [32] * 5
    assert scheduler.prefix_stats.reused_tokens - reused > 32 * 5  # readmissions did hit the cache
    salted = sequence(loop, list(system), 4, cache_salt="other")
    run(scheduler, [salted])
    assert salted.cached_tokens == 0


def finishing_order(scheduler: Scheduler, named: dict[str, Sequence]) -> list[str]:
    """Step until every sequence in `named` has ended; their names in the order they ended."""
    order: list[str] = []
    for _ in range(10_000):
        scheduler.step()
        order += [name for name, s in named.items() if s.finished and name not in order]
        if len(order) == len(named):
            return order
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_full_batch_gives_way_to_a_higher_priority_only_under_the_priority_policy(
    loop: asyncio.AbstractEventLoop, policy: Literal["fcfs", "priority"]
) -> None:
    scheduler = Scheduler(runner=FakeRunner(vocab=VOCAB), limits=limits(max_running=1), policy=policy)
    low = sequence(loop, prompt(8, 40), 30, priority=5)
    scheduler.inbox.put(low)
    for _ in range(3):
        scheduler.step()
    assert scheduler.running == 1 and len(low.output_ids) == 4  # a token from the prefill, one per step
    later_low = sequence(loop, prompt(8, 41), 6, priority=5)
    high = sequence(loop, prompt(8, 42), 6, priority=-1 if policy == "priority" else 0)
    for queued in (later_low, high):
        scheduler.inbox.put(queued)
    order = finishing_order(scheduler, {"low": low, "later_low": later_low, "high": high})
    if policy == "priority":
        # high preempts the running low at once; low, which arrived first, resumes before later_low.
        assert order == ["high", "low", "later_low"] and low.preemptions == 1
    else:
        assert order == ["low", "later_low", "high"] and scheduler.preemptions == 0
    for s in (low, later_low, high):  # preempted or not, every stream is what it is alone
        assert s.output_ids == alone(loop, s.prompt_ids, s.params.max_tokens)


def test_equal_priorities_never_preempt_and_ties_go_by_arrival(loop: asyncio.AbstractEventLoop) -> None:
    scheduler = Scheduler(runner=FakeRunner(vocab=VOCAB), limits=limits(max_running=1), policy="priority")
    seqs = {name: sequence(loop, prompt(6, 50 + i), 5, priority=p) for i, (name, p) in enumerate([("a", 3), ("b", 3), ("c", 1), ("d", 3)])}
    scheduler.inbox.put(seqs["a"])
    scheduler.step()
    for name in "bcd":
        scheduler.inbox.put(seqs[name])
    assert finishing_order(scheduler, seqs) == ["c", "a", "b", "d"]  # c outranks the running a
    assert seqs["a"].preemptions == 1 and scheduler.preemptions == 1


def test_a_higher_priority_short_of_kv_preempts_the_lowest_ranked_running(loop: asyncio.AbstractEventLoop) -> None:
    runner = FakeRunner(vocab=VOCAB, padded=False)
    scheduler = Scheduler(runner=runner, limits=limits(kv_tokens=120), policy="priority")
    low, mid = sequence(loop, prompt(20, 60), 30, priority=9), sequence(loop, prompt(20, 61), 30, priority=4)
    for queued in (low, mid):
        scheduler.inbox.put(queued)
    for _ in range(6):  # each prefills in two chunks, then decodes
        scheduler.step()
    assert scheduler.running == 2  # both fit, with room for 16 more tokens each; not beside a 40-token prompt
    too_big = sequence(loop, prompt(70, 63), 20, priority=5)  # would not fit even without low, the one it outranks: preempts nobody
    scheduler.inbox.put(too_big)
    scheduler.step()
    assert scheduler.preemptions == 0 and not too_big.admitted
    assert too_big.channel is not None
    too_big.channel.cancelled = True
    high = sequence(loop, prompt(40, 62), 20, priority=0)
    scheduler.inbox.put(high)
    scheduler.step()
    assert low.preemptions == 1 and mid.preemptions == 0 and high.admitted
    order = finishing_order(scheduler, {"low": low, "mid": mid, "high": high})
    assert order.index("high") < order.index("low")
    for s in (low, mid, high):
        assert s.output_ids == alone(loop, s.prompt_ids, s.params.max_tokens)
    assert runner.rows_held == 0


@dataclass
class Request:
    """What the policy reads of a request, and nothing else."""

    priority: int
    arrival: int
    admitted: int = 0


def test_the_policy_orders_by_priority_then_arrival_and_picks_who_gives_way() -> None:
    waiting = [Request(5, 1), Request(0, 3), Request(5, 0, admitted=7), Request(0, 2), Request(-3, 4)]
    assert Policy("fcfs").order(waiting) == waiting
    assert [(r.priority, r.arrival) for r in Policy("priority").order(waiting)] == [(5, 0), (-3, 4), (0, 2), (0, 3), (5, 1)]
    running = [Request(2, 1, admitted=1), Request(7, 2, admitted=2), Request(7, 3, admitted=3), Request(1, 4, admitted=4)]
    policy = Policy("priority")
    assert policy.victim(running, outranked_by=0) is running[2]  # the lowest-ranked, admitted last
    assert policy.victim(running, outranked_by=7) is None  # equals never preempt
    assert Policy("fcfs").victim(running, outranked_by=-100) is None
    assert policy.first_to_go(running) is running[2] and Policy("fcfs").first_to_go(running) is running[3]
