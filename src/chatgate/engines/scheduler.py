"""Continuous batching: the engine's core. One loop decides, each step, what every live sequence
does, and has a runner (`runners/`) execute it: the scheduler never touches a model or a tensor's
layout, only the runner's KV handles and the logits it returns.

Each iteration of the loop:
1. admits new sequences and embedding jobs, and drops sequences whose consumer went away;
2. prefills waiting prompts, first come first served while the KV they would hold fits the
   budget (`kv_demand`: what the batch holds now, not what it might come to hold, plus
   `HEADROOM` decode steps per row): a prompt resumes after the longest prefix the prefix cache
   holds (`prefix_cache.py`), or starts decoding at once if it holds all of it; short ones
   prefill together in one padded forward pass (a request's `n` copies of one prompt share a
   single row), a long one a chunk at a time, so running streams are never stalled for a whole
   long prompt;
3. if the next decode step would outgrow the budget, preempts the most recently admitted
   sequences (never the last one) until it fits: their KV is dropped and they wait ahead of
   every sequence not yet admitted (behind a prompt still prefilling), keeping their output,
   random generator and constraint state; readmitted, they prefill their prompt and output
   again (the prefix cache may hold part of it) and go on from the logits that prefill ends
   with, so the stream neither repeats nor loses a token;
4. runs one decode step for the whole running batch, sampling each row under its own
   parameters and random generator;
5. runs one bounded chunk of the oldest background job (prompt scoring, embeddings), so a big
   job never stalls running streams for longer than a chunk.
A sequence that finishes or is cancelled leaves the batch before the next step. One whose prompt
plus `max_tokens` could never fit the budget alone is refused at once; any other always runs to
its end, alone if need be.

Failures stay as small as they can: an error while sampling, constraining, detokenising or
scoring the logprobs of one sequence ends that sequence only. A failed prefill forward pass
ends the sequences it was prefilling. A failed decode forward pass ends every running
sequence, since the shared KV cache may hold half a step; waiting sequences carry on.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from chatgate.engines.prefix_cache import DEFAULT_BLOCK, PrefixCache, PrefixHit, PrefixStats, PromptKeys
from chatgate.engines.runners.base import KV, Runner
from chatgate.engines.sampling import sample_with_logprob
from chatgate.engines.sequence import OutputChannel, SequenceState
from chatgate.errors import ContextLengthExceededError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    """One sequence inside the scheduler."""

    state: SequenceState
    channel: OutputChannel
    generator: torch.Generator
    prefilled: int = 0
    last_token: int = -1
    constraint: Any = None  # a `constraints.Constraint` for structured output
    kv: KV | None = field(default=None, repr=False)  # partial cache of a chunked prefill
    prefix_keys: PromptKeys | None = field(default=None, repr=False)  # block keys of `ids`
    looked_up: bool = False  # the prefix cache was asked for `ids`
    admitted: int = 0  # when it was admitted (a rising count; 0: waiting, not admitted)
    admitted_ns: int = 0  # wall time of its first admission, for its trace (0: not yet)
    preemptions: int = 0  # times it gave its rows back to be recomputed
    # After a preemption: the prompt and every token generated so far, to prefill again.
    resumed_ids: list[int] | None = field(default=None, repr=False)

    @property
    def ids(self) -> list[int]:
        """The tokens whose KV a prefill builds: the prompt, plus the output after a preemption."""
        return self.resumed_ids if self.resumed_ids is not None else self.state.prompt_ids

    @property
    def remaining(self) -> int:
        """Tokens of `ids` not yet prefilled."""
        return len(self.ids) - self.prefilled

    @property
    def row_key(self) -> tuple[str | None, tuple[int, ...]]:
        """What equal prompts share a prefill row by: their tokens, under one cache salt (a
        prompt must not prefill faster because another tenant's equal one is beside it)."""
        return self.state.params.cache_salt, tuple(self.ids)

    @property
    def reservation(self) -> int:
        """The most KV columns this sequence can ever fill: its prompt and every token it may generate."""
        return len(self.state.prompt_ids) + self.state.params.max_tokens


@dataclass(frozen=True, kw_only=True)
class SchedulerLimits:
    """How much work one iteration may take on."""

    max_running: int = 32
    prefill_chunk: int = 256
    prefill_budget: int = 512
    prefix_cache_bytes: int = 256 << 20  # 0 turns prefix caching off
    prefix_block: int = DEFAULT_BLOCK
    kv_tokens: int | None = None  # KV the admitted sequences may reserve (None: no bound)


# Decode steps an admission leaves room for in every row before the batch could outgrow the
# budget. Without it the sequence admitted last would be preempted at the very next step and
# admitted again as soon as room showed: a prefill wasted per step. With it, a full batch
# re-prefills at most one (mostly prefix-cached) sequence per this many steps, and the room it
# keeps is small: 32 rows hold back 512 tokens, about 1% of the default budget on CPU (vLLM
# keeps a 1% watermark of its blocks free for the same reason).
HEADROOM = 16

# Background work run in the scheduler thread: each `next()` does one bounded chunk.
Job = Iterator[None]


class Scheduler:
    """Drives one runner from one thread; fed through a thread-safe inbox."""

    def __init__(self, *, runner: Runner, limits: SchedulerLimits) -> None:
        self._runner = runner
        self._limits = limits
        self.inbox: queue.Queue[Slot | Job | None] = queue.Queue()
        self._waiting: list[Slot] = []
        self._live: set[Slot] = set()  # every admitted sequence not yet ended, wherever it is
        self._running: list[Slot] = []
        self._jobs: deque[Job] = deque()
        self._kv = runner.empty()
        # KV of recent prompts: a shared prefix (system prompt, earlier turns, the n choices of
        # one request) is copied instead of prefilled again.
        self._prefix = PrefixCache(
            budget_bytes=limits.prefix_cache_bytes, block_size=limits.prefix_block, release=runner.release
        )
        runner.reclaim = self._prefix.evict_oldest  # a runner short of sequence ids evicts cached prefixes
        self.prefill_tokens = 0  # prompt tokens run through the model, shared rows counted once
        self.preemptions = 0  # times a sequence gave its KV back to be recomputed later
        self.kv_used = 0  # KV tokens the admitted sequences held after the last step (for other threads)
        self._admissions = 0

    @property
    def prefix_stats(self) -> PrefixStats:
        """What prefix caching has saved so far."""
        return self._prefix.stats

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        return len(self._running)

    def pending(self) -> int:
        """Sequences running or waiting."""
        return len(self._running) + len(self._waiting) + self.inbox.qsize()

    def run(self) -> None:
        """The loop; returns when `None` arrives in the inbox."""
        while self.step(block=not (self._running or self._waiting or self._jobs)):
            pass

    def step(self, *, block: bool = False) -> bool:
        """One iteration of the loop (what `run` repeats); False once `None` has arrived. Only
        the thread that owns the model may call it (tests drive it directly, step by step)."""
        if not self._admit(block=block):
            return False
        self._drop_cancelled()
        try:
            if self._waiting and len(self._running) < self._limits.max_running:
                self._prefill()
            self._preempt_to_fit()
            if self._running:
                self._decode()
        except Exception as exc:  # bookkeeping itself broke: fail everything, keep serving
            self._fail(self._live, exc)
            self._waiting, self._running = [], []
            self._drop_kv()
        self._run_job()
        self.kv_used = self.kv_demand()
        return True

    def _fail(self, slots: Iterable[Slot], exc: Exception) -> None:
        """End `slots` with `exc`; the caller takes them out of the waiting or running lists."""
        slots = list(slots)
        log.error("engine step failed for %d sequence(s)", len(slots), exc_info=exc)
        for slot in slots:
            slot.channel.put(exc)
            self._drop_partial(slot)
            self._live.discard(slot)

    def _run_job(self) -> None:
        """One chunk of the oldest job; jobs catch their own errors, so one that escapes is logged."""
        if not self._jobs:
            return
        try:
            next(self._jobs[0])
        except StopIteration:
            self._jobs.popleft()
        except Exception:
            log.exception("engine job failed")
            self._jobs.popleft()

    def _admit(self, *, block: bool) -> bool:
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is None:
                    return False
                if isinstance(item, Slot):
                    self._waiting.append(item)
                    self._live.add(item)
                else:
                    self._jobs.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self) -> None:
        self._live = {s for s in self._live if not s.channel.cancelled}
        for slot in self._waiting:
            if slot.channel.cancelled:
                self._drop_partial(slot)
        self._waiting = [s for s in self._waiting if not s.channel.cancelled]
        keep = [i for i, s in enumerate(self._running) if not s.channel.cancelled]
        if len(keep) < len(self._running):
            self._keep_rows(keep)

    def _keep_rows(self, rows: list[int]) -> None:
        self._running = [self._running[r] for r in rows]
        if rows:
            self._kv.select(rows)
        else:
            self._drop_kv()

    def _drop_kv(self) -> None:
        """Free the running batch's KV (a runner may hold it outside Python's reach)."""
        try:
            self._kv.select([])
        finally:
            self._kv = self._runner.empty()

    def _drop_partial(self, slot: Slot) -> None:
        """Free the KV of a prompt part-way through its prefill."""
        kv, slot.kv = slot.kv, None
        if kv is not None:
            kv.select([])

    # Prefill ---------------------------------------------------------------------------------

    def _prefill(self) -> None:
        # Whole-prompt hits cost no forward pass, so the head of the queue still moves this
        # iteration: a stream of cached prompts must not stall a long one mid-prefill.
        self._reuse_prefills()
        if not self._waiting or len(self._running) >= self._limits.max_running:
            return
        head = self._waiting[0]
        if not head.admitted and not self._admissible(head):
            return
        self._admitting([head])
        group = [head]
        try:
            if not head.looked_up and self._look_up(head):
                return  # its whole prompt was cached: it is decoding already
            chunked = bool(head.prefilled) or head.remaining > self._limits.prefill_chunk
            if chunked:
                self._prefill_chunk(head)
            else:
                group = self._short_group()
                self._prefill_group(group)
        except Exception as exc:  # the running batch's cache is untouched by a prefill
            failed = [s for s in group if s in self._live]
            self._fail(failed, exc)
            self._waiting = [s for s in self._waiting if s not in failed]

    # KV budget ---------------------------------------------------------------------------------

    def _holdings(self) -> list[tuple[Slot, int]]:
        """Each admitted sequence with the KV tokens it holds once in the batch: a running row its
        own length, a sequence still prefilling the whole of what it prefills."""
        running = list(zip(self._running, self._kv.held(), strict=True))
        return running + [(s, len(s.ids)) for s in self._waiting if s.admitted]

    def kv_demand(self, joining: Iterable[Slot] = (), *, ahead: int = 0) -> int:
        """KV tokens the batch holds `ahead` decode steps from now, with the admitted sequences
        and `joining`, none counted past what it can ever hold (its `reservation`): where the
        runner pads rows to the longest (torch), rows times the longest row, else their sum."""
        rows = dict(self._holdings())
        for slot in joining:
            rows.setdefault(slot, len(slot.ids))
        held = [min(tokens + ahead, s.reservation) for s, tokens in rows.items()]
        if self._runner.padded:
            return len(held) * max(held, default=0)
        return sum(held)

    def _fits(self, joining: list[Slot]) -> bool:
        """Whether `joining` may be admitted now: the batch with them still fits the budget
        `HEADROOM` decode steps from now."""
        budget = self._limits.kv_tokens
        return budget is None or self.kv_demand(joining, ahead=HEADROOM) <= budget

    def _admissible(self, slot: Slot) -> bool:
        """Whether `slot` may start its prefill now; one that could never fit is refused.

        The worker refuses such requests before they reach the engine (the context length it
        reports is capped at the budget); this keeps a direct caller from waiting forever."""
        if self._fits([slot]):
            return True
        budget = self._limits.kv_tokens
        if budget is not None and slot.reservation > budget:
            self._waiting.remove(slot)
            self._live.discard(slot)
            slot.channel.put(ContextLengthExceededError(
                f"This request needs up to {slot.reservation} tokens of KV cache (prompt plus "
                f"max_tokens); this model holds at most {budget}. Please reduce the length.",
                param="max_tokens",
            ))
        return False

    def _admitting(self, slots: Iterable[Slot]) -> None:
        """Stamp `slots` as admitted now, in order: preemption takes the latest stamp first."""
        for slot in slots:
            if not slot.admitted:
                self._admissions += 1
                slot.admitted = self._admissions
                slot.admitted_ns = slot.admitted_ns or time.time_ns()

    def _preempt_to_fit(self) -> None:
        """Give back the KV of the most recently admitted sequences, never the last one, until
        the next decode step fits the budget; they wait ahead of every sequence not yet
        admitted to be prefilled again over their prompt and output (recompute, as vLLM does by
        default)."""
        budget = self._limits.kv_tokens
        while budget is not None and self.kv_demand(ahead=1) > budget:
            admitted = [s for s, _ in self._holdings()]
            if len(admitted) <= 1:
                return
            self._preempt(max(admitted, key=lambda s: s.admitted))

    def _preempt(self, slot: Slot) -> None:
        if slot in self._running:
            row = self._running.index(slot)
            self._keep_rows([r for r in range(len(self._running)) if r != row])
            # The KV held the prompt and every output token but the last; prefilling all of
            # them gives the logits the next decode step would have, and sampling goes on from
            # the same output, generator and constraint state: the stream does not notice.
            slot.resumed_ids = slot.state.prompt_ids + slot.state.output_ids
        # Back in line ahead of everyone not yet admitted, but behind a prompt still being
        # prefilled a chunk at a time: only the head of the queue advances, and a preempted
        # sequence that cannot fit beside that prompt's KV would otherwise block it for ever.
        rest = [s for s in self._waiting if s is not slot]
        at = max((i + 1 for i, s in enumerate(rest) if s.admitted), default=0)
        self._waiting = [*rest[:at], slot, *rest[at:]]
        self._drop_partial(slot)
        slot.prefilled, slot.prefix_keys, slot.looked_up, slot.admitted = 0, None, False, 0
        slot.preemptions += 1
        self.preemptions += 1

    def _reuse_prefills(self) -> None:
        """Start waiting sequences whose whole prompt is cached."""
        room = self._limits.max_running - len(self._running)
        started = 0
        for slot in list(self._waiting) if self._prefix.enabled else []:
            if started >= room or not self._fits([slot]):
                break
            try:
                hit = None if slot.prefilled else self._prefix.lookup(slot.ids, self._keys(slot), whole=True)
                if hit is not None:
                    self._admitting([slot])
                    self._resume(slot, hit)
                    started += 1
            except Exception as exc:  # as a failed prefill fails its group only, this fails one sequence
                self._fail([slot], exc)
                self._waiting = [s for s in self._waiting if s is not slot]

    def _look_up(self, slot: Slot) -> bool:
        """Resume `slot` from its longest cached prefix, once; True if it started decoding."""
        slot.looked_up = True
        hit = self._prefix.lookup(slot.ids, self._keys(slot)) if self._prefix.enabled else None
        if hit is None:
            return False
        self._resume(slot, hit)
        return hit.logits is not None

    def _resume(self, slot: Slot, hit: PrefixHit) -> None:
        """Continue `slot` from cached KV: decode at once if its whole prompt was cached, else
        prefill the rest after the cached prefix."""
        slot.prefilled = hit.tokens
        kv = self._runner.from_prefix(hit.blocks, tokens=hit.tokens, capacity=len(slot.ids))
        if hit.logits is None:
            slot.kv = kv
            return
        self._waiting.remove(slot)
        self._start([slot], kv, hit.logits.unsqueeze(0), [0])

    def _keys(self, slot: Slot) -> PromptKeys:
        if slot.prefix_keys is None:
            slot.prefix_keys = self._prefix.keys(slot.ids, slot.state.params.cache_salt)
        return slot.prefix_keys

    def _remember(self, slots: list[Slot], kv: KV, logits: torch.Tensor, rows: list[int]) -> None:
        """Offer freshly prefilled prompts to the prefix cache (each distinct prompt once)."""
        seen: set[int] = set()
        for slot, row in zip(slots, rows, strict=True):
            if row not in seen:
                seen.add(row)
                self._prefix.store(slot.ids, self._keys(slot), kv=kv, row=row, logits=logits[row])

    def _short_group(self) -> list[Slot]:
        room = self._limits.max_running - len(self._running)
        group: list[Slot] = []
        tokens = 0
        for slot in self._waiting:
            if len(group) >= room or slot.prefilled or slot.remaining > self._limits.prefill_chunk:
                break
            if group and not self._fits([*group, slot]):
                break
            if group and tokens + slot.remaining > self._limits.prefill_budget:
                break
            group.append(slot)
            tokens += slot.remaining
        return group

    def _prefill_chunk(self, slot: Slot) -> None:
        """Advance one long prompt by a chunk, in a KV row of its own."""
        chunk = slot.ids[slot.prefilled : slot.prefilled + self._limits.prefill_chunk]
        slot.kv, logits = self._runner.prefill_chunk(slot.kv, chunk)
        self.prefill_tokens += len(chunk)
        slot.prefilled += len(chunk)
        if slot.remaining == 0:
            self._waiting.remove(slot)
            kv, slot.kv = slot.kv, None
            self._remember([slot], kv, logits, [0])
            self._start([slot], kv, logits, [0])

    def _prefill_group(self, group: list[Slot]) -> None:
        """Prefill several short prompts in one forward pass; equal prompts (under one cache salt) share a row."""
        self._admitting(group)
        unique: dict[tuple[str | None, tuple[int, ...]], int] = {}
        for slot in group:
            unique.setdefault(slot.row_key, len(unique))
        prompts = [list(prompt) for _, prompt in unique]
        kv, logits = self._runner.prefill(prompts)
        self.prefill_tokens += sum(len(p) for p in prompts)
        rows = [unique[s.row_key] for s in group]
        self._remember(group, kv, logits, rows)
        for slot in group:
            slot.prefilled = len(slot.ids)
        self._waiting = [s for s in self._waiting if s not in group]
        self._start(group, kv, logits, rows)

    def _start(self, slots: list[Slot], kv: KV, logits: torch.Tensor, rows: list[int]) -> None:
        """Sample each new sequence's first token and move the live ones into the batch."""
        live = []
        for slot, row in zip(slots, rows, strict=True):
            if self._advance(slot, logits[row]):
                live.append((slot, row))
        kv.select([row for _, row in live])
        if not live:
            return
        self._kv.extend(kv)
        self._running.extend(slot for slot, _ in live)

    # Decode ----------------------------------------------------------------------------------

    def _decode(self) -> None:
        tokens = [slot.last_token for slot in self._running]
        try:
            logits = self._runner.decode(self._kv, tokens, column_limit=self._column_limit())
        except Exception as exc:  # the shared cache may hold half a step: no row can go on
            self._fail(self._running, exc)
            self._running = []
            self._drop_kv()
            return
        keep = [row for row, slot in enumerate(self._running) if self._advance(slot, logits[row])]
        if len(keep) < len(self._running):
            self._keep_rows(keep)

    def _column_limit(self) -> int:
        """The most columns the batch cache may grow to: what its longest row can ever hold,
        and never past the budget (its buffers would otherwise double past it)."""
        longest = max(slot.reservation for slot in self._running)
        budget = self._limits.kv_tokens
        return longest if budget is None else min(longest, budget // len(self._running))

    def _advance(self, slot: Slot, logits: torch.Tensor) -> bool:
        """Sample one token for `slot` and hand out its text; False once it has finished or
        failed (a failure ends this sequence only)."""
        try:
            return self._sample(slot, logits)
        except Exception as exc:
            self._fail([slot], exc)
            return False

    def _sample(self, slot: Slot, logits: torch.Tensor) -> bool:
        state = slot.state
        if slot.constraint is not None:
            logits = logits.clone()  # the row may be shared (n choices, the prompt cache)
            slot.constraint.mask(logits, state.params.max_tokens - len(state.output_ids))
        token, logprob = sample_with_logprob(
            logits,
            state.params,
            prompt_ids=state.prompt_ids,
            output_ids=state.output_ids,
            generator=slot.generator,
        )
        slot.last_token = token
        if slot.constraint is not None and not slot.constraint.accept(token):
            raise RuntimeError(f"sampled token {token}, which the grammar forbids")
        # A constraint that closed its JSON early to fit the limit ends the sequence as the limit would.
        cut = slot.constraint is not None and slot.constraint.cut
        output = state.append(token, logprob, last=cut)
        if output is not None:
            slot.channel.put(output)
        if state.finished or slot.channel.cancelled:
            self._live.discard(slot)
            return False
        return True

