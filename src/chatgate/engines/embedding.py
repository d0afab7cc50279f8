"""Batched embedding forward passes shared by engines: sort by length, pad, pool, normalise."""

from __future__ import annotations

from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def embed_in_batches(
    inputs: list[list[int]], *, forward: Forward, pad_id: int, batch_size: int, device: str = "cpu"
) -> list[list[float]]:
    """Vectors for token-id lists, in input order.

    Inputs of similar length share a batch so little work goes to padding; `forward` maps
    (input_ids, attention_mask) to one vector per row.
    """
    out: list[list[float]] = [[] for _ in inputs]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(inputs[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : len(inputs[index])] = torch.tensor(inputs[index])
                mask[row, : len(inputs[index])] = 1
            vectors = forward(ids.to(device), mask.to(device))
            vectors = torch.nn.functional.normalize(vectors.float(), dim=-1).cpu()
            for row, index in enumerate(batch):
                out[index] = vectors[row].tolist()
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real (unmasked) tokens of each row."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
