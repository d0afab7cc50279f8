"""Keeping prompt preparation off the event loop, and refusing hopeless prompts before it.

Tokenising, chat-template rendering and grammar compilation take CPU time that grows with the
request (an 8 MB prompt tokenises for seconds). They run in a small pool of threads, so the
event loop keeps streaming other requests' tokens and answering `/health` meanwhile.

Before any of that, a prompt whose text is longer than any prompt that fits the context could
be is refused by its length alone: no token holds more than the tokenizer's longest token, so a
text of more than `context_length × longest token` UTF-8 bytes cannot fit. Characters are never
more than UTF-8 bytes, so the same bound on characters is safe too and costs nothing to check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import anyio

from chatgate.engines.base import Engine
from chatgate.errors import ContextLengthExceededError

T = TypeVar("T")

# A decoded token leaves out special tokens' text (`<|im_start|>`), so their length is not
# measured; no tokenizer we know has special tokens longer than this.
_SPECIAL_TOKEN_BYTES = 32


class Admission:
    """Runs prompt preparation in threads and refuses prompts too long to possibly fit."""

    def __init__(self, engine: Engine, *, threads: int = 2) -> None:
        self._engine = engine
        self._limiter = anyio.CapacityLimiter(threads)
        self._longest_token: int | None = None

    async def run(self, work: Callable[[], T]) -> T:
        """Run CPU-bound `work` in the pool; the loop stays free."""
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    async def max_chars(self) -> int:
        """Longest text (in characters) that could possibly fit the context."""
        if self._longest_token is None:
            self._longest_token = await self.run(self._measure_longest_token)
        return self._engine.info.context_length * self._longest_token

    def _measure_longest_token(self) -> int:
        decode = self._engine.decode
        longest = max((len(decode([i]).encode("utf-8")) for i in range(self._engine.info.vocab_size)), default=1)
        return max(longest, _SPECIAL_TOKEN_BYTES)

    async def check_length(self, texts: Iterable[str], *, param: str, each: bool = False) -> None:
        """Refuse texts whose total length (or, with `each`, any one's) alone proves they
        exceed the context."""
        lengths = [len(text) for text in texts]
        limit = await self.max_chars()
        chars = max(lengths, default=0) if each else sum(lengths)
        if chars > limit:
            context = self._engine.info.context_length
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens. However, the "
                f"request's {param} hold {chars} characters, more than {context} tokens can. "
                "Please reduce the length.",
                param=param,
            )
