"""The `fake` engine: a deterministic stand-in model for testing everything around an engine.

Its tokenizer is byte-level (one token per UTF-8 byte), so multi-byte characters arrive split
across tokens as they do with real models. Its reply to a prompt is fixed and predictable:
`FakeEngine.reply_for(prompt_text)`, then an end-of-sequence token.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

from chatgate.engines.base import Engine, GenerationOutput, ModelInfo, SamplingParams
from chatgate.engines.sequence import SequenceState

EOS = 256
BOS = 257


class FakeEngine(Engine):
    """A byte-level fake model whose answers tests can predict."""

    def __init__(
        self, *, name: str = "fake-model", context_length: int = 1024, token_delay: float = 0.0
    ) -> None:
        self.info = ModelInfo(name=name, context_length=context_length, has_chat_template=True)
        self.token_delay = token_delay
        self.active = 0

    @staticmethod
    def reply_for(prompt: str) -> str:
        """The text the fake model answers `prompt` with (greedy)."""
        tail = prompt.strip().splitlines()[-2:] if prompt.strip() else [""]
        return f"Echo: {' '.join(tail)[-40:]} ✓ done."

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        lines = [f"<{m['role']}> {m.get('content') or ''}" for m in messages]
        return "\n".join(lines) + "\n<assistant>"

    def pending(self) -> int:
        return self.active

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        reply = self.reply_for(self.decode(prompt_ids))
        if not params.greedy:
            words = reply.split(" ")
            random.Random(params.seed).shuffle(words)
            reply = " ".join(words)
        tokens = list(reply.encode("utf-8")) + [EOS]
        state = SequenceState(
            prompt_ids=prompt_ids, params=params, decode=self.decode, eos_token_ids=frozenset({EOS})
        )
        self.active += 1
        try:
            for token in tokens:
                await asyncio.sleep(self.token_delay)
                output = state.append(token)
                if output is not None:
                    yield output
                if state.finished:
                    return
        finally:
            self.active -= 1
