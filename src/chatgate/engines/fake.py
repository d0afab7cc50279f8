"""The `fake` engine: a deterministic stand-in model for testing everything around an engine.

Its tokenizer is byte-level (one token per UTF-8 byte), so multi-byte characters arrive split
across tokens as they do with real models. Its greedy reply to a prompt is fixed and
predictable: `FakeEngine.reply_for(prompt_text)`, then an end-of-sequence token. Each step gives
the scripted token a high logit and leaves the choice to the real sampler, so every sampling
parameter is exercised as it is with a real model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from chatgate.engines.base import Engine, GenerationOutput, ModelInfo, Phases, SamplingParams
from chatgate.engines.sampling import make_generator, sample_with_logprob
from chatgate.engines.sequence import SequenceState

EOS = 256
BOS = 257
EMBEDDING_DIM = 16


class FakeEngine(Engine):
    """A byte-level fake model whose answers tests can predict."""

    def __init__(
        self,
        *,
        name: str = "fake-model",
        context_length: int = 1024,
        token_delay: float = 0.0,
        prefill_delay: float = 0.0,
        fail_after: int | None = None,
        tools_in_template: bool = False,
    ) -> None:
        self.info = ModelInfo(
            name=name,
            context_length=context_length,
            vocab_size=BOS + 1,
            embedding_dim=EMBEDDING_DIM,
            tools_in_template=tools_in_template,
        )
        self.token_delay = token_delay
        self.prefill_delay = prefill_delay  # before the first token, as a long prompt's prefill
        self.fail_after = fail_after  # raise after this many tokens, to test error paths
        self.embed_calls: list[int] = []  # batch sizes the engine was asked to embed
        self.active = 0  # generations running now
        self.served = 0  # generations ever started

    @staticmethod
    def reply_for(prompt: str) -> str:
        """The text the fake model answers `prompt` with (greedy)."""
        tail = prompt.strip().splitlines()[-2:] if prompt.strip() else [""]
        return f"Echo: {' '.join(tail)[-40:]} ✓ done."

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *, add_generation_prompt: bool = True
    ) -> str:
        lines = [f"<{m['role']}> {m.get('content') or ''}" for m in messages]
        if tools and self.info.tools_in_template:
            lines.insert(0, "<tools> " + " ".join(t["function"]["name"] for t in tools))
        return "\n".join(lines) + ("\n<assistant>" if add_generation_prompt else "")

    def pending(self) -> int:
        return self.active

    @property
    def eos_token_ids(self) -> list[int]:
        return [EOS]

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """A normalised histogram of token ids modulo the dimension: equal inputs, equal vectors."""
        self.embed_calls.append(len(inputs))
        await asyncio.sleep(self.token_delay)
        vectors = torch.zeros((len(inputs), EMBEDDING_DIM))
        for row, ids in enumerate(inputs):
            for token in ids:
                vectors[row, token % EMBEDDING_DIM] += 1.0
        return torch.nn.functional.normalize(vectors, dim=-1).tolist()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        script = list(self.reply_for(self.decode(prompt_ids)).encode("utf-8")) + [EOS]
        state = SequenceState(
            prompt_ids=prompt_ids, params=params, decode=self.decode, eos_token_ids=frozenset({EOS})
        )
        generator = make_generator(params.seed)
        begun = time.time_ns()
        self.active += 1
        self.served += 1
        try:
            if self.prefill_delay:
                await asyncio.sleep(self.prefill_delay)
            while not state.finished:
                step = len(state.output_ids)
                if step == self.fail_after:
                    raise RuntimeError("the fake engine failed as configured")
                await asyncio.sleep(self.token_delay)
                # The scripted token is far likelier than the rest; the real sampler decides.
                logits = torch.zeros(self.info.vocab_size)
                logits[script[min(step, len(script) - 1)]] = 10.0
                token, logprob = sample_with_logprob(
                    logits, params, prompt_ids=prompt_ids, output_ids=state.output_ids, generator=generator
                )
                output = state.append(token, logprob)
                if output is not None and state.finished:  # no queue here: admitted at once
                    first = state.first_token_ns or None
                    yield replace(output, phases=Phases(queued=begun, admitted=begun, first_token=first, finished=time.time_ns()))
                elif output is not None:
                    yield output
        finally:
            self.active -= 1
