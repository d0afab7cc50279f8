"""The `transformers` engine: a Hugging Face causal LM served with continuous batching.

A `Scheduler` in its own thread owns the model (see `scheduler.py`); this module loads the
model, tokenizes, and bridges the scheduler's thread to asyncio callers. Embedding and
prompt-scoring requests for the chat model run in the same thread, a chunk at a time between
steps, so the model is never used from two threads at once and running streams never wait for
a whole job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

import torch

from chatgate.engines import chunked
from chatgate.engines.base import Engine, EngineStats, GenerationOutput, ModelInfo, SamplingParams, TokenLogprob
from chatgate.engines.chat_tokens import ChatTokenizer, ChatTokensEngine
from chatgate.engines.constraints import ConstraintCompiler
from chatgate.engines.decoder import FastDecoder
from chatgate.engines.kernels import use_skinny_linears
from chatgate.engines.kvbudget import free_memory, kv_bytes_per_token, kv_token_budget, unmap_freed_buffers
from chatgate.engines.loading import cached_checkpoint, model_construction, resolve_chat_model
from chatgate.engines.sampling import make_generator
from chatgate.engines.scheduler import Scheduler, SchedulerLimits, Slot
from chatgate.engines.sequence import OutputChannel, SequenceState
from chatgate.settings import EngineSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Fewer KV tokens than this cannot hold a chat template and a short answer.
_MIN_KV_TOKENS = 64


def engine_threads(requested: int) -> int:
    """Torch threads for the model: as asked, else every core but one.

    The spare core runs the HTTP server, tokenizer and detokenizer. It also keeps OpenMP from
    collapsing when the machine is busy: with as many threads as cores, a step waits at every
    barrier for a thread the OS has descheduled (measured 3.5x slower at 1 row and 8x at 16
    rows than one thread, on two cores under other load).
    """
    return requested or max(1, (os.cpu_count() or 1) - 1)


class TransformersEngine(ChatTokensEngine, Engine):
    """Serves a causal LM with `transformers` on PyTorch."""

    def __init__(self, settings: EngineSettings) -> None:
        self._settings = settings
        self._source = resolve_chat_model(settings.model_path)
        self._scheduler: Scheduler | None = None
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._runner: Any = None  # what the scheduler calls: a FastDecoder, or the model itself
        self._tokenizer: Any = None
        self._chat_tokens: ChatTokenizer
        self._eos: frozenset[int] = frozenset()
        self._constraints: ConstraintCompiler | None = None
        self._kv_tokens = 0  # set when the model loads, before the scheduler starts
        self.info = ModelInfo(
            name=self._source.name, context_length=0, vocab_size=0
        )

    async def start(self) -> None:
        if self._model is None:
            await asyncio.to_thread(self._load)
        if self._thread is None:
            pad = self._tokenizer.pad_token_id
            self._scheduler = Scheduler(
                model=self._runner,
                limits=SchedulerLimits(
                    max_running=self._settings.max_running,
                    prefix_cache_bytes=int(self._settings.prefix_cache_gib * 2**30),
                    kv_tokens=self._kv_tokens,
                ),
                pad_token_id=int(pad if pad is not None else 0),
            )
            self._thread = threading.Thread(
                target=self._scheduler.run, name="chatgate-engine", daemon=True
            )
            self._thread.start()

    async def close(self) -> None:
        if self._thread is not None and self._scheduler is not None:
            self._scheduler.inbox.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = self._scheduler = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(engine_threads(self._settings.num_threads))
        unmap_freed_buffers()
        path = cached_checkpoint(self._source, self._settings.cache_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._chat_tokens = ChatTokenizer(self._tokenizer)
        with model_construction():  # float32: `_decoder` derives the --dtype weights it multiplies by
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self._model = model.to(self._settings.device).eval()  # type: ignore[arg-type]  # transformers wraps `to` in a decorator whose stub takes the model, not a device
        self._runner = self._decoder()
        config = self._model.config
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos = frozenset(eos_ids)
        self._constraints = ConstraintCompiler(self._tokenizer, int(config.vocab_size))
        context = int(getattr(config, "max_position_embeddings", 2048))
        self._kv_tokens = self._kv_budget(context)
        self.info = ModelInfo(
            name=self._source.name,
            # A sequence longer than the KV budget could never be admitted: refuse it as too long.
            context_length=min(context, self._kv_tokens),
            vocab_size=int(config.vocab_size),
            embedding_dim=int(config.hidden_size),
            tools_in_template=self._chat_tokens.tools_in_template,
        )

    def _kv_budget(self, context: int) -> int:
        """Tokens of KV the running batch may hold (`kvbudget.py`)."""
        per_token = kv_bytes_per_token(self._model.config, self._model.dtype)
        tokens = kv_token_budget(
            gib=self._settings.kv_cache_gib, bytes_per_token=per_token,
            free_bytes=free_memory(self._model.device), ceiling=self._settings.max_running * context,
        )
        if tokens < _MIN_KV_TOKENS:
            raise ValueError(f"the KV cache budget holds {tokens} tokens, fewer than {_MIN_KV_TOKENS}; raise --kv-cache-gib")
        if tokens < context:
            log.warning("KV cache budget of %d tokens is below the model's context of %d: longer requests are refused", tokens, context)
        log.info("KV cache budget: %d tokens (%.2f GiB)", tokens, tokens * per_token / 2**30)
        return tokens

    def _decoder(self) -> Any:
        """The fast forward where the model has one; else Hugging Face's, with skinny linears on CPU.

        The fast forward keeps activations and the KV cache in float32 whatever `--dtype` says;
        Hugging Face's runs wholly in bfloat16 when asked for it."""
        if FastDecoder.supports(self._model):
            return FastDecoder(self._model, weight_format=self._settings.dtype)
        if self._settings.dtype == "int8":
            raise ValueError(f"--dtype int8 needs a Llama-family model, not {type(self._model).__name__}")
        log.info("%s has no fast decoder; using the Hugging Face forward", type(self._model).__name__)
        if self._settings.dtype == "bfloat16":
            self._model = self._model.to(torch.bfloat16)
        if self._settings.device == "cpu":
            use_skinny_linears(self._model)
        return self._model

    # Tokenizer ---------------------------------------------------------------------------

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [str(t) for t in self._tokenizer.convert_ids_to_tokens(list(token_ids))]

    def pending(self) -> int:
        return self._scheduler.pending() if self._scheduler is not None else 0

    def stats(self) -> EngineStats | None:
        if self._scheduler is None:
            return None
        prefix = self._scheduler.prefix_stats
        return EngineStats(
            prefill_tokens=self._scheduler.prefill_tokens,
            prefix_cache_hits=prefix.hits,
            prefix_cache_reused_tokens=prefix.reused_tokens,
            prefix_cache_bytes=prefix.bytes,
            kv_cache_budget_tokens=self._kv_tokens,
            kv_cache_used_tokens=self._scheduler.kv_used,
            preemptions=self._scheduler.preemptions,
            running_sequences=self._scheduler.running,
        )

    def compile_constraint(self, spec: dict[str, Any]) -> Any:
        if self._constraints is None:
            raise RuntimeError("engine not started")
        return self._constraints.compile(spec)

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a turn."""
        return sorted(self._eos)

    # Generation --------------------------------------------------------------------------

    def _submit(self, item: Slot | Any) -> None:
        if self._scheduler is None:
            raise RuntimeError("engine not started")
        self._scheduler.inbox.put(item)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        channel = OutputChannel(asyncio.get_running_loop())
        state = SequenceState(
            prompt_ids=prompt_ids, params=params, decode=self.decode, eos_token_ids=self._eos
        )
        constraint = (
            params.constraint.start() if params.constraint is not None else None
        )
        self._submit(
            Slot(
                state=state,
                channel=channel,
                generator=make_generator(params.seed),
                constraint=constraint,
            )
        )
        try:
            while True:
                output = await channel.get()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            channel.cancelled = True  # the scheduler drops it before its next step

    # Background jobs ------------------------------------------------------------------------

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
        return await self._in_scheduler(lambda: chunked.score_prompt(self._model, prompt_ids, top))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        pad = self._tokenizer.pad_token_id
        pad_id = int(pad if pad is not None else 0)
        return await self._in_scheduler(
            lambda: chunked.embed(self._model, inputs, pad_id=pad_id, device=self._settings.device)
        )

    async def _in_scheduler(self, work: Callable[[], Generator[None, None, T]]) -> T:
        """Run `work` in the scheduler thread a chunk at a time, between decode steps; the
        model is never shared, and a caller that goes away stops it at the next chunk."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def deliver(result: T | BaseException) -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        def job() -> Iterator[None]:
            result: T | BaseException
            try:
                steps = work()
                while not future.done():  # done early only if the caller was cancelled
                    try:
                        next(steps)
                    except StopIteration as finished:
                        result = finished.value
                        break
                    yield
                else:
                    return
            except Exception as exc:  # reported to the caller; the scheduler keeps running
                log.exception("engine job failed")
                result = exc
            loop.call_soon_threadsafe(deliver, result)

        self._submit(job())
        return await future
