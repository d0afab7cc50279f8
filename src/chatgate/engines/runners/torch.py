"""The `torch` runner: our Llama forward (`decoder.py`) or a Hugging Face model's, over padded rows.

Rows of a batch share one set of KV buffers aligned on the right (`kvcache.BatchKV`), so a row
costs the longest row's length. Prompts prefilled together are left-padded into one forward pass.
Prompt scoring and embeddings run the Hugging Face model a window at a time (`chunked.py`).
LoRA adapters (`lora.py`) run only on our Llama forward, per row.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from chatgate.engines import chunked
from chatgate.engines.base import TokenLogprob
from chatgate.engines.decoder import FastDecoder
from chatgate.engines.kvcache import BatchKV
from chatgate.engines.lora import AdapterError, LoraAdapter, read_peft
from chatgate.engines.runners.base import Runner


class TorchRunner(Runner):
    """Forward passes of `forward` (a `FastDecoder` or the model itself) over `BatchKV` caches;
    `model` (the Hugging Face model, default `forward`) scores prompts and embeds."""

    padded = True

    def __init__(self, forward: Any, *, pad_token_id: int, model: Any = None, device: str = "cpu") -> None:
        self._forward_module = forward
        self._model = model if model is not None else forward
        self._pad = pad_token_id
        self._device = device
        self._layers = int(forward.config.num_hidden_layers)

    def empty(self) -> BatchKV:
        return BatchKV(self._layers)

    def read_adapter(self, name: str, path: Path) -> LoraAdapter:
        if not isinstance(self._forward_module, FastDecoder):
            raise AdapterError(
                f"LoRA adapter {name!r}: adapters are served on Llama-family models only "
                f"(this one, {type(self._model).__name__}, runs the Hugging Face forward)"
            )
        with torch.inference_mode():
            return read_peft(name, path, self._model)

    def add_adapter(self, adapter: Any) -> None:
        assert isinstance(self._forward_module, FastDecoder)
        self._forward_module.add_adapter(adapter)

    def remove_adapter(self, name: str) -> None:
        if isinstance(self._forward_module, FastDecoder):
            self._forward_module.remove_adapter(name)

    def _forward(self, kv: BatchKV, ids: torch.Tensor, adapters: list[str | None] | None = None) -> torch.Tensor:
        width = ids.shape[1]
        device = self._forward_module.device
        # Only our decoder takes `lora`; the Hugging Face forward is never handed an adapter.
        extra = {"lora": adapters} if adapters is not None and any(adapters) else {}
        out = self._forward_module(
            input_ids=ids.to(device),
            attention_mask=kv.attention_mask(width).to(device),
            position_ids=kv.positions(width).to(device),
            past_key_values=kv.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        logits: torch.Tensor = out.logits[:, -1].float().cpu()
        return logits

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], *, adapters: list[str | None] | None = None) -> tuple[BatchKV, torch.Tensor]:
        width = max(len(p) for p in prompts)
        kv = BatchKV(self._layers)
        kv.pads = [width - len(p) for p in prompts]
        ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
        return kv, self._forward(kv, ids, adapters)

    @torch.inference_mode()
    def prefill_chunk(self, kv: Any, chunk: list[int], *, adapter: str | None = None) -> tuple[BatchKV, torch.Tensor]:
        if kv is None:
            kv = BatchKV(self._layers)
            kv.pads = [0]
        return kv, self._forward(kv, torch.tensor([chunk]), [adapter])

    @torch.inference_mode()
    def decode(
        self, kv: Any, tokens: list[int], *, column_limit: int, adapters: list[str | None] | None = None
    ) -> torch.Tensor:
        kv.limit_columns(column_limit)
        return self._forward(kv, torch.tensor([[token] for token in tokens]), adapters)

    def from_prefix(self, spans: list[Any], *, tokens: int, capacity: int) -> BatchKV:
        return BatchKV.from_prefix(spans, tokens=tokens, capacity=capacity)

    def score_prompt(self, prompt_ids: list[int], top: int) -> Generator[None, None, list[TokenLogprob | None]]:
        return chunked.score_prompt(self._model, prompt_ids, top)

    def embed(self, inputs: list[list[int]]) -> Generator[None, None, list[list[float]]]:
        return chunked.embed(self._model, inputs, pad_id=self._pad, device=self._device)
