"""Prefix caching on a tiny random Llama: reused KV must not change results, and memory stays bounded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaForCausalLM

from chatgate.engines.kvcache import BatchKV
from chatgate.engines.prefix_cache import PrefixCache, PromptKeys, block_keys
from chatgate.engines.base import SamplingParams
from chatgate.engines.scheduler import SchedulerLimits
from chatgate.engines.sequence import OutputChannel, Sequence
from tests.support.polling import apoll
from tests.support.scheduler import VOCAB, Harness, tiny_model

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()

BLOCK = 16


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def harness(model: LlamaForCausalLM, *, cache_bytes: int, chunk: int = 16) -> Harness:
    return Harness(model, SchedulerLimits(max_running=8, prefill_chunk=chunk, prefill_budget=200,
                                          prefix_cache_bytes=cache_bytes, prefix_block=BLOCK))


@pytest.fixture
def cached(model: LlamaForCausalLM) -> Iterator[Harness]:
    h = harness(model, cache_bytes=1 << 20)
    yield h
    h.close()


@pytest.fixture
def uncached(model: LlamaForCausalLM) -> Iterator[Harness]:
    h = harness(model, cache_bytes=0)
    yield h
    h.close()


async def test_a_shared_prefix_is_reused_and_changes_nothing(cached: Harness, uncached: Harness) -> None:
    system = tokens(50, seed=1)
    first, second = system + tokens(7, seed=2), system + tokens(9, seed=3)
    await cached.generate(first)
    before = cached.scheduler.prefill_tokens
    assert await cached.generate(second, max_tokens=20) == await uncached.generate(second, max_tokens=20)
    stats = cached.scheduler.prefix_stats
    assert (stats.hits, stats.reused_tokens) == (1, 48)  # the 50 shared tokens, down to whole blocks
    assert cached.scheduler.prefill_tokens - before == len(second) - 48
    assert uncached.scheduler.prefix_stats.hits == 0


async def test_prefixes_stored_from_a_padded_group_row_are_exact(model: LlamaForCausalLM, uncached: Harness) -> None:
    """Short prompts prefill together, left-padded; each row's cached KV starts at its own first token."""
    h = harness(model, cache_bytes=1 << 20, chunk=64)
    try:
        shared = tokens(35, seed=4)
        group = [tokens(5, seed=5), shared + tokens(3, seed=6), tokens(50, seed=7)]  # the shared row is padded
        await _together(h, group)
        follow_up = shared + tokens(12, seed=8)
        assert await h.generate(follow_up) == await uncached.generate(follow_up)
        assert h.scheduler.prefix_stats.reused_tokens == 32
    finally:
        h.close()


async def test_a_repeated_prompt_starts_decoding_without_a_prefill(cached: Harness, uncached: Harness) -> None:
    prompt = tokens(40, seed=9)
    first = await cached.generate(prompt)
    before = cached.scheduler.prefill_tokens
    assert await cached.generate(prompt) == first == await uncached.generate(prompt)
    assert cached.scheduler.prefill_tokens == before
    assert cached.scheduler.prefix_stats.reused_tokens == len(prompt)


async def test_a_prompt_inside_a_cached_one_still_computes_its_last_token(cached: Harness, uncached: Harness) -> None:
    """A prompt of exactly two cached blocks has no logits of its own: its last token is prefilled."""
    long = tokens(40, seed=10)
    await cached.generate(long)
    before = cached.scheduler.prefill_tokens
    assert await cached.generate(long[:32]) == await uncached.generate(long[:32])
    assert cached.scheduler.prefill_tokens - before == 1


def one_layer_kv(length: int, fill: float) -> BatchKV:
    kv = BatchKV(1)
    kv.pads = [0]
    kv.layers[0].update(torch.full((1, 1, length, 4), fill), torch.full((1, 1, length, 4), -fill))
    return kv


def block_bytes() -> int:
    return 2 * BLOCK * 4 * 4  # keys and values, one head of 4 float32 per token


def test_memory_stays_within_the_budget_and_the_oldest_prompt_loses_its_last_block_first() -> None:
    logits_bytes = 8 * 4
    cache = PrefixCache(budget_bytes=5 * block_bytes() + 2 * logits_bytes, block_size=BLOCK)
    prompts = [tokens(32, seed=s) for s in (11, 12, 13)]  # two blocks each
    for index, prompt in enumerate(prompts):
        cache.store(prompt, cache.keys(prompt), kv=one_layer_kv(32, index + 1.0), row=0, logits=torch.zeros(8))
        assert cache.stats.bytes <= cache.budget
    assert cache.stats.blocks == 5
    oldest = cache.lookup(prompts[0], cache.keys(prompts[0]))
    assert oldest is not None and oldest.tokens == 16 and oldest.logits is None
    for index in (1, 2):
        whole = cache.lookup(prompts[index], cache.keys(prompts[index]))
        assert whole is not None and whole.tokens == 32 and whole.logits is not None
        values = BatchKV.from_prefix(whole.blocks, tokens=whole.tokens, capacity=40).layers[0].valid()[1]
        assert torch.equal(values, torch.full((1, 1, 32, 4), -(index + 1.0)))


def test_a_key_that_names_other_tokens_is_a_miss() -> None:
    """Keys are hashes; a block is only used when its tokens and parent match too."""
    cache = PrefixCache(budget_bytes=1 << 20, block_size=BLOCK)
    stored, other = tokens(32, seed=14), tokens(32, seed=15)
    cache.store(stored, cache.keys(stored), kv=one_layer_kv(32, 1.0), row=0, logits=torch.zeros(8))
    assert cache.lookup(other, cache.keys(stored)) is None
    assert cache.lookup(stored, cache.keys(stored)) is not None


def test_a_salt_changes_every_block_key_and_a_key_colliding_across_salts_is_a_miss() -> None:
    prompt = tokens(48, seed=18)
    plain, a, b = (block_keys(prompt, BLOCK, salt) for salt in (None, "a", "b"))
    assert len(plain) == len(a) == len(b) == 3
    assert all(len({x, y, z}) == 3 for x, y, z in zip(plain, a, b, strict=True))
    cache = PrefixCache(budget_bytes=1 << 20, block_size=BLOCK)
    cache.store(prompt, cache.keys(prompt, "a"), kv=one_layer_kv(48, 1.0), row=0, logits=torch.zeros(8))
    forged = PromptKeys("b", cache.keys(prompt, "a").blocks)  # b's keys made to collide with a's
    assert cache.lookup(prompt, forged) is None and cache.lookup(prompt, forged, whole=True) is None
    cache.store(prompt, forged, kv=one_layer_kv(48, 2.0), row=0, logits=torch.ones(8))  # keeps a's blocks
    assert cache.stats.hits == 0 and cache.stats.blocks == 3
    assert cache.lookup(prompt, cache.keys(prompt, "b")) is None and cache.lookup(prompt, cache.keys(prompt)) is None
    hit = cache.lookup(prompt, cache.keys(prompt, "a"))
    assert hit is not None and hit.tokens == 48 and hit.logits is not None and not hit.logits.any()
    values = BatchKV.from_prefix(hit.blocks, tokens=hit.tokens, capacity=48).layers[0].valid()[1]
    assert torch.equal(values, torch.full((1, 1, 48, 4), -1.0))


async def test_a_prompt_is_reused_only_under_its_own_cache_salt(cached: Harness) -> None:
    """Salts keep callers apart: the same prompt under another salt, or none, is prefilled again."""
    prompt = tokens(40, seed=17)
    first = await cached.generate(prompt, cache_salt="tenant-a")
    for other in ("tenant-b", None):
        before = cached.scheduler.prefill_tokens
        assert await cached.generate(prompt, cache_salt=other) == first
        assert cached.scheduler.prefill_tokens - before == len(prompt)
    assert cached.scheduler.prefix_stats.hits == 0
    await cached.generate(prompt + tokens(9, seed=19), cache_salt="tenant-c")
    assert cached.scheduler.prefix_stats.hits == 0  # a longer prompt under a fourth salt: no shared prefix
    before = cached.scheduler.prefill_tokens
    assert await cached.generate(prompt, cache_salt="tenant-a") == first
    assert cached.scheduler.prefill_tokens == before
    assert (cached.scheduler.prefix_stats.hits, cached.scheduler.prefix_stats.reused_tokens) == (1, len(prompt))


async def test_equal_prompts_share_a_prefill_row_only_under_one_salt(model: LlamaForCausalLM) -> None:
    """The n choices of one request (one salt) prefill once; equal prompts of two salts each
    prefill, and each is cached under its own salt."""
    h = harness(model, cache_bytes=1 << 20, chunk=64)
    try:
        prompt = tokens(20, seed=20)
        before = h.scheduler.prefill_tokens
        await _together(h, [prompt, prompt], ["one", "one"])
        assert h.scheduler.prefill_tokens - before == len(prompt)
        before = h.scheduler.prefill_tokens
        await _together(h, [prompt, prompt], ["two", "three"])
        assert h.scheduler.prefill_tokens - before == 2 * len(prompt)
        for salt in ("two", "three"):
            await h.generate(prompt, cache_salt=salt)
        assert h.scheduler.prefill_tokens - before == 2 * len(prompt)  # both repeats were whole hits
        assert h.scheduler.prefix_stats.hits == 2
    finally:
        h.close()


def test_a_zero_budget_keeps_nothing() -> None:
    cache = PrefixCache(budget_bytes=0, block_size=BLOCK)
    prompt = tokens(32, seed=16)
    assert cache.keys(prompt).blocks == ()
    keys = PromptKeys(None, tuple(block_keys(prompt, BLOCK)))
    cache.store(prompt, keys, kv=one_layer_kv(32, 1.0), row=0, logits=torch.zeros(8))
    assert cache.stats.bytes == 0 and cache.lookup(prompt, keys) is None


async def _together(h: Harness, prompts: list[list[int]], salts: list[str | None] | None = None) -> list[list[int]]:
    """Generate for `prompts` (under `salts`) with the scheduler admitting them in one step (so
    they prefill as a group)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> Iterator[None]:  # a background job that parks the scheduler thread
        held.set()
        release.wait(timeout=30)
        yield

    h.scheduler.inbox.put(hold())
    await asyncio.to_thread(held.wait, 30)
    started = [asyncio.ensure_future(h.generate(p, cache_salt=salt)) for p, salt in zip(prompts, salts or [None] * len(prompts), strict=True)]
    await apoll(lambda: h.scheduler.inbox.qsize() == len(prompts), what="the prompts queued", timeout=10)
    release.set()
    return list(await asyncio.gather(*started))


async def test_a_cached_prompt_does_not_hold_back_the_head_of_the_queue(cached: Harness) -> None:
    """Whole-prompt hits cost no forward pass: the long prompt at the head still prefills in the
    same iteration (a steady stream of cached prompts once kept it from ever moving)."""
    repeated = tokens(40, seed=11)
    await cached.generate(repeated)
    cached.close()  # from here the test drives the scheduler's iterations itself
    scheduler = cached.scheduler
    loop = asyncio.get_running_loop()

    def sequence(prompt: list[int]) -> Sequence:
        return Sequence(prompt_ids=prompt, params=SamplingParams(max_tokens=4), decode=lambda ids: "x" * len(ids),
                        eos_token_ids=frozenset(), channel=OutputChannel(loop))

    head, hit = sequence(tokens(100, seed=12)), sequence(repeated)
    for queued in (head, hit):
        scheduler.inbox.put(queued)
    assert scheduler._admit(block=False)
    scheduler._prefill()
    assert hit.output_ids  # started from the cache, without a prefill
    assert head.prefilled > 0  # and the head moved in the same iteration
