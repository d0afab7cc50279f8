"""Continuous batching: the engine's core. One loop decides, each step, what every live sequence
does, and has a runner (`runners/`) execute it: the scheduler never touches a model or a tensor's
layout, only the runner's KV handles and the logits it returns.

Each iteration of the loop, a *step* (`Scheduler.step`; its decode step, 4 below, adds one token to
every running row):
1. admits new sequences and embedding jobs, and drops sequences whose consumer went away;
2. prefills waiting prompts in the policy's order (`policy.py`: first come, first served, or by
   `priority`, when a waiting prompt that outranks a running sequence preempts it if the batch
   or the budget is full) while the KV they would hold fits the
   budget (`kv_demand`: what the batch holds now, not what it might come to hold, plus
   `HEADROOM` decode steps per row): a prompt resumes after the longest prefix the prefix cache
   holds (`prefix_cache.py`), or starts decoding at once if it holds all of it; short ones
   prefill together in one padded forward pass (a request's `n` copies of one prompt share a
   single row), a long one a chunk at a time, so running streams are never stalled for a whole
   long prompt;
3. if the next decode step would outgrow the budget, preempts the most recently admitted
   sequences (under `priority`, the lowest-ranked first; never the last one) until it fits:
   their KV is dropped and they wait ahead of every sequence not yet admitted (under
   `priority`, in rank among them; behind a prompt still prefilling), keeping their output,
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
from dataclasses import dataclass

import torch

from chatgate.engines.policy import Policy
from chatgate.engines.prefix_cache import DEFAULT_BLOCK, PrefixCache, PrefixHit, PrefixStats, PromptKeys
from chatgate.engines.runners.base import KV, Runner
from chatgate.engines.sampling import sample_with_logprob
from chatgate.engines.sequence import Sequence
from chatgate.errors import ContextLengthExceededError
from chatgate.settings import SchedulingPolicy

log = logging.getLogger(__name__)


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

    def __init__(self, *, runner: Runner, limits: SchedulerLimits, policy: SchedulingPolicy = "fcfs") -> None:
        self._runner = runner
        self._limits = limits
        self._policy = Policy(policy)
        self.inbox: queue.Queue[Sequence | Job | None] = queue.Queue()
        self._waiting: list[Sequence] = []
        self._live: set[Sequence] = set()  # every admitted sequence not yet ended, wherever it is
        self._running: list[Sequence] = []
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
        self._arrivals = 0

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
            if self._waiting and self._policy.by_priority:
                self._outrank()
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

    def _fail(self, seqs: Iterable[Sequence], exc: Exception) -> None:
        """End `seqs` with `exc`; the caller takes them out of the waiting or running lists."""
        seqs = list(seqs)
        log.error("engine step failed for %d sequence(s)", len(seqs), exc_info=exc)
        for seq in seqs:
            seq.put(exc)
            self._drop_partial(seq)
            self._live.discard(seq)

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
                if isinstance(item, Sequence):
                    self._arrivals += 1
                    item.arrival = self._arrivals
                    self._waiting.append(item)
                    self._live.add(item)
                else:
                    self._jobs.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            self._waiting = self._policy.order(self._waiting)
            return True

    def _drop_cancelled(self) -> None:
        self._live = {s for s in self._live if not s.cancelled}
        for seq in self._waiting:
            if seq.cancelled:
                self._drop_partial(seq)
        self._waiting = [s for s in self._waiting if not s.cancelled]
        keep = [i for i, s in enumerate(self._running) if not s.cancelled]
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

    def _drop_partial(self, seq: Sequence) -> None:
        """Free the KV of a prompt part-way through its prefill."""
        kv, seq.kv = seq.kv, None
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

    def _holdings(self) -> list[tuple[Sequence, int]]:
        """Each admitted sequence with the KV tokens it holds once in the batch: a running row its
        own length, a sequence still prefilling the whole of what it prefills."""
        running = list(zip(self._running, self._kv.held(), strict=True))
        return running + [(s, len(s.ids)) for s in self._waiting if s.admitted]

    def kv_demand(self, joining: Iterable[Sequence] = (), *, ahead: int = 0, leaving: Iterable[Sequence] = ()) -> int:
        """KV tokens the batch holds `ahead` decode steps from now, with the admitted sequences
        but `leaving` and with `joining`, none counted past what it can ever hold (its
        `reservation`): where the runner pads rows to the longest (torch), rows times the
        longest row, else their sum."""
        rows = dict(self._holdings())
        for seq in leaving:
            rows.pop(seq, None)
        for seq in joining:
            rows.setdefault(seq, len(seq.ids))
        held = [min(tokens + ahead, s.reservation) for s, tokens in rows.items()]
        if self._runner.padded:
            return len(held) * max(held, default=0)
        return sum(held)

    def _fits(self, joining: list[Sequence]) -> bool:
        """Whether `joining` may be admitted now: the batch with them still fits the budget
        `HEADROOM` decode steps from now."""
        budget = self._limits.kv_tokens
        return budget is None or self.kv_demand(joining, ahead=HEADROOM) <= budget

    def _admissible(self, seq: Sequence) -> bool:
        """Whether `seq` may start its prefill now; one that could never fit is refused.

        The worker refuses such requests before they reach the engine (the context length it
        reports is capped at the budget); this keeps a direct caller from waiting forever."""
        if self._fits([seq]):
            return True
        budget = self._limits.kv_tokens
        if budget is not None and seq.reservation > budget:
            self._waiting.remove(seq)
            self._live.discard(seq)
            seq.put(ContextLengthExceededError(
                f"This request needs up to {seq.reservation} tokens of KV cache (prompt plus "
                f"max_tokens); this model holds at most {budget}. Please reduce the length.",
                param="max_tokens",
            ))
        return False

    def _admitting(self, seqs: Iterable[Sequence]) -> None:
        """Stamp `seqs` as admitted now, in order: preemption takes the latest stamp first."""
        for seq in seqs:
            if not seq.admitted:
                self._admissions += 1
                seq.admitted = self._admissions
                seq.admitted_ns = seq.admitted_ns or time.time_ns()

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
            self._preempt(self._policy.first_to_go(admitted))

    def _preempt(self, seq: Sequence) -> None:
        if seq in self._running:
            row = self._running.index(seq)
            self._keep_rows([r for r in range(len(self._running)) if r != row])
            # The KV held the prompt and every output token but the last; prefilling all of
            # them gives the logits the next decode step would have, and sampling goes on from
            # the same output, generator and constraint state: the stream does not notice.
            seq.resumed_ids = seq.prompt_ids + seq.output_ids
        # Back in line ahead of everyone not yet admitted, but behind a prompt still being
        # prefilled a chunk at a time: only the head of the queue advances, and a preempted
        # sequence that cannot fit beside that prompt's KV would otherwise block it for ever.
        rest = [s for s in self._waiting if s is not seq]
        at = max((i + 1 for i, s in enumerate(rest) if s.admitted), default=0)
        self._waiting = [*rest[:at], seq, *rest[at:]]
        self._drop_partial(seq)
        seq.prefilled, seq.prefix_keys, seq.looked_up, seq.admitted = 0, None, False, 0
        seq.preemptions += 1
        self.preemptions += 1
        self._waiting = self._policy.order(self._waiting)

    def _outrank(self) -> None:
        """Under the priority policy: while the best waiting sequence not yet admitted cannot
        start (the batch is full, or its KV does not fit) and outranks a running one, that one
        gives way (`_preempt`: it resumes later where it was)."""
        head = next((s for s in self._waiting if not s.admitted), None)
        if head is None:
            return
        budget = self._limits.kv_tokens
        outranked = [s for s in self._running if s.priority > head.priority]
        if budget is not None and self.kv_demand([head], ahead=HEADROOM, leaving=outranked) > budget:
            return  # it would not fit even without every sequence it outranks: none gives way for nothing
        while len(self._running) >= self._limits.max_running or not self._fits([head]):
            victim = self._policy.victim(self._running, outranked_by=head.priority)
            if victim is None:
                return
            self._preempt(victim)

    def _reuse_prefills(self) -> None:
        """Start waiting sequences whose whole prompt is cached."""
        room = self._limits.max_running - len(self._running)
        started = 0
        best = min((s.priority for s in self._waiting), default=0)
        for seq in list(self._waiting) if self._prefix.enabled else []:
            if started >= room or not self._fits([seq]):
                break
            if self._policy.by_priority and seq.priority > best:
                continue  # a cached prompt must not take the room of one that outranks it
            try:
                hit = None if seq.prefilled else self._prefix.lookup(seq.ids, self._keys(seq), whole=True)
                if hit is not None:
                    self._admitting([seq])
                    self._resume(seq, hit)
                    started += 1
            except Exception as exc:  # as a failed prefill fails its group only, this fails one sequence
                self._fail([seq], exc)
                self._waiting = [s for s in self._waiting if s is not seq]

    def _look_up(self, seq: Sequence) -> bool:
        """Resume `seq` from its longest cached prefix, once; True if it started decoding."""
        seq.looked_up = True
        hit = self._prefix.lookup(seq.ids, self._keys(seq)) if self._prefix.enabled else None
        if hit is None:
            return False
        self._resume(seq, hit)
        return hit.logits is not None

    def _resume(self, seq: Sequence, hit: PrefixHit) -> None:
        """Continue `seq` from cached KV: decode at once if its whole prompt was cached, else
        prefill the rest after the cached prefix."""
        seq.prefilled = hit.tokens
        if not seq.preemptions:  # what served the prompt at first admission, not a readmission's own output
            seq.cached_tokens = hit.tokens
        kv = self._runner.from_prefix(hit.blocks, tokens=hit.tokens, capacity=len(seq.ids))
        if hit.logits is None:
            seq.kv = kv
            return
        self._waiting.remove(seq)
        self._start([seq], kv, hit.logits.unsqueeze(0), [0])

    def _keys(self, seq: Sequence) -> PromptKeys:
        if seq.prefix_keys is None:
            seq.prefix_keys = self._prefix.keys(seq.ids, seq.kv_salt)
        return seq.prefix_keys

    def _remember(self, seqs: list[Sequence], kv: KV, logits: torch.Tensor, rows: list[int]) -> None:
        """Offer freshly prefilled prompts to the prefix cache (each distinct prompt once)."""
        seen: set[int] = set()
        for seq, row in zip(seqs, rows, strict=True):
            if row not in seen:
                seen.add(row)
                self._prefix.store(seq.ids, self._keys(seq), kv=kv, row=row, logits=logits[row])

    def _short_group(self) -> list[Sequence]:
        room = self._limits.max_running - len(self._running)
        group: list[Sequence] = []
        tokens = 0
        for seq in self._waiting:
            if len(group) >= room or seq.prefilled or seq.remaining > self._limits.prefill_chunk:
                break
            if group and not self._fits([*group, seq]):
                break
            if group and tokens + seq.remaining > self._limits.prefill_budget:
                break
            group.append(seq)
            tokens += seq.remaining
        return group

    def _prefill_chunk(self, seq: Sequence) -> None:
        """Advance one long prompt by a chunk, in a KV row of its own."""
        chunk = seq.ids[seq.prefilled : seq.prefilled + self._limits.prefill_chunk]
        seq.kv, logits = self._runner.prefill_chunk(seq.kv, chunk, adapter=seq.params.lora)
        self.prefill_tokens += len(chunk)
        seq.prefilled += len(chunk)
        if seq.remaining == 0:
            self._waiting.remove(seq)
            kv, seq.kv = seq.kv, None
            self._remember([seq], kv, logits, [0])
            self._start([seq], kv, logits, [0])

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Prefill several short prompts in one forward pass; equal prompts (under one cache salt) share a row."""
        self._admitting(group)
        unique: dict[tuple[str | None, tuple[int, ...]], int] = {}
        adapters: list[str | None] = []
        for seq in group:
            if seq.row_key not in unique:
                unique[seq.row_key] = len(unique)
                adapters.append(seq.params.lora)
        prompts = [list(prompt) for _, prompt in unique]
        kv, logits = self._runner.prefill(prompts, adapters=adapters)
        self.prefill_tokens += sum(len(p) for p in prompts)
        rows = [unique[s.row_key] for s in group]
        self._remember(group, kv, logits, rows)
        for seq in group:
            seq.prefilled = len(seq.ids)
        self._waiting = [s for s in self._waiting if s not in group]
        self._start(group, kv, logits, rows)

    def _start(self, seqs: list[Sequence], kv: KV, logits: torch.Tensor, rows: list[int]) -> None:
        """Sample each new sequence's first token and move the live ones into the batch."""
        live = []
        for seq, row in zip(seqs, rows, strict=True):
            if self._advance(seq, logits[row]):
                live.append((seq, row))
        kv.select([row for _, row in live])
        if not live:
            return
        self._kv.extend(kv)
        self._running.extend(seq for seq, _ in live)

    # Decode ----------------------------------------------------------------------------------

    def _decode(self) -> None:
        tokens = [seq.last_token for seq in self._running]
        try:
            logits = self._runner.decode(
                self._kv, tokens, column_limit=self._column_limit(), adapters=[seq.params.lora for seq in self._running]
            )
        except Exception as exc:  # the shared cache may hold half a step: no row can go on
            self._fail(self._running, exc)
            self._running = []
            self._drop_kv()
            return
        keep = [row for row, seq in enumerate(self._running) if self._advance(seq, logits[row])]
        if len(keep) < len(self._running):
            self._keep_rows(keep)

    def _column_limit(self) -> int:
        """The most columns the batch cache may grow to: what its longest row can ever hold,
        and never past the budget (its buffers would otherwise double past it)."""
        longest = max(seq.reservation for seq in self._running)
        budget = self._limits.kv_tokens
        return longest if budget is None else min(longest, budget // len(self._running))

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Sample one token for `seq` and hand out its text; False once it has finished or
        failed (a failure ends this sequence only)."""
        try:
            return self._sample(seq, logits)
        except Exception as exc:
            self._fail([seq], exc)
            return False

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> bool:
        if seq.constraint is not None:
            logits = logits.clone()  # the row may be shared (n choices, the prompt cache)
            seq.constraint.mask(logits, seq.params.max_tokens - len(seq.output_ids))
        token, logprob = sample_with_logprob(
            logits,
            seq.params,
            prompt_ids=seq.prompt_ids,
            output_ids=seq.output_ids,
            generator=seq.generator,
        )
        seq.last_token = token
        if seq.constraint is not None and not seq.constraint.accept(token):
            raise RuntimeError(f"sampled token {token}, which the grammar forbids")
        # A constraint that closed its JSON early to fit the limit ends the sequence as the limit would.
        cut = seq.constraint is not None and seq.constraint.cut
        output = seq.append(token, logprob, last=cut)
        if output is not None:
            seq.put(output)
        if seq.finished or seq.cancelled:
            self._live.discard(seq)
            return False
        return True

