"""How many tokens of KV cache the running batch may hold, from a memory setting and the model's shape.

The scheduler admits a sequence only while the batch with it fits this budget, and preempts the
latest admitted when the batch outgrows it (`scheduler.py`), so a burst of long requests queues
instead of exhausting memory.
The budget is in tokens; memory is what users know, so it is set in GiB (`--kv-cache-gib`) and
converted with the model's KV bytes per token. Unset, it is a share of the memory free on the
model's device once the model is loaded, but never more than `--max-running` full contexts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Any

import psutil
import torch

# glibc's mallopt parameter for the size above which allocations are mmapped.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20

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


def unmap_freed_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc mmap every host allocation of `threshold` bytes or more, so freeing one returns
    its memory to the OS at once; True if it took effect.

    The batch cache reallocates its per-layer buffers (megabytes each) whenever rows join or
    leave. glibc raises its mmap threshold each time such a buffer is freed, after which the
    next ones come from the heap, where buffers of ever-changing sizes leave holes that stay
    resident: measured, 16 streams under a 1 GiB budget peaked 2.1 GiB above the idle worker,
    and 1.1 GiB with a fixed threshold. Other C libraries, and device memory, are left alone.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
