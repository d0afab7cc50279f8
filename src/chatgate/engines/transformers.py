"""The `transformers` engine: a Hugging Face causal LM on the `torch` runner.

Loads the model (a Hugging Face folder, or a GGUF file converted once to float32 safetensors),
picks its forward (`FastDecoder` where the model is Llama-shaped, else Hugging Face's) and hands
both to the scheduler through a `TorchRunner` (`runners/torch.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from chatgate.engines.decoder import FastDecoder
from chatgate.engines.kernels import use_skinny_linears
from chatgate.engines.kvbudget import free_memory, kv_bytes_per_token, unmap_freed_buffers
from chatgate.engines.loading import cached_checkpoint, float32_folder, gguf_location, model_construction
from chatgate.engines.memory import MemoryNeed, checkpoint_bytes, gguf_elements
from chatgate.engines.runners.torch import TorchRunner
from chatgate.engines.scheduled import LoadedModel, ScheduledEngine, kv_budget
from chatgate.errors import StartupError

log = logging.getLogger(__name__)


def engine_threads(requested: int) -> int:
    """Torch threads for the model: as asked, else every core but one.

    The spare core runs the HTTP server, tokenizer and detokenizer. It also keeps OpenMP from
    collapsing when the machine is busy: with as many threads as cores, a step waits at every
    barrier for a thread the OS has descheduled (measured 3.5x slower at 1 row and 8x at 16
    rows than one thread, on two cores under other load).
    """
    return requested or max(1, (os.cpu_count() or 1) - 1)


class TransformersEngine(ScheduledEngine):
    """Serves a causal LM with `transformers` on PyTorch (the `torch` runner)."""

    _model: Any = None

    def _model_need(self) -> MemoryNeed:
        """The weights in float32 (the torch runner builds every model so); its KV cache grows
        with the batch, so none is reserved up front."""
        if self._source.gguf_file is None:
            weights = checkpoint_bytes(self._source.path, float32=True)
        else:
            gguf = gguf_location(self._source, self._settings.cache_dir)
            folder = float32_folder(gguf, self._settings.cache_dir)
            weights = checkpoint_bytes(folder) if (folder / "config.json").exists() else gguf_elements(gguf) * 4
        return MemoryNeed(self._settings.device, weights)

    def _load(self) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(engine_threads(self._settings.num_threads))
        unmap_freed_buffers()
        path = cached_checkpoint(self._source, self._settings.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        with model_construction():  # float32: `_decoder` derives the --dtype weights it multiplies by
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self._model = model.to(self._settings.device).eval()
        forward = self._decoder()
        config = self._model.config
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        trained = int(getattr(config, "max_position_embeddings", 2048))
        context = min(trained, self._settings.max_model_len or trained)
        pad = tokenizer.pad_token_id
        return LoadedModel(
            tokenizer=tokenizer,
            runner=TorchRunner(
                forward, model=self._model, pad_token_id=int(pad if pad is not None else 0), device=self._settings.device
            ),
            eos_token_ids=frozenset(eos_ids),
            context_length=context,
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            kv_tokens=kv_budget(
                self._settings, context=context, bytes_per_token=kv_bytes_per_token(config, self._model.dtype),
                free_bytes=free_memory(self._model.device), ceiling=self._settings.max_running * context,
            ),
        )

    def _release(self) -> None:
        self._model = None  # the Hugging Face model: scoring, embedding and the decoder's weights

    def _decoder(self) -> Any:
        """The fast forward where the model has one; else Hugging Face's, with skinny linears on CPU.

        The fast forward keeps activations and the KV cache in float32 whatever `--dtype` says;
        Hugging Face's runs wholly in bfloat16 when asked for it."""
        weights = self._settings.weights("float32")
        if FastDecoder.supports(self._model):
            return FastDecoder(self._model, weight_format=weights)
        if weights == "int8":
            raise StartupError(f"--dtype int8 needs a Llama-family model, not {type(self._model).__name__}")
        log.info("%s has no fast decoder; using the Hugging Face forward", type(self._model).__name__)
        if weights == "bfloat16":
            self._model = self._model.to(torch.bfloat16)
        if self._settings.device == "cpu":
            use_skinny_linears(self._model)
        return self._model
