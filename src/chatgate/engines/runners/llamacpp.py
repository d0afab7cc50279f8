"""The `llama.cpp` runner: a GGUF model run by llama.cpp's kernels through llama-cpp-python's
low-level API.

One llama.cpp context holds every row's KV in one unified memory; each row is a sequence id.
A step is one `llama_decode` of one batch: every running row's next token, or the tokens of the
prompts being prefilled, each at its own position, with logits kept only where the scheduler
reads them. Rows never pad: a row costs the tokens it holds. Rows that repeat (the `n` choices
of one prompt) and prefix-cache hits copy sequences inside llama.cpp's memory
(`llama_memory_seq_cp`), which shares the cells instead of copying keys and values; a row
that leaves is removed (`llama_memory_seq_rm`) and its id reused.

The prefix cache keeps spans of a cache sequence: each stored prompt's new blocks are copied
into one sequence id of their own, released a block at a time as the cache evicts them.
Sequence ids are few (llama.cpp allows 256); when none is free the runner asks the prefix
cache to evict (`reclaim`) until one is.

Prompt scoring and embeddings run in a second, smaller context over the same weights, so
they never touch the running batch's memory.

LoRA adapters (GGUF files) apply to a whole llama.cpp context, so a step runs one decode per
adapter among its rows (`gguf_lora.py`).

Only the scheduler's thread calls into a runner; llama.cpp releases the GIL while it computes
(ctypes calls do), so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
import torch

from chatgate.engines.base import TokenLogprob
from chatgate.engines.loading import gguf_architecture
from chatgate.engines.runners.base import Runner
from chatgate.engines.runners.gguf_lora import ContextAdapters, GgufAdapter, read_gguf_adapter
from chatgate.engines.sampling import scored
from chatgate.errors import StartupError

log = logging.getLogger(__name__)

# Tokens one `llama_decode` takes at most (a prefill group is bounded well below this).
BATCH_TOKENS = 2048
# Jobs: tokens per window of a long input, and short inputs embedded per forward pass.
JOB_WINDOW = 256
JOB_ROWS = 16

# llama.cpp's log levels; its warnings are about settings we chose (a unified KV memory larger
# than one training context), so they go to info.
_LEVELS = {2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}


@lc.llama_log_callback  # type: ignore[untyped-decorator, unused-ignore]  # llama-cpp-python's CFUNCTYPE decorator is untyped
def _log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's own log lines, into ours (its load chatter at debug level)."""
    message = text.decode(errors="replace").rstrip()
    if message:
        log.log(_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", message)


_initialized = False


def _init_backend() -> None:
    global _initialized  # llama.cpp's backend is process-wide state, set up once
    if not _initialized:
        lc.llama_log_set(_log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _initialized = True


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file loaded by llama.cpp, and the facts the engine needs about it."""

    handle: Any
    vocab: Any
    vocab_size: int
    hidden_size: int
    context_length: int
    kv_bytes_per_token: int  # f16 keys and values, every layer
    eos_token_ids: frozenset[int]

    def __del__(self) -> None:
        # Every context over the model holds a reference to this object. At interpreter exit the
        # module may be torn down first: the process is ending and frees the memory anyway.
        free = getattr(lc, "llama_model_free", None)
        if free is not None:
            free(self.handle)

    @classmethod
    def load(cls, path: Path) -> GgufModel:
        """Load `path` (weights mapped, not copied)."""
        _init_backend()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        handle = lc.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise StartupError(
                f"llama.cpp could not load {path} (architecture {gguf_architecture(path)!r}); its log above says why"
            )
        vocab = lc.llama_model_get_vocab(handle)
        layers, heads, kv_heads = (lc.llama_model_n_layer(handle), lc.llama_model_n_head(handle),
                                   lc.llama_model_n_head_kv(handle))
        embd = lc.llama_model_n_embd(handle)
        head = _metadata_int(handle, "attention.key_length") or embd // heads  # Gemma's heads are wider than embd/heads
        eos = {lc.llama_vocab_eos(vocab), lc.llama_vocab_eot(vocab)} - {-1}
        return cls(
            handle=handle, vocab=vocab, vocab_size=lc.llama_vocab_n_tokens(vocab), hidden_size=embd,
            context_length=lc.llama_model_n_ctx_train(handle),
            kv_bytes_per_token=2 * layers * kv_heads * head * 2,
            eos_token_ids=frozenset(eos),
        )


def _metadata_int(handle: Any, key: str) -> int | None:
    """An integer of the model's GGUF metadata under its architecture (`gemma3.attention.key_length`)."""
    buffer = ctypes.create_string_buffer(256)
    if lc.llama_model_meta_val_str(handle, b"general.architecture", buffer, len(buffer)) < 0:
        return None
    arch = buffer.value.decode()
    if lc.llama_model_meta_val_str(handle, f"{arch}.{key}".encode(), buffer, len(buffer)) < 0:
        return None
    value = buffer.value.decode()
    return int(value) if value.isdigit() else None


def quantize(source: Path, target: Path, ftype: int, *, threads: int) -> None:
    """Write `source` in format `ftype` to `target`, as `llama-quantize --allow-requantize` does."""
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    _init_backend()
    if lc.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not convert {source} to {target.name}")


def _context(model: GgufModel, *, tokens: int, sequences: int, batch: int, threads: int, embeddings: bool = False) -> Any:
    params = lc.llama_context_default_params()
    params.n_ctx = tokens
    params.n_batch = batch
    params.n_ubatch = min(batch, 512)
    params.n_seq_max = sequences
    params.kv_unified = True  # one pool of cells for every sequence: copies share cells
    # Sliding-window models (Gemma 3) keep every position's KV, not just the window: prefix-cache
    # spans and copied rows may reach back past it. llama.cpp's default today; pinned here.
    params.swa_full = True
    params.n_threads = params.n_threads_batch = threads
    params.embeddings = embeddings
    if embeddings:  # per-token hidden states: the job pools them itself
        params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
    params.no_perf = True
    ctx = lc.llama_init_from_model(model.handle, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {tokens} tokens")
    return ctx


class _Batch:
    """A reusable `llama_batch`: tokens at positions of sequences, logits where asked."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = lc.llama_batch_init(capacity, 0, 1)

    def fill(self, entries: Sequence[tuple[int, int, int, bool]]) -> int:
        """Load `(sequence, position, token, wants logits)` entries; the number of outputs."""
        raw = self.raw
        outputs = 0
        for i, (seq, pos, token, wants) in enumerate(entries):
            raw.token[i] = token
            raw.pos[i] = pos
            raw.n_seq_id[i] = 1
            raw.seq_id[i][0] = seq
            raw.logits[i] = wants
            outputs += wants
        raw.n_tokens = len(entries)
        return outputs

    def free(self) -> None:
        lc.llama_batch_free(self.raw)


def _run(ctx: Any, batch: _Batch, entries: Sequence[tuple[int, int, int, bool]], width: int, *, embeddings: bool = False) -> np.ndarray:
    """Decode `entries` a batch at a time; the rows asked for, `[outputs, width]` (a copy)."""
    parts = []
    for start in range(0, len(entries), batch.capacity):
        outputs = batch.fill(entries[start : start + batch.capacity])
        status = lc.llama_decode(ctx, batch.raw)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}{': no room in the KV cache' if status == 1 else ''})")
        if outputs:
            pointer = lc.llama_get_embeddings(ctx) if embeddings else lc.llama_get_logits(ctx)
            parts.append(np.ctypeslib.as_array(pointer, shape=(outputs, width)).copy())
    if not parts:
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


@dataclass(eq=False)
class _CacheSequence:
    """A sequence id holding prefix-cache spans; freed when its last span is released."""

    seq: int
    spans: int


@dataclass(eq=False)
class LlamaSpan:
    """Positions `start:end` of a cache sequence: a prefix-cache block's KV."""

    owner: _CacheSequence
    start: int
    end: int
    nbytes: int


@dataclass(eq=False)
class LlamaKV:
    """Rows of the runner's context: a sequence id and the tokens it holds, per row."""

    runner: LlamaCppRunner
    seqs: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def held(self) -> list[int]:
        return list(self.lengths)

    def select(self, rows: list[int]) -> None:
        # Drop the rows not kept first (their ids may serve the copies), then copy repeated rows;
        # if no id is left for a copy, the rows kept once stay consistent and the error rises.
        unique = list(dict.fromkeys(rows))
        for row, seq in enumerate(self.seqs):
            if row not in unique:
                self.runner.free_sequence(seq)
        by_row = {row: (self.seqs[row], self.lengths[row]) for row in unique}
        self.seqs = [by_row[row][0] for row in unique]
        self.lengths = [by_row[row][1] for row in unique]
        copies = iter(self.runner.new_sequences(len(rows) - len(unique)))
        seqs, lengths, seen = [], [], set()
        for row in rows:
            seq, length = by_row[row]
            if row in seen:  # a repeated row: a copy sharing the same cells
                seq = next(copies)
                self.runner.copy_range(by_row[row][0], seq, -1, -1)
            seen.add(row)
            seqs.append(seq)
            lengths.append(length)
        self.seqs, self.lengths = seqs, lengths

    def extend(self, other: Any) -> None:
        self.seqs += other.seqs
        self.lengths += other.lengths
        other.seqs, other.lengths = [], []

    def row_spans(self, row: int, ranges: Sequence[tuple[int, int]]) -> list[Any]:
        owner = _CacheSequence(self.runner.new_sequence(), len(ranges))
        spans = []
        for start, end in ranges:
            self.runner.copy_range(self.seqs[row], owner.seq, start, end)
            spans.append(LlamaSpan(owner, start, end, (end - start) * self.runner.model.kv_bytes_per_token))
        return spans


class LlamaCppRunner(Runner):
    """Runs the scheduler's steps in one llama.cpp context of `kv_tokens` cells."""

    padded = False

    def __init__(self, model: GgufModel, *, kv_tokens: int, sequences: int, threads: int) -> None:
        self.model = model
        self._threads = threads
        self._ctx = _context(model, tokens=kv_tokens, sequences=sequences, batch=BATCH_TOKENS, threads=threads)
        self._memory = lc.llama_get_memory(self._ctx)
        self._batch: _Batch | None = _Batch(BATCH_TOKENS)
        self._free = list(range(sequences - 1, -1, -1))
        self._jobs: Any = None  # the scoring/embedding context, made on first use
        self._job_batch: _Batch | None = None
        self._adapters = ContextAdapters(self._ctx)  # LoRA adapters: one decode per adapter in a step

    def __del__(self) -> None:
        # Engines made for one test or one run come and go; their scheduler thread has ended.
        if getattr(lc, "llama_free", None) is not None:  # not at interpreter exit (see GgufModel)
            self.close()

    def close(self) -> None:
        """Free the contexts (the model stays loaded)."""
        for batch in (self._batch, self._job_batch):
            if batch is not None:
                batch.free()
        for ctx in (self._ctx, self._jobs):
            if ctx:
                lc.llama_free(ctx)
        self._ctx = self._jobs = self._batch = self._job_batch = None

    # Sequences ---------------------------------------------------------------------------------

    def new_sequence(self) -> int:
        """A free sequence id (evicting prefix-cache spans if none is)."""
        return self.new_sequences(1)[0]

    def new_sequences(self, count: int) -> list[int]:
        """`count` free sequence ids, or none and an error."""
        while len(self._free) < count:
            if not self.reclaim():
                raise RuntimeError("llama.cpp runner: every sequence id is in use")
        return [self._free.pop() for _ in range(count)]

    def free_sequence(self, seq: int) -> None:
        """Drop every cell of `seq` and give its id back."""
        lc.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free.append(seq)

    def copy_range(self, source: int, target: int, start: int, end: int) -> None:
        """`target` gets `source`'s positions `start:end` (shared cells)."""
        lc.llama_memory_seq_cp(self._memory, source, target, start, end)

    def release(self, span: Any) -> None:
        owner: _CacheSequence = span.owner
        lc.llama_memory_seq_rm(self._memory, owner.seq, span.start, span.end)
        owner.spans -= 1
        if owner.spans == 0:
            self.free_sequence(owner.seq)

    # Steps ---------------------------------------------------------------------------------------

    def _logits(self, entries: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        if self._batch is None:
            raise RuntimeError("llama.cpp runner closed")
        return torch.from_numpy(_run(self._ctx, self._batch, entries, self.model.vocab_size))

    def empty(self) -> LlamaKV:
        return LlamaKV(self)

    def prefill(self, prompts: list[list[int]], *, adapters: list[str | None] | None = None) -> tuple[LlamaKV, torch.Tensor]:
        kv = LlamaKV(self)
        try:
            rows = []
            for prompt in prompts:
                seq = self.new_sequence()
                kv.seqs.append(seq)
                kv.lengths.append(len(prompt))
                last = len(prompt) - 1
                rows.append([(seq, pos, token, pos == last) for pos, token in enumerate(prompt)])
            return kv, self._adapters.run(rows, adapters, self._logits)
        except BaseException:
            kv.select([])
            raise

    def prefill_chunk(self, kv: Any, chunk: list[int], *, adapter: str | None = None) -> tuple[LlamaKV, torch.Tensor]:
        if kv is None:
            kv = LlamaKV(self, [self.new_sequence()], [0])
        seq, start = kv.seqs[0], kv.lengths[0]
        last = len(chunk) - 1
        logits = self._adapters.run([[(seq, start + i, token, i == last) for i, token in enumerate(chunk)]], [adapter], self._logits)
        kv.lengths[0] += len(chunk)
        return kv, logits

    def decode(
        self, kv: Any, tokens: list[int], *, column_limit: int, adapters: list[str | None] | None = None
    ) -> torch.Tensor:
        rows = [[(seq, pos, token, True)] for seq, pos, token in zip(kv.seqs, kv.lengths, tokens, strict=True)]
        logits = self._adapters.run(rows, adapters, self._logits)
        kv.lengths = [length + 1 for length in kv.lengths]
        return logits

    def read_adapter(self, name: str, path: Path) -> GgufAdapter:
        return read_gguf_adapter(self.model.handle, name, path)

    def add_adapter(self, adapter: Any) -> None:
        self._adapters.add(adapter)

    def remove_adapter(self, name: str) -> None:
        self._adapters.remove(name)

    def from_prefix(self, spans: list[Any], *, tokens: int, capacity: int) -> LlamaKV:
        seq = self.new_sequence()
        for span in spans:
            if span.start < tokens:
                self.copy_range(span.owner.seq, seq, span.start, min(span.end, tokens))
        return LlamaKV(self, [seq], [tokens])

    # Jobs ----------------------------------------------------------------------------------------

    def _job_context(self, *, embeddings: bool) -> Any:
        if self._jobs is None:
            self._jobs = _context(self.model, tokens=self.model.context_length, sequences=JOB_ROWS,
                                  batch=JOB_WINDOW * 2, threads=self._threads, embeddings=True)
            self._job_batch = _Batch(JOB_WINDOW * 2)
        lc.llama_set_embeddings(self._jobs, embeddings)
        lc.llama_memory_clear(lc.llama_get_memory(self._jobs), True)
        return self._jobs

    def _windows(self, ids: list[int]) -> Generator[tuple[int, torch.Tensor], None, None]:
        """Logits after every token of `ids`, a window at a time in the job context."""
        ctx = self._job_context(embeddings=False)
        assert self._job_batch is not None
        for start in range(0, len(ids), JOB_WINDOW):
            window = ids[start : start + JOB_WINDOW]
            entries = [(0, start + i, token, True) for i, token in enumerate(window)]
            yield start, torch.from_numpy(_run(ctx, self._job_batch, entries, self.model.vocab_size))

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits after every token of `ids`, `[len(ids), vocab]`, at once (for the quality gate)."""
        return torch.cat([logits for _, logits in self._windows(ids)])

    def score_prompt(self, prompt_ids: list[int], top: int) -> Generator[None, None, list[TokenLogprob | None]]:
        out: list[TokenLogprob | None] = [None]
        for start, logits in self._windows(prompt_ids):
            logprobs = torch.log_softmax(logits, dim=-1)
            following = prompt_ids[start + 1 : start + 1 + JOB_WINDOW]
            out += [scored(logprobs[i], token, top) for i, token in enumerate(following)]
            yield
        return out

    def embed(self, inputs: list[list[int]]) -> Generator[None, None, list[list[float]]]:
        """Mean of the final-norm hidden states (what Hugging Face's `last_hidden_state` holds),
        L2-normalised: short inputs several to a forward pass, a long one window by window."""
        out: list[list[float]] = [[] for _ in inputs]
        for group in _groups(inputs):
            ctx = self._job_context(embeddings=True)
            assert self._job_batch is not None
            sums = np.zeros((len(group), self.model.hidden_size), dtype=np.float64)
            ids = inputs[group[0]]
            if len(group) == 1 and len(ids) > JOB_WINDOW:  # a long input, window by window
                passes = [[(0, start + i, t, True) for i, t in enumerate(ids[start : start + JOB_WINDOW])]
                          for start in range(0, len(ids), JOB_WINDOW)]
            else:
                passes = [[(row, pos, t, True) for row, index in enumerate(group) for pos, t in enumerate(inputs[index])]]
            for entries in passes:
                hidden = _run(ctx, self._job_batch, entries, self.model.hidden_size, embeddings=True)
                np.add.at(sums, np.array([seq for seq, _, _, _ in entries]), hidden)
                yield
            for row, index in enumerate(group):
                mean = sums[row] / max(1, len(inputs[index]))
                norm = math.sqrt(float((mean * mean).sum())) or 1.0
                out[index] = (mean / norm).astype(np.float32).tolist()
        return out


def _groups(inputs: list[list[int]]) -> list[list[int]]:
    """Indices of `inputs` in forward passes: short ones up to `JOB_ROWS` and two windows of
    tokens together, each long one alone."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index, ids in enumerate(inputs):
        if len(ids) > JOB_WINDOW:
            groups.append([index])
            continue
        if current and (len(current) >= JOB_ROWS or tokens + len(ids) > 2 * JOB_WINDOW):
            groups.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += len(ids)
    if current:
        groups.append(current)
    return groups
