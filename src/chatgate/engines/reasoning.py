"""Reasoning parsers: a reply's thinking split from its answer, and constraints held back until
the answer begins.

The `<think>…</think>` family (vLLM's `deepseek_r1` and `qwen3` parsers) is text-based: the
reply is thinking until the end tag, answer after it. Where thinking starts is read from the
prompt's tail, because templates differ: one that ends the generation prompt with `<think>`
(DeepSeek-R1's, or a `continue_final_message` prefill) has the reply start inside the thinking;
one that closes it there (`<think></think>`, Qwen3's `enable_thinking: false`) has none; else
`deepseek_r1` takes the reply as thinking until the end tag (its opening tag is optional, as
vLLM's parser has it) and `qwen3` only if the reply opens with `<think>`. The worker reads
only the template's generation prompt (or the prefill a reply continues), never the
conversation's text: a user asking about `<think>` changes nothing.

`ReasoningSplitter` splits streamed text, holding back a tail that may still become a tag, so a
tag never leaks into either part. `ThinkingGate` wraps a compiled grammar (`constraints.py`) so
a `response_format` or forced tool call constrains the answer, not the thinking: tokens pass
unmasked until the end tag has been generated, and the grammar starts after it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ThinkTags:
    """One parser of the `<think>` family."""

    name: str
    implicit_start: bool  # the reply is thinking from its first token, opening tag or not
    start: str = "<think>"
    end: str = "</think>"


# By vLLM's names (`--reasoning-parser`); `settings.ReasoningParser` lists the same names.
PARSERS = {
    "deepseek_r1": ThinkTags("deepseek_r1", implicit_start=True),
    "qwen3": ThinkTags("qwen3", implicit_start=False),
}


class Phase(enum.Enum):
    """Where a reply is."""

    OPENING = "opening"  # it may still open with the start tag
    THINKING = "thinking"
    ANSWER = "answer"


def first_phase(tags: ThinkTags, prompt: str) -> Phase:
    """Where the reply to `prompt` starts: inside thinking the prompt opened, after thinking
    the prompt closed, or as the parser assumes. Earlier turns' thinking is always closed, so
    an unclosed start tag can only be the generation prompt's."""
    opened, closed = prompt.rfind(tags.start), prompt.rfind(tags.end)
    if opened > closed:
        return Phase.THINKING
    if closed >= 0 and prompt.rstrip().endswith(tags.end):
        return Phase.ANSWER
    return Phase.THINKING if tags.implicit_start else Phase.OPENING


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that starts `tag` (and may become it)."""
    for keep in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-keep:]):
            return keep
    return 0


class ReasoningSplitter:
    """Splits one reply's text, as it streams, into thinking and answer."""

    def __init__(self, tags: ThinkTags, prompt: str) -> None:
        self._tags = tags
        self.phase = first_phase(tags, prompt)
        self._held = ""  # text that may still turn out to be (part of) a tag
        self._fresh = True  # no thinking handed out yet: a leading start tag is dropped

    def feed(self, text: str) -> tuple[str, str]:
        """The thinking and the answer that `text` (the next piece of the reply) settles."""
        buffer, reasoning, content = self._held + text, "", ""
        self._held = ""
        while buffer:
            if self.phase is Phase.ANSWER:
                content, buffer = content + buffer, ""
            elif self.phase is Phase.OPENING:
                buffer = self._opening(buffer)
                if self._held:
                    break
            else:
                thought, buffer = self._thinking(buffer)
                reasoning += thought
                if self._held:
                    break
        return reasoning, content

    def _opening(self, buffer: str) -> str:
        """Decide whether the reply opens with the start tag; hold it while undecided."""
        head = buffer.lstrip()
        if head.startswith(self._tags.start):
            self.phase = Phase.THINKING
            return head[len(self._tags.start) :]
        if not head or self._tags.start.startswith(head):
            self._held = buffer
            return ""
        self.phase = Phase.ANSWER
        return buffer

    def _thinking(self, buffer: str) -> tuple[str, str]:
        """The thinking in `buffer`, and what follows its end tag (the answer) if it ended."""
        start, end = self._tags.start, self._tags.end
        if self._fresh:  # a reply may spell the start tag the template already gave
            if buffer.startswith(start):
                buffer = buffer[len(start) :]
            elif start.startswith(buffer):
                self._held = buffer
                return "", ""
        at = buffer.find(end)
        if at >= 0:
            self.phase = Phase.ANSWER
            self._fresh = False
            return buffer[:at], buffer[at + len(end) :]
        keep = _partial_tail(buffer, end)
        thought = buffer[: len(buffer) - keep]
        self._held = buffer[len(buffer) - keep :]
        self._fresh = self._fresh and not thought
        return thought, ""

    def finish(self) -> tuple[str, str]:
        """What was held back, once the reply has ended."""
        held, self._held = self._held, ""
        if self.phase is Phase.THINKING:
            return held, ""
        return "", held


class GatedGrammar:
    """A compiled grammar that starts only once `end` has been generated."""

    def __init__(self, grammar: Any, end: str, token_bytes: Callable[[int], bytes]) -> None:
        self._grammar = grammar
        self._end = end.encode()
        self._token_bytes = token_bytes

    def start(self) -> ThinkingGate:
        """A fresh gate in front of a fresh matcher."""
        return ThinkingGate(self._grammar, self._end, self._token_bytes)


class ThinkingGate:
    """One sequence's constraint, open (no mask) until its thinking ends; then the grammar's."""

    def __init__(self, grammar: Any, end: bytes, token_bytes: Callable[[int], bytes]) -> None:
        self._grammar = grammar
        self._end = end
        self._token_bytes = token_bytes
        self._tail = b""  # the last bytes generated, enough to find the end tag across tokens
        self.inner: Any = None  # the grammar's constraint, once the answer has begun

    @property
    def cut(self) -> bool:
        """Complete only because the token limit closed it (see `constraints.Constraint`)."""
        return self.inner is not None and bool(self.inner.cut)

    def mask(self, logits: torch.Tensor, remaining: int) -> None:
        """Nothing is forbidden while thinking; the grammar decides after."""
        if self.inner is not None:
            self.inner.mask(logits, remaining)

    def accept(self, token: int) -> bool:
        """Follow `token`: through the grammar once it runs, else watching for the end tag."""
        if self.inner is not None:
            return bool(self.inner.accept(token))
        self._tail = (self._tail + self._token_bytes(token))[-(len(self._end) + 64) :]
        if self._end in self._tail:
            self.inner = self._grammar.start()
        return True
