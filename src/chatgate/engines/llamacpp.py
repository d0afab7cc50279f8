"""The `llama.cpp` engine: a GGUF model on the `llama.cpp` runner (`runners/llamacpp.py`).

Any GGUF file llama.cpp loads is served as it is, quantized or not. The default model's
packaged Q4_1 file is first converted once with llama.cpp's own quantize API (Q4_1 to float32,
then to the format `--dtype` names: bfloat16 by default, the fastest format that passes the
quality gate) and cached beside the float32 conversion. Tokenizing, chat templates and grammars
use the Hugging Face tokenizer read from the same GGUF file (cached once as a folder).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from chatgate.engines.kvbudget import free_memory
from chatgate.engines.loading import ModelSource, gguf_location, model_construction
from chatgate.engines.memory import GIB, MemoryNeed, gguf_elements
from chatgate.engines.scheduled import LoadedModel, ScheduledEngine, kv_budget
from chatgate.settings import EngineSettings
from chatgate.errors import StartupError

log = logging.getLogger(__name__)

# llama.cpp's limit on sequence ids (`llama_max_parallel_sequences`): running rows, prompts
# part-way through prefill and prefix-cache spans share them.
SEQUENCES = 256
# Unset, the KV budget holds this many tokens per running row (and at least one full context):
# llama.cpp allocates its KV cells up front, so the default is sized for the batch, not for
# memory (16,384 tokens, 0.35 GiB, for the default model).
TOKENS_PER_ROW = 512
# llama.cpp's file types for each `--dtype`.
FORMATS = {"float32": "LLAMA_FTYPE_ALL_F32", "bfloat16": "LLAMA_FTYPE_MOSTLY_BF16", "int8": "LLAMA_FTYPE_MOSTLY_Q8_0"}
GGUF_NAMES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}
# Bytes per weight of each conversion (Q8_0: 32 int8 weights and one f16 scale per block).
_WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 34 / 32}


def decode_threads(requested: int) -> int:
    """llama.cpp threads: as asked, else every core but one, which serves HTTP (as on torch).

    ggml's threads meet at a spinning barrier after every operation, hundreds per token: when
    the OS deschedules one of them, the others wait out its time slice. On two shared cores
    under other load, two threads decoded one stream at 4 tok/s where one thread made 31;
    on an idle machine two threads are about 1.3x one (see the README)."""
    return requested or max(1, (os.cpu_count() or 1) - 1)


def cached_gguf(source: ModelSource, cache_dir: Path, dtype: str, *, threads: int) -> Path:
    """The GGUF file to serve: a user's file as it is; the default model's converted once to
    `dtype` (via float32, as `llama-quantize --allow-requantize` would) and cached."""
    from chatgate.engines.runners.llamacpp import quantize
    import llama_cpp

    gguf = gguf_location(source, cache_dir)
    if not source.packaged:
        return gguf
    target = cache_dir / "models" / f"{gguf.stem}-{gguf.stat().st_size}-{GGUF_NAMES[dtype]}.gguf"
    if target.exists():
        return target
    log.info("converting %s to %s in %s (once)", gguf.name, dtype, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as staging:
        f32 = Path(staging) / "f32.gguf"
        quantize(gguf, f32, llama_cpp.LLAMA_FTYPE_ALL_F32, threads=threads)
        if dtype == "float32":
            f32.rename(target)
        else:
            out = Path(staging) / "out.gguf"
            quantize(f32, out, getattr(llama_cpp, FORMATS[dtype]), threads=threads)
            out.rename(target)
    return target


def cached_tokenizer(source: ModelSource, cache_dir: Path) -> Any:
    """The Hugging Face tokenizer of a GGUF file, read from the file once and cached as a folder."""
    from transformers import AutoTokenizer

    gguf = gguf_location(source, cache_dir)
    folder = cache_dir / "models" / f"{gguf.stem}-{gguf.stat().st_size}-tokenizer"
    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    with model_construction():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tokenizer-") as staging:
        tokenizer.save_pretrained(staging)
        try:
            Path(staging).rename(folder)
        except OSError:  # another process cached it first
            pass
    return tokenizer


class LlamaCppEngine(ScheduledEngine):
    """Serves a GGUF model with llama.cpp's kernels under our scheduler."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        if self._source.gguf_file is None:
            raise StartupError(f"the llama.cpp engine serves GGUF files; {settings.model_path!r} is not one")

    def _model_need(self) -> MemoryNeed:
        """The GGUF file served (the default model's at the --dtype it is converted to), and the
        KV cells llama.cpp allocates up front: --kv-cache-gib (unset, a share of what is free
        after loading, so it always fits) and the prefix cache's."""
        gguf = gguf_location(self._source, self._settings.cache_dir)
        if self._source.packaged:
            weights = int(gguf_elements(gguf) * _WEIGHT_BYTES[self._settings.weights("bfloat16")])
        else:
            weights = gguf.stat().st_size
        kv = int(((self._settings.kv_cache_gib or 0.0) + self._settings.prefix_cache_gib) * GIB)
        return MemoryNeed("cpu", weights, kv)

    def _load(self) -> LoadedModel:
        from chatgate.engines.runners.llamacpp import GgufModel, LlamaCppRunner

        threads = decode_threads(self._settings.num_threads)
        # Torch only samples here, a row at a time: small operations that more threads slow
        # down (their spinning took the core from llama.cpp: sampling cost 2.5x the forward
        # passes at 16 rows until this was set).
        torch.set_num_threads(1)
        dtype = self._settings.weights("bfloat16")
        path = cached_gguf(self._source, self._settings.cache_dir, dtype, threads=threads)
        model = GgufModel.load(path)  # first: an architecture llama.cpp does not know is named here
        tokenizer = cached_tokenizer(self._source, self._settings.cache_dir)
        # --max-model-len caps a long training context (Gemma 3's 32,768), and with it the KV cells.
        context = min(model.context_length, self._settings.max_model_len or model.context_length)
        kv_tokens = kv_budget(
            self._settings, context=context, bytes_per_token=model.kv_bytes_per_token,
            free_bytes=free_memory_bytes(),
            ceiling=max(context, self._settings.max_running * TOKENS_PER_ROW),
        )
        # Cells for the prefix cache's spans too, as many as its budget holds, so a step never
        # finds the memory full (spans share cells with the rows they came from while both live).
        prefix_tokens = int(self._settings.prefix_cache_gib * 2**30) // model.kv_bytes_per_token
        runner = LlamaCppRunner(model, kv_tokens=kv_tokens + prefix_tokens, sequences=SEQUENCES, threads=threads)
        log.info("llama.cpp runner: %s, %d threads, %d KV cells", path.name, threads, kv_tokens + prefix_tokens)
        eos = set(model.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        return LoadedModel(
            tokenizer=tokenizer, runner=runner, eos_token_ids=frozenset(eos), context_length=context,
            vocab_size=model.vocab_size, hidden_size=model.hidden_size, kv_tokens=kv_tokens,
        )


def free_memory_bytes() -> int:
    """Bytes of host memory available now."""
    return free_memory(torch.device("cpu"))
