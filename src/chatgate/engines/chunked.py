"""Model work the scheduler runs a bounded chunk at a time, between decode steps.

Scoring a long prompt or embedding thousands of inputs with the chat model is far more work
than one decode step. Run as one job it would freeze every running stream until it ends; as
generators that yield after each chunk (a window of one sequence, or a batch of short inputs),
the scheduler interleaves them with decoding. A long sequence is run window by window over a
KV cache, which gives the same result as one pass because the model is causal.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import torch

from chatgate.engines.base import TokenLogprob
from chatgate.engines.embedding import Steps, embed_steps, mean_pool
from chatgate.engines.kvcache import BatchKV
from chatgate.engines.sampling import scored

# Tokens per chunk: about one prefill chunk's work.
CHUNK_TOKENS = 256
EMBED_ROWS = 16


def _windows(module: Any, layers: int, ids: list[int]) -> Iterator[tuple[int, Any]]:
    """Run `ids` through `module` a window at a time, over a cache of their own."""
    cache = BatchKV(layers)
    cache.pads = [0]
    for start in range(0, len(ids), CHUNK_TOKENS):
        window = ids[start : start + CHUNK_TOKENS]
        yield start, module(
            input_ids=torch.tensor([window]),
            attention_mask=cache.attention_mask(len(window)),
            position_ids=cache.positions(len(window)),
            past_key_values=cache.cache,
            use_cache=True,
        )


@torch.inference_mode()
def score_prompt(model: Any, prompt_ids: list[int], top: int) -> Generator[None, None, list[TokenLogprob | None]]:
    """Log-probabilities of each prompt token after its prefix (None for the first)."""
    out: list[TokenLogprob | None] = [None]
    layers = int(model.config.num_hidden_layers)
    for start, result in _windows(model, layers, prompt_ids):
        logprobs = torch.log_softmax(result.logits[0].float(), dim=-1)
        following = prompt_ids[start + 1 : start + 1 + CHUNK_TOKENS]
        out += [scored(logprobs[i], token, top) for i, token in enumerate(following)]
        yield
    return out


@torch.inference_mode()
def embed_long(model: Any, ids: list[int]) -> Generator[None, None, list[float]]:
    """The mean-pooled, normalised last hidden state of one long input."""
    total: torch.Tensor | None = None
    for _, result in _windows(model.base_model, int(model.config.num_hidden_layers), ids):
        summed = result.last_hidden_state[0].float().sum(dim=0)
        total = summed if total is None else total + summed
        yield
    assert total is not None, "an input has at least one token"
    vector: list[float] = torch.nn.functional.normalize(total / len(ids), dim=-1).tolist()
    return vector


def embed(model: Any, inputs: list[list[int]], *, pad_id: int, device: str) -> Steps:
    """Mean-pooled last hidden states, as FastChat's model_worker computes them: short inputs
    in batches of bounded size, each long one window by window."""

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return mean_pool(hidden, mask)

    short = [i for i, ids in enumerate(inputs) if len(ids) <= CHUNK_TOKENS]
    out: list[list[float]] = [[] for _ in inputs]
    vectors = yield from embed_steps(
        [inputs[i] for i in short], forward=forward, pad_id=pad_id, batch_size=EMBED_ROWS,
        max_tokens=CHUNK_TOKENS * 2, device=device,
    )
    for index, vector in zip(short, vectors, strict=True):
        out[index] = vector
    for index, ids in enumerate(inputs):
        if len(ids) > CHUNK_TOKENS:
            out[index] = yield from embed_long(model, ids)
    return out
