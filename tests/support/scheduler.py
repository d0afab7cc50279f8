"""A continuous-batching scheduler over a tiny random Llama, driven from asyncio or a thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chatgate.engines.base import SamplingParams
from chatgate.engines.runners.torch import TorchRunner
from chatgate.engines.scheduler import Scheduler, SchedulerLimits
from chatgate.engines.sequence import OutputChannel, Sequence

VOCAB = 96


def tiny_model() -> LlamaForCausalLM:
    """A two-layer random Llama over `VOCAB` tokens, the same on every call (seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.train(False)  # what .eval() does; transformers leaves eval() unannotated and untyped for mypy
    # Sharpen the output layer so greedy choices are far from ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@contextlib.contextmanager
def scheduler_thread(model: LlamaForCausalLM, limits: SchedulerLimits) -> Iterator[Scheduler]:
    """A scheduler running in its own thread until the block ends."""
    scheduler = Scheduler(runner=TorchRunner(model, pad_token_id=0), limits=limits)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        yield scheduler
    finally:
        scheduler.inbox.put(None)
        thread.join(timeout=30)


class Harness:
    """A scheduler thread over the tiny model, driven from asyncio."""

    def __init__(self, model: LlamaForCausalLM, limits: SchedulerLimits) -> None:
        self.scheduler = Scheduler(runner=TorchRunner(model, pad_token_id=0), limits=limits)
        self.thread = threading.Thread(target=self.scheduler.run, daemon=True)
        self.thread.start()

    async def generate(self, prompt: list[int], *, max_tokens: int = 12, temperature: float = 0.0,
                       seed: int | None = None, cancel_after: int | None = None, cache_salt: str | None = None) -> list[int]:
        channel = OutputChannel(asyncio.get_running_loop())
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, cache_salt=cache_salt)
        self.scheduler.inbox.put(Sequence(prompt_ids=prompt, params=params, decode=lambda ids: "x" * len(ids),
                                          eos_token_ids=frozenset(), channel=channel))
        tokens: list[int] = []
        while True:
            out = await asyncio.wait_for(channel.get(), timeout=30)
            tokens += out.token_ids
            if cancel_after is not None and len(tokens) >= cancel_after:
                channel.cancelled = True
                return tokens
            if out.finish_reason:
                return tokens

    def close(self) -> None:
        self.scheduler.inbox.put(None)
        self.thread.join(timeout=30)


def prompts() -> list[list[int]]:
    """Ten seeded prompts of different lengths."""
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 7, 12, 5, 30, 9, 50, 4, 11, 2]  # some longer than the 16-token prefill chunk
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


class RowCounter:
    """The model, counting the rows of every decode step (one new token per row)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.config = model.config
        self.device = model.device
        self.decode_rows: list[int] = []

    def __call__(self, **inputs: Any) -> Any:
        rows, steps = inputs["input_ids"].shape
        if steps == 1:
            self.decode_rows.append(rows)
        return self.model(**inputs)
