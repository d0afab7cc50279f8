"""Per-sequence bookkeeping shared by engines: tokens to safe text deltas, and stop conditions.

A delta never ends in half a UTF-8 character (decoders show it as U+FFFD until the rest of its
bytes arrive) and never shows text that could still turn out to be the start of a stop string;
such text is held back until it is known. A stop string is never part of the returned text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence as Seq
from chatgate.engines.base import GenerationOutput, SamplingParams, TokenLogprob

REPLACEMENT = "\ufffd"


class SequenceState:
    """Tokens generated so far for one prompt, and the text already handed out."""

    def __init__(
        self,
        *,
        prompt_ids: list[int],
        params: SamplingParams,
        decode: Callable[[Seq[int]], str],
        eos_token_ids: frozenset[int],
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self._decode = decode
        self._stop_ids = eos_token_ids | frozenset(params.stop_token_ids)
        self._text_ids: list[int] = []
        self._emitted = 0
        self._last_emit_index = 0
        self._logprobs: list[TokenLogprob] = []
        self._logprobs_sent = 0

    @property
    def finished(self) -> bool:
        """Whether the sequence has ended."""
        return self.finish_reason is not None

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> GenerationOutput | None:
        """Record a sampled token; return the output it releases, if any."""
        self.output_ids.append(token_id)
        if token_id in self._stop_ids:
            self.finish_reason = "stop"
            return self._flush(self._decode(self._text_ids))
        self._text_ids.append(token_id)
        if logprob is not None:
            self._logprobs.append(logprob)
        text = self._decode(self._text_ids)
        stop_at = self._find_stop(text)
        if stop_at is not None:
            self.finish_reason = "stop"
            return self._flush(text[:stop_at])
        if len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            return self._flush(text)
        safe = self._safe_end(text)
        if safe <= self._emitted:
            return None
        return self._output(text[self._emitted : safe])

    def _find_stop(self, text: str) -> int | None:
        """Index of the earliest stop string that newly appeared in `text`."""
        if not self.params.stop:
            return None
        longest = max(len(s) for s in self.params.stop)
        start = max(0, self._emitted - longest)
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        """How much of `text` can be shown without risking a broken character or stop string."""
        end = len(text)
        while end > self._emitted and text[end - 1] == REPLACEMENT:
            end -= 1
        hold = 0
        for stop in self.params.stop:
            for keep in range(min(len(stop) - 1, end), hold, -1):
                if text.endswith(stop[:keep], 0, end):
                    hold = keep
                    break
        return max(end - hold, self._emitted)

    def _flush(self, text: str) -> GenerationOutput:
        return self._output(text[self._emitted :] if len(text) > self._emitted else "")

    def _output(self, delta: str) -> GenerationOutput:
        self._emitted += len(delta)
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
        )


class OutputChannel:
    """Hands outputs from an engine thread to the asyncio consumer of one sequence."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[GenerationOutput | BaseException] = asyncio.Queue()
        self.cancelled = False

    def put(self, item: GenerationOutput | BaseException) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    async def get(self) -> GenerationOutput:
        """Next output; re-raises an engine error."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

