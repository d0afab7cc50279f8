"""LoRA adapters on the llama.cpp runner: GGUF adapter files, one active per decode.

llama.cpp applies adapters to a whole context (`llama_set_adapters_lora`), not per sequence.
So rows of different adapters cannot share one `llama_decode`: a step is split into one decode
per adapter among its rows (the base model's rows are one more group), each run with that
adapter set. Every row still gets exactly its own adapter's logits and KV; the cost is one
decode per distinct adapter in the step instead of one in all. A PEFT adapter is converted to
GGUF with llama.cpp's own `convert_lora_to_gguf.py` (see the README).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as lc
import torch

from chatgate.engines.lora import AdapterError

Entry = tuple[int, int, int, bool]  # (sequence, position, token, logits wanted)


class GgufAdapter:
    """One adapter loaded by llama.cpp for one model."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self.handle = handle


def read_gguf_adapter(model_handle: Any, name: str, path: Path) -> GgufAdapter:
    """Load the GGUF LoRA adapter at `path` for the model; llama.cpp checks every tensor's shape."""
    if (path / "adapter_config.json").is_file():
        raise AdapterError(
            f"LoRA adapter {name!r}: {str(path)!r} is a PEFT adapter folder; the llama.cpp engine takes GGUF "
            "adapters (convert it with llama.cpp's convert_lora_to_gguf.py) and the transformers engine "
            "(--engine transformers) takes the folder as it is"
        )
    if not path.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {str(path)!r} is not a file (the llama.cpp engine takes a GGUF LoRA adapter)")
    if path.suffix != ".gguf":
        raise AdapterError(
            f"LoRA adapter {name!r}: {str(path)!r} is not a .gguf file; convert a PEFT adapter with "
            "llama.cpp's convert_lora_to_gguf.py"
        )
    handle = lc.llama_adapter_lora_init(model_handle, str(path).encode())
    if not handle:
        raise AdapterError(
            f"LoRA adapter {name!r}: llama.cpp could not load {str(path)!r} for this model: not a GGUF LoRA "
            "adapter, or one made for another base model (its tensors do not match this model's)"
        )
    return GgufAdapter(name, handle)


class ContextAdapters:
    """The adapters a llama.cpp context may run with, and which one is set on it now."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._adapters: dict[str, GgufAdapter] = {}
        self._active: str | None = None

    def add(self, adapter: GgufAdapter) -> None:
        """Make `adapter` available to rows that name it."""
        self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> None:
        """Forget adapter `name` and free it (no row names it any more)."""
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            return
        if self._active == name:
            self._set(None)
        lc.llama_adapter_lora_free(adapter.handle)

    def _set(self, name: str | None) -> None:
        if name == self._active:
            return
        if name is None:
            status = lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (lc.llama_adapter_lora_p_ctypes * 1)(self._adapters[name].handle)
            scales = (ctypes.c_float * 1)(1.0)
            status = lc.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if status != 0:
            raise RuntimeError(f"llama.cpp could not set LoRA adapter {name!r} ({status})")
        self._active = name

    def run(
        self, rows: Sequence[list[Entry]], adapters: Sequence[str | None] | None, logits: Callable[[list[Entry]], torch.Tensor]
    ) -> torch.Tensor:
        """Each row's logits (one per row: each row's entries ask for one), one decode per
        adapter among the rows."""
        # An adapter removed while this step was planned served a request that has ended (an
        # unload waits for every running one): its row runs as the base model, unread.
        names = [n if n in self._adapters else None for n in adapters] if adapters is not None else [None] * len(rows)
        groups: dict[str | None, list[int]] = {}
        for index, name in enumerate(names):
            groups.setdefault(name, []).append(index)
        if len(groups) == 1:
            self._set(names[0] if names else None)
            return logits([entry for row in rows for entry in row])
        out: torch.Tensor | None = None
        for name, members in groups.items():
            self._set(name)
            part = logits([entry for index in members for entry in rows[index]])
            if out is None:
                out = part.new_empty((len(rows), part.shape[1]))
            out[members] = part
        assert out is not None
        return out
