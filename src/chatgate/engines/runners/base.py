"""The runner contract: forward passes over runner-owned KV, as the scheduler plans them.

The scheduler holds `KV` objects without knowing what is inside: the running batch's, a long
prompt's while it prefills a chunk at a time, a prefix-cache hit's. Each is a list of rows, one
per sequence. Rows leave (`select`), repeat (`select` with a row twice: the `n` choices of one
prompt share its prefill) and join another batch (`extend`). Only the scheduler's thread calls
a runner or its KV.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from chatgate.engines.base import TokenLogprob
from chatgate.engines.lora import AdapterError

# Work a runner does a bounded chunk at a time between scheduler steps; each `next()` is one chunk.
Job = Generator[None, None, Any]


class Span(Protocol):
    """A copy of some tokens' KV, kept by the prefix cache."""

    @property
    def nbytes(self) -> int:
        """Memory the copy holds."""


class KV(Protocol):
    """The KV of some rows, each a sequence's tokens so far."""

    @property
    def rows(self) -> int:
        """Number of rows."""

    def held(self) -> list[int]:
        """Tokens each row holds."""

    def select(self, rows: list[int]) -> None:
        """Keep only `rows`, in that order (a row may repeat); `[]` frees them all."""

    def extend(self, other: Any) -> None:
        """Take over `other`'s rows, after these (`other` is left empty)."""

    def row_spans(self, row: int, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        """A copy of tokens `start:end` of `row` for each range, for the prefix cache."""


class Runner(abc.ABC):
    """Runs forward passes for one loaded model; the scheduler owns every decision."""

    # Rows of one batch cost the longest row's KV (padded rows), or each only its own.
    padded: bool = True
    # Frees room for new rows if it can (the scheduler points it at prefix-cache eviction).
    reclaim: Callable[[], bool] = staticmethod(lambda: False)

    @abc.abstractmethod
    def empty(self) -> KV:
        """A KV with no rows."""

    # `adapters` / `adapter` below name each row's LoRA adapter (None: the base model); a
    # runner that serves none is never given a name (`read_adapter` refuses every adapter).

    @abc.abstractmethod
    def prefill(self, prompts: list[list[int]], *, adapters: list[str | None] | None = None) -> tuple[KV, torch.Tensor]:
        """A new KV holding `prompts` (one row each), and each row's last logits `[rows, vocab]`."""

    @abc.abstractmethod
    def prefill_chunk(self, kv: KV | None, chunk: list[int], *, adapter: str | None = None) -> tuple[KV, torch.Tensor]:
        """One row's KV (None: a new row) extended by `chunk`, and its last logits `[1, vocab]`."""

    @abc.abstractmethod
    def decode(
        self, kv: KV, tokens: list[int], *, column_limit: int, adapters: list[str | None] | None = None
    ) -> torch.Tensor:
        """Append one token to each row of `kv`; each row's logits `[rows, vocab]`. `column_limit`
        is the most tokens any row will hold (a padded cache grows no further)."""

    def read_adapter(self, name: str, path: Path) -> Any:
        """Read and check the LoRA adapter at `path` for this model (any thread; slow)."""
        raise AdapterError(f"LoRA adapter {name!r}: the {type(self).__name__} serves no LoRA adapters")

    def add_adapter(self, adapter: Any) -> None:
        """Serve an adapter `read_adapter` returned to rows that name it."""
        raise AdapterError("this runner serves no LoRA adapters")

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (no row names it any more)."""

    @abc.abstractmethod
    def from_prefix(self, spans: list[Any], *, tokens: int, capacity: int) -> KV:
        """A one-row KV holding the first `tokens` tokens of `spans` (in order), with room for
        `capacity` tokens."""

    def release(self, span: Any) -> None:
        """The prefix cache dropped `span`; free what it holds."""

    @abc.abstractmethod
    def score_prompt(self, prompt_ids: list[int], top: int) -> Generator[None, None, list[TokenLogprob | None]]:
        """Each prompt token's log-probability after its prefix (None for the first), as a job."""

    @abc.abstractmethod
    def embed(self, inputs: list[list[int]]) -> Generator[None, None, list[list[float]]]:
        """The mean-pooled, normalised last hidden state of each input, as a job."""
