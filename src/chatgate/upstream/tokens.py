"""Counting prompt tokens for an upstream whose tokenizer may not be known here.

With `--model-path` pointing at the model's folder, its Hugging Face tokenizer (and chat
template) count exactly; otherwise the count is an estimate of four characters per token, and
`/model_details` says `"token_count": "estimate"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from chatgate.protocol.worker import CountTokenRequest

# Role markers and separators a chat template adds per message, in estimated tokens.
_PER_MESSAGE = 4


def estimate(text: str) -> int:
    """About four characters per token, OpenAI's rule of thumb for English text."""
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class TokenCounter:
    """Counts with a tokenizer when one is known, else estimates."""

    tokenizer: Any = None

    @property
    def method(self) -> str:
        """`tokenizer` or `estimate`, as `/model_details` reports it."""
        return "tokenizer" if self.tokenizer is not None else "estimate"

    @classmethod
    def load(cls, path: str | None) -> TokenCounter:
        """A counter with the tokenizer at `path`, or an estimating one (blocking: run in a thread)."""
        if path is None:
            return cls()
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path))

    def count(self, request: CountTokenRequest) -> int:
        """Tokens of the prompt, or of the conversation as the chat template renders it."""
        if request.messages is not None:
            if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
                return len(ids["input_ids"] if isinstance(ids, dict) else ids)
            return sum(self._text(str(m.get("content") or "")) + _PER_MESSAGE for m in request.messages)
        return self._text(request.prompt or "")

    def _text(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return estimate(text)
