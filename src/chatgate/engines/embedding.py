"""Batched embedding forward passes shared by engines: sort by length, pad, pool, normalise."""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Work done a chunk at a time: each `yield` is a point where other work may run.
Steps = Generator[None, None, list[list[float]]]


def embed_in_batches(
    inputs: list[list[int]], *, forward: Forward, pad_id: int, batch_size: int, device: str = "cpu"
) -> list[list[float]]:
    """Vectors for token-id lists, in input order, all batches at once."""
    steps = embed_steps(inputs, forward=forward, pad_id=pad_id, batch_size=batch_size, device=device)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            vectors: list[list[float]] = done.value
            return vectors


def embed_steps(
    inputs: list[list[int]],
    *,
    forward: Forward,
    pad_id: int,
    batch_size: int,
    max_tokens: int | None = None,
    device: str = "cpu",
) -> Steps:
    """Vectors for token-id lists, in input order, yielding after each batch.

    Inputs of similar length share a batch so little work goes to padding; a batch holds at
    most `batch_size` rows and, beyond its first row, `max_tokens` padded tokens. `forward`
    maps (input_ids, attention_mask) to one vector per row.
    """
    out: list[list[float]] = [[] for _ in inputs]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    while order:
        batch = _take_batch(order, [len(inputs[i]) for i in order], batch_size, max_tokens)
        order = order[len(batch) :]
        with torch.inference_mode():
            vectors = _forward_batch([inputs[i] for i in batch], forward, pad_id, device)
        for row, index in enumerate(batch):
            out[index] = vectors[row].tolist()
        yield
    return out


def _take_batch(order: list[int], lengths: list[int], rows: int, max_tokens: int | None) -> list[int]:
    """The next batch from the front of `order` (sorted by length, so the last row is widest)."""
    take = 1
    while take < min(rows, len(order)):
        if max_tokens is not None and (take + 1) * lengths[take] > max_tokens:
            break
        take += 1
    return order[:take]


def _forward_batch(batch: list[list[int]], forward: Forward, pad_id: int, device: str) -> torch.Tensor:
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    vectors = forward(ids.to(device), mask.to(device))
    return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real (unmasked) tokens of each row."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
