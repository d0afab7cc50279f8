"""How many tokens of KV cache the running batch may hold, from a memory setting and the model's shape.

The scheduler admits a sequence only while every admitted sequence's bound (prompt plus
`max_tokens`) fits this budget, so a burst of long requests queues instead of exhausting memory.
The budget is in tokens; memory is what users know, so it is set in GiB (`--kv-cache-gib`) and
converted with the model's KV bytes per token. Unset, it is a share of the memory free on the
model's device once the model is loaded, but never more than `--max-running` full contexts.
"""

from __future__ import annotations

from typing import Any

import psutil
import torch

# Unset, the KV cache may take this share of the memory free after loading: the rest is left for
# the prefix cache, activations, the tokenizer and whatever else shares the machine.
DEFAULT_SHARE = 0.25


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take, over every layer."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * element


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: the GPU's own memory, else the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def kv_token_budget(*, gib: float | None, bytes_per_token: int, free_bytes: int, ceiling: int) -> int:
    """Tokens of KV the batch may hold: `gib` as given, else `DEFAULT_SHARE` of `free_bytes`
    capped at `ceiling` (what the batch could ever use)."""
    if gib is not None:
        return int(gib * 2**30) // bytes_per_token
    return min(ceiling, int(free_bytes * DEFAULT_SHARE) // bytes_per_token)
