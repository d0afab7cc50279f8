"""A runner without a model, so the scheduler core can be tested on its own.

Its "model" is arithmetic: a row's next-token logits depend only on the tokens the row holds
(a rolling hash picks the favourite, its neighbour comes second), so any correct schedule gives
exactly the tokens a sequence gets alone. It also counts what a runner that owns memory outside
Python (llama.cpp) must get back: rows held and spans kept, which are zero once every sequence
has ended and the prefix cache has been emptied.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chatgate.engines.base import TokenLogprob
from chatgate.engines.runners.base import Runner
from chatgate.engines.sampling import scored


@dataclass(frozen=True)
class FakeSpan:
    """Some tokens of a row, as the prefix cache keeps them."""

    tokens: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 8 * len(self.tokens)


@dataclass(eq=False)
class FakeKV:
    """Rows of token ids."""

    runner: FakeRunner
    tokens: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runner.rows_held += len(self.tokens)

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def held(self) -> list[int]:
        return [len(row) for row in self.tokens]

    def select(self, rows: list[int]) -> None:
        self.runner.rows_held += len(rows) - len(self.tokens)
        self.tokens = [list(self.tokens[row]) for row in rows]

    def extend(self, other: Any) -> None:
        self.tokens += other.tokens
        other.tokens = []

    def row_spans(self, row: int, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        self.runner.spans_held += len(ranges)
        return [FakeSpan(tuple(self.tokens[row][start:end])) for start, end in ranges]


class FakeRunner(Runner):
    """Logits from the tokens a row holds; `padded` picks how the scheduler counts its KV."""

    def __init__(self, *, vocab: int = 64, padded: bool = False) -> None:
        self.vocab = vocab
        self.padded = padded
        self.rows_held = 0  # rows of every KV not yet freed
        self.spans_held = 0  # spans the prefix cache has not released
        self.forward_tokens = 0  # tokens run through the "model"
        self.fail_next_decode = False  # make the next decode step raise (fault tests)

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """What the model says after `tokens`."""
        key = 0
        for token in tokens:
            key = (key * 1_000_003 + token + 1) % 2**61
        favourite = key % self.vocab
        out = torch.zeros(self.vocab)
        out[favourite] = 6.0
        out[(favourite + 1) % self.vocab] = 5.0
        return out

    def empty(self) -> FakeKV:
        return FakeKV(self)

    def prefill(self, prompts: list[list[int]], *, adapters: list[str | None] | None = None) -> tuple[FakeKV, torch.Tensor]:
        self.forward_tokens += sum(len(p) for p in prompts)
        return FakeKV(self, [list(p) for p in prompts]), torch.stack([self.logits(p) for p in prompts])

    def prefill_chunk(self, kv: Any, chunk: list[int], *, adapter: str | None = None) -> tuple[FakeKV, torch.Tensor]:
        kv = kv if kv is not None else FakeKV(self, [[]])
        kv.tokens[0] += chunk
        self.forward_tokens += len(chunk)
        return kv, self.logits(kv.tokens[0]).unsqueeze(0)

    def decode(
        self, kv: Any, tokens: list[int], *, column_limit: int, adapters: list[str | None] | None = None
    ) -> torch.Tensor:
        if self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("injected decode failure")
        for row, token in zip(kv.tokens, tokens, strict=True):
            row.append(token)
        self.forward_tokens += len(tokens)
        return torch.stack([self.logits(row) for row in kv.tokens])

    def from_prefix(self, spans: list[Any], *, tokens: int, capacity: int) -> FakeKV:
        row = [token for span in spans for token in span.tokens][:tokens]
        return FakeKV(self, [row])

    def release(self, span: Any) -> None:
        self.spans_held -= 1

    def score_prompt(self, prompt_ids: list[int], top: int) -> Generator[None, None, list[TokenLogprob | None]]:
        out: list[TokenLogprob | None] = [None]
        for end in range(1, len(prompt_ids)):
            logprobs = torch.log_softmax(self.logits(prompt_ids[:end]), dim=-1)
            out.append(scored(logprobs, prompt_ids[end], top))
            yield
        return out

    def embed(self, inputs: list[list[int]]) -> Generator[None, None, list[list[float]]]:
        out = []
        for ids in inputs:
            counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=self.vocab)[: self.vocab].float()
            out.append(torch.nn.functional.normalize(counts, dim=0).tolist())
            yield
        return out
