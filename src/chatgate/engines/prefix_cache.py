"""Prefix caching across requests: the KV of recent prompts, kept in blocks keyed by prefix.

A prompt's keys and values depend only on its tokens, so a request that starts with tokens an
earlier one prefilled (a shared system prompt, the earlier turns of a conversation, the `n`
choices of one request) copies their KV instead of recomputing it and prefills only the rest.

Prompts are cut into blocks of `block_size` tokens (the last may be shorter). A block's key
hashes its tokens chained to its parent's key, so equal prefixes share blocks and a lookup walks
the new prompt's keys until one is missing. A block also holds its parent and its tokens, which
the walk compares, so a hash collision costs a miss, never a wrong answer. The block that ends
a prefilled prompt keeps that prompt's last logits: a repeat of the whole prompt starts decoding
with no forward pass at all.

A prompt may carry a cache salt (`SamplingParams.cache_salt`: the API server derives it from the
caller's API key and the request's `cache_salt`). The first block's key is chained from the salt,
so every key of a salted prompt differs from the same prompt's under another salt, and each block
keeps its salt, which the walk compares too: prompts under different salts never share KV, even
on a hash collision. Without that, a request's time to first token would tell one tenant whether
another had recently sent the same prefix.

Memory is bounded by a byte budget; the least recently used blocks go first. Every lookup and
store uses a chain from its last block back to its first, so a block is always more recent than
the blocks that hang from it, and eviction takes leaves before their prefixes: nothing is left
unreachable. Tensors stay on the device the cache was computed on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatgate.engines.runners.base import KV

DEFAULT_BLOCK = 16


def block_keys(prompt: Sequence[int], block_size: int = DEFAULT_BLOCK, salt: str | None = None) -> list[int]:
    """The chained key of each block of `prompt` under `salt`: block i's key stands for the salt
    and tokens `:(i+1)*block_size`."""
    keys: list[int] = []
    key = 0 if salt is None else hash(("salt", salt))
    for start in range(0, len(prompt), block_size):
        key = hash((key, tuple(prompt[start : start + block_size])))
        keys.append(key)
    return keys


@dataclass(frozen=True)
class PromptKeys:
    """What a prompt is looked up and stored by: its block keys, and the salt they chain from."""

    salt: str | None
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class PrefixHit:
    """Cached KV for the first `tokens` tokens of a prompt."""

    tokens: int
    blocks: list[Any]  # the runner's spans (`KV.row_spans`), in order; they hold `tokens` or more
    logits: torch.Tensor | None  # the last position's logits, when the whole prompt was cached


@dataclass(eq=False)
class _Block:
    key: int
    parent: _Block | None
    salt: str | None
    tokens: tuple[int, ...]
    kv: Any  # the runner's copy of these tokens' KV (a `Span`; torch: [layers, 2, kv_heads, len(tokens), head_dim])
    logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        extra = self.logits.nbytes if self.logits is not None else 0
        return int(self.kv.nbytes) + extra


@dataclass
class PrefixStats:
    """What the cache has saved so far, and what it holds."""

    hits: int = 0  # prompts that started from cached KV
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    bytes: int = 0
    blocks: int = 0


class PrefixCache:
    """Blocks of prompt KV under a byte budget, looked up by longest cached prefix; a budget of
    0 turns it off."""

    def __init__(
        self, *, budget_bytes: int, block_size: int = DEFAULT_BLOCK, release: Callable[[Any], None] = lambda span: None
    ) -> None:
        self.budget = budget_bytes
        self.block_size = block_size
        self._release = release  # frees an evicted block's span (the runner's `release`)
        self.stats = PrefixStats()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether anything is ever kept."""
        return self.budget > 0

    def keys(self, prompt: Sequence[int], salt: str | None = None) -> PromptKeys:
        """The block keys of `prompt` under `salt` (none when the cache is off: nothing to look up)."""
        return PromptKeys(salt, tuple(block_keys(prompt, self.block_size, salt)) if self.enabled else ())

    def lookup(self, prompt: Sequence[int], keys: PromptKeys, *, whole: bool = False) -> PrefixHit | None:
        """The longest cached prefix of `prompt`, leaving at least one token to compute unless
        the whole prompt is cached with its logits; with `whole`, only such a complete hit."""
        if whole and not self._may_be_whole(keys.blocks):
            return None
        chain = self._walk(prompt, keys)
        matched = sum(len(block.tokens) for block in chain)
        logits = chain[-1].logits if chain and matched == len(prompt) else None
        tokens = matched if logits is not None else min(matched, len(prompt) - 1)
        if tokens <= 0 or (whole and logits is None):
            return None
        self._touch(chain)
        self.stats.hits += 1
        self.stats.reused_tokens += tokens
        return PrefixHit(tokens=tokens, blocks=[block.kv for block in chain], logits=logits)

    def _may_be_whole(self, keys: Sequence[int]) -> bool:
        """A cheap test before walking: the prompt's last block is cached with logits."""
        last = self._blocks.get(keys[-1]) if keys else None
        return last is not None and last.logits is not None

    def store(self, prompt: Sequence[int], keys: PromptKeys, *, kv: KV, row: int, logits: torch.Tensor) -> None:
        """Keep the blocks of `prompt` not cached yet, from `row` of `kv`, and its last logits."""
        blocks = keys.blocks
        if not self.enabled or not blocks:
            return
        chain = self._walk(prompt, keys)
        ranges: list[tuple[int, int]] = []
        for index in range(len(chain), len(blocks)):
            if blocks[index] in self._blocks:
                break  # a hash collision (astronomically rare)
            ranges.append((index * self.block_size, min((index + 1) * self.block_size, len(prompt))))
        spans = kv.row_spans(row, ranges) if ranges else []
        new_bytes = 0
        for index, ((start, end), span) in enumerate(zip(ranges, spans, strict=True)):
            if new_bytes > self.budget:  # more than could ever be kept
                for unused in spans[index:]:
                    self._release(unused)
                break
            block = _Block(key=blocks[len(chain)], parent=chain[-1] if chain else None, salt=keys.salt,
                           tokens=tuple(prompt[start:end]), kv=span)
            self._blocks[block.key] = block
            chain.append(block)
            new_bytes += block.nbytes
            self.stats.bytes += block.nbytes
        if chain and len(chain) == len(blocks) and chain[-1].logits is None:
            chain[-1].logits = logits.detach().clone()
            self.stats.bytes += chain[-1].logits.nbytes
        self._touch(chain)
        self._evict()

    def _walk(self, prompt: Sequence[int], keys: PromptKeys) -> list[_Block]:
        """The cached blocks that begin `prompt` under its salt, in order."""
        chain: list[_Block] = []
        for index, key in enumerate(keys.blocks):
            block = self._blocks.get(key)
            start = index * self.block_size
            if block is None or block.parent is not (chain[-1] if chain else None) or block.salt != keys.salt:
                break
            if block.tokens != tuple(prompt[start : start + self.block_size]):
                break
            chain.append(block)
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        """Mark `chain` used, its first block last: prefixes stay more recent than what hangs from them."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def evict_oldest(self) -> bool:
        """Drop the least recently used block; False if there is none (a runner short of room
        for new sequences asks for this)."""
        if not self._blocks:
            return False
        _, block = self._blocks.popitem(last=False)
        self.stats.bytes -= block.nbytes
        self.stats.blocks = len(self._blocks)
        self._release(block.kv)
        return True

    def _evict(self) -> None:
        while self.stats.bytes > self.budget and self.evict_oldest():
            pass
        self.stats.blocks = len(self._blocks)
