"""A running request (`Sequence`): its prompt, parameters and output, how its text is released,
and the bookkeeping the scheduler keeps for it; and the channel its outputs reach asyncio by.

A delta never ends in half a UTF-8 character (see `detokenize.py`) and never shows text that
could still turn out to be the start of a stop string; such text is held back until it is known.
A stop string is never part of the returned text.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence as Seq
from typing import Any

import torch

from chatgate.engines.base import GenerationOutput, SamplingParams, TokenLogprob
from chatgate.engines.detokenize import IncrementalDecoder
from chatgate.engines.prefix_cache import PromptKeys
from chatgate.engines.runners.base import KV
from chatgate.engines.sampling import make_generator


class StopText:
    """Output text not handed out yet, searched for stop strings.

    Work per token is bounded: text comes from an `IncrementalDecoder`, and only the text not
    handed out yet is searched for stop strings. That is enough: text that ends in the start of
    a stop string is held back, so a stop string never begins in text already handed out.
    """

    def __init__(self, decode: Callable[[Seq[int]], str], stop: tuple[str, ...]) -> None:
        self._decoder = IncrementalDecoder(decode)
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._pending = ""  # settled text not handed out yet

    def push(self, token_id: int) -> None:
        """Add a token's text, as far as it is settled."""
        self._pending += self._decoder.push(token_id)

    def flush(self) -> None:
        """Settle the rest: no token follows."""
        self._pending += self._decoder.flush()

    def stop_at(self) -> int | None:
        """Index in the pending text where the earliest stop string starts, if one appeared."""
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def stop_string_at(self, at: int) -> str:
        """The stop string that starts at `at` in the pending text (the shortest, if several do)."""
        return min((s for s in self._stop if self._pending.find(s) == at), key=len)

    def safe(self) -> int:
        """Characters of the pending text that cannot start a stop string."""
        for keep in range(min(self._longest_stop - 1, len(self._pending)), 0, -1):
            if any(s.startswith(self._pending[-keep:]) for s in self._stop):
                return len(self._pending) - keep
        return len(self._pending)

    def take(self, chars: int | None = None) -> str:
        """Hand out the first `chars` pending characters (all of them if None)."""
        end = len(self._pending) if chars is None else chars
        delta, self._pending = self._pending[:end], self._pending[end:]
        return delta


class Sequence:
    """One running request: prompt, sampling parameters and output so far, where its outputs go,
    and the scheduler's bookkeeping (the fake engine, which has no scheduler, leaves it alone)."""

    def __init__(
        self,
        *,
        prompt_ids: list[int],
        params: SamplingParams,
        decode: Callable[[Seq[int]], str],
        eos_token_ids: frozenset[int],
        channel: OutputChannel | None = None,
        generator: torch.Generator | None = None,
        constraint: Any = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended it (Anthropic reports it)
        self.channel = channel  # None: the caller reads what `append` returns (the fake engine)
        self.generator = generator if generator is not None else make_generator(params.seed)
        self.constraint = constraint  # a `constraints.Constraint` for structured output
        self._text = StopText(decode, params.stop)
        self._stop_ids = eos_token_ids | frozenset(params.stop_token_ids)
        self._last_emit_index = 0
        self._logprobs: list[TokenLogprob] = []
        self._logprobs_sent = 0
        self.first_token_ns = 0  # wall time its first token was sampled, for its trace (0: not yet)
        # The scheduler's bookkeeping.
        self.prefilled = 0  # tokens of `ids` whose KV is built
        self.last_token = -1
        self.kv: KV | None = None  # partial cache of a chunked prefill
        self.prefix_keys: PromptKeys | None = None  # block keys of `ids`
        self.looked_up = False  # the prefix cache was asked for `ids`
        self.arrival = 0  # when it reached the scheduler (a rising count)
        self.admitted = 0  # when it was admitted (a rising count; 0: waiting, not admitted)
        self.admitted_ns = 0  # wall time of its first admission, for its trace (0: not yet)
        self.preemptions = 0  # times it gave its rows back to be recomputed
        self.cached_tokens = 0  # prompt tokens the prefix cache served at its first admission
        # After a preemption: the prompt and every token generated so far, to prefill again.
        self.resumed_ids: list[int] | None = None

    def __repr__(self) -> str:
        return f"Sequence(prompt={len(self.prompt_ids)}, output={len(self.output_ids)}, finish={self.finish_reason})"

    @property
    def finished(self) -> bool:
        """Whether the sequence has ended."""
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        """Whether its consumer went away."""
        return self.channel is not None and self.channel.cancelled

    def put(self, item: GenerationOutput | BaseException) -> None:
        """Send an output or an error to the consumer, through the channel (from the engine thread)."""
        if self.channel is None:
            raise RuntimeError("this sequence has no output channel")
        self.channel.put(item)

    # Scheduling ---------------------------------------------------------------------------

    @property
    def priority(self) -> int:
        """Lower runs first under the priority scheduling policy."""
        return self.params.priority

    @property
    def ids(self) -> list[int]:
        """The tokens whose KV a prefill builds: the prompt, plus the output after a preemption."""
        return self.resumed_ids if self.resumed_ids is not None else self.prompt_ids

    @property
    def remaining(self) -> int:
        """Tokens of `ids` not yet prefilled."""
        return len(self.ids) - self.prefilled

    @property
    def kv_salt(self) -> str | None:
        """What KV this sequence may share (prefix cache, prefill rows) is salted by: the cache
        salt, and the LoRA adapter, whose KV differs from the base model's for the same tokens."""
        if self.params.lora is None:
            return self.params.cache_salt
        return f"{self.params.cache_salt or ''}\0lora:{self.params.lora}"

    @property
    def row_key(self) -> tuple[str | None, tuple[int, ...]]:
        """What equal prompts share a prefill row by: their tokens, under one salt (a prompt must
        not prefill faster because another tenant's equal one is beside it)."""
        return self.kv_salt, tuple(self.ids)

    @property
    def reservation(self) -> int:
        """The most KV columns this sequence can ever fill: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_tokens

    # Output ---------------------------------------------------------------------------------

    def append(self, token_id: int, logprob: TokenLogprob | None = None, *, last: bool = False) -> GenerationOutput | None:
        """Record a sampled token; return the output it releases, if any. `last` ends the
        sequence at this token as reaching `max_tokens` would."""
        if not self.output_ids:
            self.first_token_ns = time.time_ns()
        self.output_ids.append(token_id)
        text = self._text
        if token_id in self._stop_ids:
            self.finish_reason = "stop"
            text.flush()
            return self._output(text.take())
        if logprob is not None:
            self._logprobs.append(logprob)
        text.push(token_id)
        if last or len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"  # unless a stop string ends it first, below
            text.flush()
        stop_at = text.stop_at()
        if stop_at is not None:
            self.finish_reason = "stop"
            self.stop_sequence = text.stop_string_at(stop_at)
            return self._output(text.take(stop_at))
        if self.finished:
            return self._output(text.take())
        safe = text.safe()
        if safe <= 0:
            return None
        return self._output(text.take(safe))

    def _output(self, delta: str) -> GenerationOutput:
        """Hand out `delta` with the tokens since the last output."""
        new_ids = self.output_ids[self._last_emit_index :]
        self._last_emit_index = len(self.output_ids)
        logprobs = None
        if self.params.logprobs is not None:
            logprobs = self._logprobs[self._logprobs_sent :]
            self._logprobs_sent = len(self._logprobs)
        return GenerationOutput(
            logprobs=logprobs,
            text=delta,
            token_ids=new_ids,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            finish_reason=self.finish_reason,
            stop_sequence=self.stop_sequence,
            cached_tokens=self.cached_tokens,
        )


Item = GenerationOutput | BaseException


class _Mailbox:
    """Outputs bound for one event loop's queues, delivered in batches.

    Waking a loop from another thread writes to a pipe, a system call the engine thread would
    otherwise make for every token of every row (3.5% of a 16-row step). A batch step posts all
    its rows' outputs before the loop runs, so one wake-up carries them all.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: `_mailboxes` is keyed weakly by the loop, and a strong reference here would keep
        # every loop (and its mailbox) alive for ever.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: deque[tuple[asyncio.Queue[Item], Item]] = deque()
        self._armed = False  # a delivery is scheduled and has not started yet

    def post(self, queue: asyncio.Queue[Item], item: Item) -> bool:
        """Deliver `item` into `queue` on the loop; False if the loop is closed."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return False
        with self._lock:
            self._items.append((queue, item))
            if self._armed:
                return True
            self._armed = True
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # closed since the check above
            return False
        return True

    def _deliver(self) -> None:
        with self._lock:
            self._armed = False
            items, self._items = self._items, deque()
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


class OutputChannel:
    """Hands outputs from an engine thread to the asyncio consumer of one sequence."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._mailbox = _mailbox(loop)
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self.cancelled = False

    def put(self, item: Item) -> None:
        """Called from the engine thread."""
        if not self._mailbox.post(self._queue, item):  # the loop is closed: nobody is listening any more
            self.cancelled = True

    async def get(self) -> GenerationOutput:
        """Next output; re-raises an engine error."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

