"""The `transformers` engine: a Hugging Face causal LM driven by one scheduler thread.

The scheduler thread owns the model. Requests join its run list at any step and leave it when
they finish or their consumer goes away; each step advances every running sequence by one
prompt chunk (prefill) or one token (decode), so a long prompt never stalls running streams for
long. Each sequence keeps its own KV cache and its own sampling parameters and random generator.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatgate.engines.base import Engine, GenerationOutput, ModelInfo, SamplingParams
from chatgate.engines.embedding import embed_in_batches, mean_pool
from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.engines.sampling import make_generator, sample
from chatgate.engines.sequence import OutputChannel, SequenceState
from chatgate.settings import EngineSettings

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256
EMBED_BATCH = 16


@dataclass(eq=False)
class _Running:
    """A sequence inside the scheduler."""

    state: SequenceState
    channel: OutputChannel
    generator: torch.Generator
    pending: list[int]
    cache: Any = None
    last_token: int | None = None


@dataclass(eq=False)
class _EmbedJob:
    """An embedding batch for the scheduler thread to run between steps."""

    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[float]]]

    def finish(self, result: list[list[float]] | BaseException) -> None:
        """Hand the result back to the waiting coroutine (called from the engine thread)."""

        def deliver() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(deliver)


class TransformersEngine(Engine):
    """Serves a causal LM with `transformers` on PyTorch."""

    def __init__(self, settings: EngineSettings) -> None:
        self._settings = settings
        self._source = resolve_chat_model(settings.model_path)
        self._inbox: queue.Queue[_Running | _EmbedJob | None] = queue.Queue()
        self._running: list[_Running] = []
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self.info = ModelInfo(
            name=self._source.name, context_length=0, vocab_size=0, has_chat_template=False
        )

    async def start(self) -> None:
        if self._model is None:
            await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._loop, name="chatgate-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._settings.num_threads:
            torch.set_num_threads(self._settings.num_threads)
        path = cached_checkpoint(self._source, self._settings.cache_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self._model = model.to(self._settings.device).eval()  # type: ignore[arg-type]
        config = self._model.config
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tokenizer.eos_token_id is not None:
            eos_ids.add(self._tokenizer.eos_token_id)
        self._eos = frozenset(eos_ids)
        self.info = ModelInfo(
            name=self._source.name,
            context_length=int(getattr(config, "max_position_embeddings", 2048)),
            vocab_size=int(config.vocab_size),
            embedding_dim=int(config.hidden_size),
            has_chat_template=bool(self._tokenizer.chat_template),
        )

    # Tokenizer ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return str(
            self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )

    def pending(self) -> int:
        return len(self._running) + self._inbox.qsize()

    # Generation --------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        channel = OutputChannel(asyncio.get_running_loop())
        state = SequenceState(
            prompt_ids=prompt_ids, params=params, decode=self.decode, eos_token_ids=self._eos
        )
        self._inbox.put(
            _Running(
                state=state,
                channel=channel,
                generator=make_generator(params.seed),
                pending=list(prompt_ids),
            )
        )
        try:
            while True:
                output = await channel.get()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            channel.cancelled = True  # the scheduler drops it at its next step

    def _loop(self) -> None:
        while True:
            if not self._admit(block=not self._running):
                return
            for seq in list(self._running):
                if seq.channel.cancelled:
                    self._running.remove(seq)
                    continue
                try:
                    self._step(seq)
                except Exception as exc:  # one bad sequence must not stop the others
                    log.exception("sequence failed")
                    seq.channel.put(exc)
                    self._running.remove(seq)
                    continue
                if seq.state.finished:
                    self._running.remove(seq)

    def _admit(self, *, block: bool) -> bool:
        """Move new sequences into the run list; False once the engine is closing."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return False
                if isinstance(item, _EmbedJob):
                    self._run_embed(item)
                else:
                    self._running.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return True

    # Embeddings ---------------------------------------------------------------------------

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        job = _EmbedJob(inputs=inputs, loop=loop, future=loop.create_future())
        self._inbox.put(job)
        return await job.future

    def _run_embed(self, job: _EmbedJob) -> None:
        """Mean-pooled last hidden states, as FastChat's model_worker computes them."""

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = self._model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            return mean_pool(hidden, mask)

        try:
            pad = self._tokenizer.pad_token_id
            result = embed_in_batches(
                job.inputs,
                forward=forward,
                pad_id=int(pad if pad is not None else 0),
                batch_size=EMBED_BATCH,
                device=self._settings.device,
            )
        except Exception as exc:  # reported to the caller; the scheduler keeps running
            log.exception("embedding failed")
            job.finish(exc)
        else:
            job.finish(result)

    # Steps --------------------------------------------------------------------------------

    @torch.inference_mode()
    def _step(self, seq: _Running) -> None:
        if seq.pending:
            chunk, seq.pending = seq.pending[:PREFILL_CHUNK], seq.pending[PREFILL_CHUNK:]
        else:
            chunk = [seq.last_token] if seq.last_token is not None else []
        if seq.cache is None:
            from transformers import DynamicCache

            seq.cache = DynamicCache(config=self._model.config)
        out = self._model(
            input_ids=torch.tensor([chunk], device=self._model.device),
            past_key_values=seq.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if seq.pending:
            return
        token = sample(
            out.logits[0, -1],
            seq.state.params,
            prompt_ids=seq.state.prompt_ids,
            output_ids=seq.state.output_ids,
            generator=seq.generator,
        )
        seq.last_token = token
        output = seq.state.append(token)
        if output is not None:
            seq.channel.put(output)
