"""Our own engine: the scheduler (`scheduler.py`) over a runner (`runners/`), bridged to asyncio.

A `Scheduler` in its own thread decides every step and has the runner execute it; this module
starts that thread, tokenizes, compiles constraints, and hands each sequence's outputs back to
its asyncio caller. Prompt scoring and embeddings for the chat model run in the same thread, a
chunk at a time between steps, so the runner is never used from two threads at once and
running streams never wait for a whole job. Subclasses load a model into a runner:
`TransformersEngine` (torch) and `LlamaCppEngine` (llama.cpp).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import gc
import logging
import threading
import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence as Seq
from dataclasses import dataclass
from typing import Any, TypeVar

from chatgate.engines.adapters import ServedAdapters
from chatgate.engines.lora import AdapterError
from chatgate.engines.base import (
    Engine,
    EngineStats,
    GenerationOutput,
    ModelInfo,
    Phases,
    SamplingParams,
    TokenLogprob,
)
from chatgate.engines.chat_tokens import ChatTokenizer, ChatTokensEngine
from chatgate.engines.constraints import ConstraintCompiler
from chatgate.engines.kvbudget import kv_token_budget
from chatgate.engines.loading import resolve_chat_model
from chatgate.engines.memory import MemoryNeed, adapter_bytes
from chatgate.engines.lora import AdapterError, LoraSpec
from chatgate.engines.reasoning import GatedGrammar
from chatgate.engines.runners.base import Runner
from chatgate.engines.scheduler import Scheduler, SchedulerLimits
from chatgate.engines.sequence import OutputChannel, Sequence
from chatgate.settings import EngineSettings
from chatgate.streams import closing
from chatgate.errors import StartupError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Fewer KV tokens than this cannot hold a chat template and a short answer.
MIN_KV_TOKENS = 64


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """What a subclass's `_load` hands the engine."""

    tokenizer: Any  # a Hugging Face fast tokenizer for the model's vocabulary
    runner: Runner
    eos_token_ids: frozenset[int]
    context_length: int
    vocab_size: int
    hidden_size: int
    kv_tokens: int  # KV the running batch may hold (see `kv_budget`)


def kv_budget(settings: EngineSettings, *, context: int, bytes_per_token: int, free_bytes: int, ceiling: int) -> int:
    """Tokens of KV the running batch may hold (`kvbudget.py`), checked and logged."""
    tokens = kv_token_budget(
        gib=settings.kv_cache_gib, bytes_per_token=bytes_per_token, free_bytes=free_bytes, ceiling=ceiling
    )
    if tokens < MIN_KV_TOKENS:
        raise StartupError(f"the KV cache budget holds {tokens} tokens, fewer than {MIN_KV_TOKENS}; raise --kv-cache-gib")
    if tokens < context:
        log.warning("KV cache budget of %d tokens is below the model's context of %d: longer requests are refused", tokens, context)
    log.info("KV cache budget: %d tokens (%.2f GiB)", tokens, tokens * bytes_per_token / 2**30)
    return tokens


def _phases(seq: Sequence, queued: int) -> Phases:
    """When `seq` waited, prefilled and decoded (its fields are written by the engine thread
    before the last output is posted)."""
    return Phases(
        queued=queued,
        admitted=seq.admitted_ns or None,
        first_token=seq.first_token_ns or None,
        finished=time.time_ns(),
        preemptions=seq.preemptions,
    )


class ScheduledEngine(ChatTokensEngine, Engine):
    """Serves a causal LM with continuous batching over the runner `_load` builds."""

    def __init__(self, settings: EngineSettings) -> None:
        self._settings = settings
        self._source = resolve_chat_model(settings.model_path)
        self._scheduler: Scheduler | None = None
        self._thread: threading.Thread | None = None
        self._loaded: LoadedModel | None = None
        self._tokenizer: Any = None
        self._chat_tokens: ChatTokenizer
        self._eos: frozenset[int] = frozenset()
        self._constraints: ConstraintCompiler | None = None
        self._adapters: ServedAdapters | None = None
        self.info = ModelInfo(name=self._source.name, context_length=0, vocab_size=0)

    @abc.abstractmethod
    def _load(self) -> LoadedModel:
        """Load the model (in a worker thread, once)."""

    def _model_need(self) -> MemoryNeed | None:
        """What the model's own load takes (`memory_need`); None: not estimated."""
        return None

    def memory_need(self) -> MemoryNeed | None:
        """The model's need, plus the LoRA adapters it serves (they are read again with it)."""
        need = self._model_need()
        if need is None or self._adapters is None:
            return need
        paths = [self._adapters.path(name) for name in self._adapters.names()]
        adapters = sum(adapter_bytes(path) or 0 for path in paths if path is not None)
        return MemoryNeed(need.device, need.weights + adapters, need.kv)

    async def start(self) -> None:
        if self._loaded is None:
            await asyncio.to_thread(self._load_once)
        if self._thread is None:
            assert self._loaded is not None
            self._scheduler = Scheduler(
                runner=self._loaded.runner,
                limits=SchedulerLimits(
                    max_running=self._settings.max_running,
                    prefix_cache_bytes=int(self._settings.prefix_cache_gib * 2**30),
                    kv_tokens=self._loaded.kv_tokens,
                ),
                policy=self._settings.scheduling_policy,
            )
            self._thread = threading.Thread(target=self._scheduler.run, name="chatgate-engine", daemon=True)
            self._thread.start()
        assert self._loaded is not None
        if self._adapters is None:
            await self._serve_lora_flags()
        elif self._adapters.runner is None:  # loaded again after `unload`
            await self._adapters.attach(self._loaded.runner)

    async def unload(self) -> None:
        """Stop, and free the model's weights and KV (its tokenizer stays); `start` loads it again,
        with the adapters it served."""
        await self.close()
        self._loaded = None
        if self._adapters is not None:
            self._adapters.detach()
        self._release()
        await asyncio.to_thread(gc.collect)  # weights held in reference cycles go now, not at some later collection

    def _release(self) -> None:
        """Drop whatever else a subclass holds of the model (`unload`)."""

    async def _serve_lora_flags(self) -> None:
        """Load every `--lora name=PATH`; one that cannot be served stops the start, named."""
        assert self._loaded is not None
        self._adapters = ServedAdapters(self._loaded.runner, base=self._source.name)
        for text in self._settings.lora:
            spec = LoraSpec.parse(text)
            try:
                await self._adapters.load(spec.name, spec.path)
            except AdapterError as exc:
                raise AdapterError(f"--lora {text}: {exc.message}", param="--lora") from None

    # LoRA adapters ---------------------------------------------------------------------------

    def lora_names(self) -> list[str]:
        return self._adapters.names() if self._adapters is not None else []

    async def load_lora(self, name: str, path: str) -> None:
        if self._adapters is None:
            raise RuntimeError("engine not started")
        try:
            where = Path(path).expanduser()
        except RuntimeError:  # `~someone` of a user this machine does not have
            raise AdapterError(f"LoRA adapter {name!r}: {path!r} names no home directory here.", param="lora_path") from None
        await self._adapters.load(name, where)

    async def unload_lora(self, name: str) -> None:
        if self._adapters is None:
            raise RuntimeError("engine not started")
        await self._adapters.unload(name)

    async def close(self) -> None:
        if self._thread is not None and self._scheduler is not None:
            self._scheduler.inbox.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = self._scheduler = None

    def _load_once(self) -> None:
        loaded = self._load()
        self._tokenizer = loaded.tokenizer
        self._chat_tokens = ChatTokenizer(loaded.tokenizer)
        self._eos = loaded.eos_token_ids
        self._constraints = ConstraintCompiler(loaded.tokenizer, loaded.vocab_size)
        self.info = ModelInfo(
            name=self._source.name,
            # A sequence longer than the KV budget could never be admitted: refuse it as too long.
            context_length=min(loaded.context_length, loaded.kv_tokens),
            vocab_size=loaded.vocab_size,
            embedding_dim=loaded.hidden_size,
            tools_in_template=self._chat_tokens.tools_in_template,
            scheduling_policy=self._settings.scheduling_policy,
        )
        self._loaded = loaded

    # Tokenizer ---------------------------------------------------------------------------

    def token_strings(self, token_ids: Seq[int]) -> list[str]:
        return [str(t) for t in self._tokenizer.convert_ids_to_tokens(list(token_ids))]

    def pending(self) -> int:
        return self._scheduler.pending() if self._scheduler is not None else 0

    def stats(self) -> EngineStats | None:
        if self._scheduler is None or self._loaded is None:
            return None
        prefix = self._scheduler.prefix_stats
        return EngineStats(
            prefill_tokens=self._scheduler.prefill_tokens,
            prefix_cache_hits=prefix.hits,
            prefix_cache_reused_tokens=prefix.reused_tokens,
            prefix_cache_bytes=prefix.bytes,
            kv_cache_budget_tokens=self._loaded.kv_tokens,
            kv_cache_used_tokens=self._scheduler.kv_used,
            preemptions=self._scheduler.preemptions,
            running_sequences=self._scheduler.running,
        )

    def compile_constraint(self, spec: dict[str, Any]) -> Any:
        if self._constraints is None:
            raise RuntimeError("engine not started")
        after = spec.get("after")  # the answer begins after this text: thinking is not bound
        grammar = self._constraints.compile({k: v for k, v in spec.items() if k != "after"})
        if not isinstance(after, str):
            return grammar
        spelled = self._constraints.vocabulary.bytes
        return GatedGrammar(grammar, after, lambda token: spelled[token] if 0 <= token < len(spelled) else b"")

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a turn."""
        return sorted(self._eos)

    # Generation --------------------------------------------------------------------------

    def _submit(self, item: Sequence | Iterator[None]) -> None:
        if self._scheduler is None:
            raise RuntimeError("engine not started")
        self._scheduler.inbox.put(item)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        if params.lora is None:
            async with closing(self._generate(prompt_ids, params)) as outputs:
                async for output in outputs:
                    yield output
            return
        if self._adapters is None:
            raise RuntimeError("engine not started")
        with self._adapters.using(params.lora):  # an unload of it waits for this request
            async with closing(self._generate(prompt_ids, params)) as outputs:
                async for output in outputs:
                    yield output

    async def _generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationOutput]:
        channel = OutputChannel(asyncio.get_running_loop())
        constraint = params.constraint.start() if params.constraint is not None else None
        seq = Sequence(prompt_ids=prompt_ids, params=params, decode=self.decode, eos_token_ids=self._eos,
                       channel=channel, constraint=constraint)
        queued = time.time_ns()
        self._submit(seq)
        try:
            while True:
                output = await channel.get()
                if output.finish_reason is not None:
                    yield dataclasses.replace(output, phases=_phases(seq, queued))
                    return
                yield output
        finally:
            channel.cancelled = True  # the scheduler drops it before its next step

    # Background jobs ------------------------------------------------------------------------

    def _runner(self) -> Runner:
        if self._loaded is None:
            raise RuntimeError("engine not started")
        return self._loaded.runner

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob | None]:
        runner = self._runner()
        return await self._in_scheduler(lambda: runner.score_prompt(prompt_ids, top))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        runner = self._runner()
        return await self._in_scheduler(lambda: runner.embed(inputs))

    async def _in_scheduler(self, work: Callable[[], Generator[None, None, T]]) -> T:
        """Run `work` in the scheduler thread a chunk at a time, between decode steps; the
        runner is never shared, and a caller that goes away stops it at the next chunk."""
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
                    steps.close()
                    return
            except Exception as exc:  # reported to the caller; the scheduler keeps running
                log.exception("engine job failed")
                result = exc
            loop.call_soon_threadsafe(deliver, result)

        self._submit(job())
        return await future
