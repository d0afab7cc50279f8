"""What a model worker does, independent of transport: prompts in, worker-protocol chunks out.

The HTTP worker app and the in-process client of `chatgate serve` both call this class, so a
request behaves the same whichever way it arrives.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from opentelemetry.trace import Span

from chatgate import tracing
from chatgate.engines.memory import MemoryGuard, MemoryNeed, adapter_bytes
from chatgate.engines.base import ChatOptions, Engine, EngineStats, GenerationOutput, SamplingParams, TokenLogprob
from chatgate.engines.reasoning import PARSERS, Phase, ReasoningSplitter
from chatgate.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
)
from chatgate.protocol.admin import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from chatgate.protocol.conversation import Conversation, chatml_conversation, generic_conversation
from chatgate.protocol.worker import (
    EXTENSIONS,
    CountTokenRequest,
    DetokenizeParams,
    DetokenizeResult,
    EmbedParams,
    EmbedResult,
    GenerateParams,
    ModelDetails,
    PromptLogprob,
    Sampling,
    ScorePairsParams,
    ScorePairsResult,
    TokenAlternative,
    TokenizeParams,
    TokenizeResult,
    WorkerChunk,
    WorkerLogprob,
    WorkerStatus,
    WorkerUsage,
    finish_reason_of,
)
from chatgate.worker.admission import Admission
from chatgate.worker.batching import EmbeddingBatcher
from chatgate.worker.lifecycle import ModelLifecycle
from chatgate.streams import closing
from chatgate.worker.queue import RequestQueue

# Roles the model's template may not know; they are rendered as the closest role it does.
_ROLE_ALIASES = {"developer": "system"}


def _aliased(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "role": _ROLE_ALIASES.get(m.get("role", ""), m.get("role"))} for m in messages]


class WorkerService:
    """Serves one engine under one or more model names."""

    def __init__(
        self, *, engine: Engine, model_names: list[str], queue: RequestQueue,
        reasoning_parser: str | None = None, chat_template: str | None = None, idle_unload: float | None = None,
        guard: MemoryGuard | None = None,
    ) -> None:
        self.engine = engine
        self._guard = guard  # checks that a load fits in memory before it starts
        self._think = PARSERS[reasoning_parser] if reasoning_parser is not None else None
        self._template = chat_template  # in place of the model's own
        self._base_names = model_names or [engine.info.name]
        self.lifecycle = ModelLifecycle(engine, name=self._base_names[0], idle_unload=idle_unload, guard=guard)
        self.queue = queue
        self.served = 0  # requests taken, for metrics
        self._batcher = EmbeddingBatcher(engine.embed)
        self._admission = Admission(engine)

    async def close(self) -> None:
        """Stop background work (the engine is closed by its owner)."""
        await self.lifecycle.close()
        await self._batcher.close()

    @property
    def model_names(self) -> list[str]:
        """The base model's names, then the LoRA adapters served beside it (these change; none
        while an admin has unloaded the model)."""
        if not self.lifecycle.listed:
            return []
        return [*self._base_names, *(n for n in self.engine.lora_names() if n not in self._base_names)]

    # Loading and unloading -------------------------------------------------------------------

    def knows(self, name: str) -> bool:
        """Whether `name` is one of this model's own names (loaded or not)."""
        return name in self._base_names

    async def load_model(self) -> None:
        """Load the model (an admin's `/v1/models/load`)."""
        await self.lifecycle.load()

    async def unload_model(self) -> None:
        """Free the model once its running requests have finished (`/v1/models/unload`)."""
        await self.lifecycle.unload()

    # LoRA adapters -----------------------------------------------------------------------------

    def serves_lora(self) -> bool:
        """Whether the engine serves LoRA adapters (it overrides `load_lora`)."""
        return type(self.engine).load_lora is not Engine.load_lora

    def lora_names(self) -> list[str]:
        """The LoRA adapters served now."""
        return self.engine.lora_names()

    async def load_lora(self, params: LoadLoraAdapterRequest) -> None:
        """Serve a LoRA adapter as a model of its own (vLLM's `/v1/load_lora_adapter`)."""
        if params.lora_name in self._base_names:
            raise InvalidRequestError(f"The model `{params.lora_name}` is already served; unload it first.", param="lora_name")
        if self.lifecycle.state == "idle":  # freed for want of requests: an adapter load wakes it, as a request would
            await self.lifecycle.load()
        if self._guard is None or self.lifecycle.state != "loaded":
            await self.engine.load_lora(params.lora_name, params.lora_path)
            return
        # Refused (409) if it would not fit beside what is loaded.
        async with self._guard.admitting(f"the LoRA adapter `{params.lora_name}`", lambda: self._adapter_need(params),
                                         param="lora_path"):
            await self.engine.load_lora(params.lora_name, params.lora_path)

    def _adapter_need(self, params: LoadLoraAdapterRequest) -> MemoryNeed | None:
        """What reading the adapter at `lora_path` takes beside what is loaded (None: unknown)."""
        size = adapter_bytes(Path(params.lora_path).expanduser())
        need = self.engine.memory_need()
        return MemoryNeed(need.device, size) if size is not None and need is not None else None

    async def unload_lora(self, params: UnloadLoraAdapterRequest) -> None:
        """Stop serving a LoRA adapter once its running requests have finished."""
        await self.engine.unload_lora(params.lora_name)

    def _adapter(self, params: GenerateParams) -> str | None:
        """The LoRA adapter the request names as its model, if it names one."""
        return params.model if params.model and params.model not in self._base_names and params.model in self.engine.lora_names() else None

    # Prompts ---------------------------------------------------------------------------------

    def _options(self, params: GenerateParams | None = None) -> ChatOptions:
        """How a request's conversation is templated: `--chat-template`, and its own variables."""
        if params is None:
            return ChatOptions(template=self._template)
        variables = dict(params.chat_template_kwargs or {})
        if params.reasoning_effort is not None:  # for templates with a switch of that name
            variables.setdefault("reasoning_effort", params.reasoning_effort)
        return ChatOptions(
            template=self._template, continue_final_message=params.continue_final_message, variables=variables
        )

    def _render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
        generation_prompt: bool = True, params: GenerateParams | None = None,
    ) -> str:
        return self.engine.render_chat(
            _aliased(messages), tools, add_generation_prompt=generation_prompt, options=self._options(params)
        )

    def _encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, params: GenerateParams | None = None
    ) -> tuple[list[int], str]:
        return self.engine.encode_chat(
            _aliased(messages), tools, options=self._options(params),
            add_generation_prompt=params.add_generation_prompt if params is not None else True,
        )

    def _tools_in_template(self) -> bool:
        if self._template is not None:
            return "tools" in self._template
        return self.engine.info.tools_in_template

    def _conversation(self, params: GenerateParams) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None] | None:
        """The messages (and tools, where the template renders them) a chat prompt is made of."""
        if params.tools and params.tool_messages is not None and self._tools_in_template():
            return params.tool_messages, params.tools
        if params.messages is not None:
            return params.messages, None
        return None

    def prompt_ids(self, params: GenerateParams) -> tuple[list[int], str]:
        """Token ids and text of the prompt, however the request gave it."""
        if params.suffix is not None:
            return self._fill_in_middle(params, params.suffix)
        if params.prompt_token_ids is not None:
            ids = self._checked_ids(params.prompt_token_ids, params.prompt_param)
            return ids, self.engine.decode(ids)
        conversation = self._conversation(params)
        if conversation is not None:
            return self._encode_chat(*conversation, params)
        text = params.prompt or ""
        return self.engine.encode(text), text

    def _fill_in_middle(self, params: GenerateParams, suffix: str) -> tuple[list[int], str]:
        """The StarCoder-style fill-in-the-middle prompt, prefix-suffix-middle order:
        `<fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>`; the prompt may be token ids."""
        marks = [self.engine.special_token(f"<fim_{part}>") for part in ("prefix", "suffix", "middle")]
        if None in marks:
            raise InvalidRequestError(
                f"The model `{self.engine.info.name}` has no fill-in-the-middle tokens, so it cannot "
                "complete text before a suffix; leave suffix out.", param="suffix",
            )
        prefix, after, middle = (int(m) for m in marks if m is not None)
        if params.prompt_token_ids is not None:
            head = self._checked_ids(params.prompt_token_ids, params.prompt_param)
        else:
            head = self.engine.encode(params.prompt or "", add_special_tokens=False)
        ids = [prefix, *head, after, *self.engine.encode(suffix, add_special_tokens=False), middle]
        return ids, self.engine.decode(head)

    def _checked_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.engine.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"Token id {bad} is outside this model's vocabulary (0 to {vocab - 1}).", param=param
            )
        return list(ids)

    def _check_logit_bias(self, bias: dict[int, float] | None) -> None:
        vocab = self.engine.info.vocab_size
        bad = next((t for t in bias or {} if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"logit_bias names token {bad}, outside this model's vocabulary (0 to {vocab - 1}).",
                param="logit_bias",
            )

    def _priority(self, params: GenerateParams) -> int:
        """What the request runs at: its own priority, raised to its key's floor where the engine
        schedules by priority."""
        if params.priority_floor is None or self.engine.info.scheduling_policy != "priority":
            return params.priority
        return max(params.priority, params.priority_floor)

    def _check_priority(self, priority: int) -> None:
        # As vLLM does: a priority the engine would not honour is an error, not silently ignored.
        if priority and self.engine.info.scheduling_policy != "priority":
            raise InvalidRequestError(
                f"priority {priority} was given, but this model schedules first come, first served "
                "(its workers run --scheduling-policy fcfs): leave priority at 0.",
                param="priority",
            )

    async def count_tokens(self, request: CountTokenRequest) -> int:
        """Tokens the prompt (or templated conversation) takes."""
        params = GenerateParams(prompt=request.prompt, messages=request.messages)
        await self._check_prompt_length(params)
        return len((await self._admission.run(lambda: self.prompt_ids(params)))[0])

    async def _check_prompt_length(self, params: GenerateParams) -> None:
        """Refuse, before tokenising, a prompt whose length alone shows it cannot fit."""
        if params.prompt_token_ids is not None:
            context = self.engine.info.context_length
            if len(params.prompt_token_ids) > context:
                raise ContextLengthExceededError.for_tokens(
                    context_length=context, prompt_tokens=len(params.prompt_token_ids),
                    completion_tokens=params.max_new_tokens or 1, param=params.prompt_param,
                )
            return
        texts = [str(m.get("content") or "") for m in params.messages or []] + [params.prompt or "", params.suffix or ""]
        if params.chat_template_kwargs:  # template variables may be rendered into the prompt too
            texts.append(str(params.chat_template_kwargs))
        await self._admission.check_length(texts, param=params.prompt_param)

    def _prepared(self, params: GenerateParams) -> tuple[list[int], str, SamplingParams, ReasoningSplitter | None]:
        """Prompt ids and text, the sampling parameters and the reasoning parser (CPU work: run
        it in a thread)."""
        ids, prompt_text = self.prompt_ids(params)
        if not ids:
            raise InvalidRequestError("The prompt must not be empty.", param=params.prompt_param)
        splitter = self._splitter(params, prompt_text)
        return ids, prompt_text, self._sampling(params, len(ids), splitter), splitter

    def _splitter(self, params: GenerateParams, prompt_text: str) -> ReasoningSplitter | None:
        """The reasoning parser for a chat reply streamed as deltas (to chatgate's API server;
        FastChat's gets the whole text, tags and all), if the worker has one."""
        conversation = self._conversation(params) if params.prompt_token_ids is None else None
        if self._think is None or not params.delta or not conversation or not conversation[0]:
            return None
        return ReasoningSplitter(self._think, self._reply_context(params, prompt_text, *conversation))

    def _reply_context(
        self, params: GenerateParams, prompt: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> str:
        """What says where a reply starts: the template's generation prompt (the prompt past the
        conversation rendered without one), or the prefill a reply continues; never the
        conversation's own text. The whole prompt where the template does not render so."""
        if params.continue_final_message:
            return str(messages[-1].get("content") or "")
        plain = params.model_copy(update={"continue_final_message": False})
        before = self._render(messages, tools, generation_prompt=False, params=plain)
        return prompt[len(before) :] if prompt.startswith(before) else prompt

    async def tokenize(self, params: TokenizeParams) -> TokenizeResult:
        """Token ids of a prompt or templated conversation, exactly as generation encodes it
        (vLLM's `/tokenize`); checked by length first, then tokenized in the bounded pool
        every other prompt goes through."""
        chat = GenerateParams(
            prompt=params.prompt, messages=params.messages, add_generation_prompt=params.add_generation_prompt,
            continue_final_message=params.continue_final_message, chat_template_kwargs=params.chat_template_kwargs,
        )
        await self._check_prompt_length(chat)
        return await self._admission.run(lambda: self._tokenize(params, chat))

    def _tokenize(self, params: TokenizeParams, chat: GenerateParams) -> TokenizeResult:
        if params.messages is not None and not params.add_special_tokens:
            ids = self._encode_chat(params.messages, None, chat)[0]  # exactly as generation encodes a chat
        else:
            if params.messages is not None:
                text = self._render(params.messages, generation_prompt=params.add_generation_prompt, params=chat)
            else:
                text = params.prompt or ""
            ids = self.engine.encode(text, add_special_tokens=params.add_special_tokens)
        return TokenizeResult(
            tokens=ids,
            token_strs=self.engine.token_strings(ids) if params.return_token_strs else None,
            context_length=self.engine.info.context_length,
        )

    async def detokenize(self, params: DetokenizeParams) -> DetokenizeResult:
        """The text of token ids, special tokens included (vLLM's `/detokenize`)."""
        ids = self._checked_ids(params.tokens, "tokens")
        text = await self._admission.run(lambda: self.engine.decode(ids, skip_special_tokens=False))
        return DetokenizeResult(prompt=text)

    def _constraint(self, params: GenerateParams, splitter: ReasoningSplitter | None) -> Any:
        """The compiled `response_format` constraint; with the reply to think first, it binds
        the answer only, from the end of the thinking on (engines that cannot wait for it bind
        the whole reply)."""
        if not params.response_format:
            return None
        spec = params.response_format
        if splitter is not None and splitter.phase is not Phase.ANSWER and self._think is not None:
            spec = {**spec, "after": self._think.end}
        return self.engine.compile_constraint(spec)

    def _sampling(self, params: GenerateParams, prompt_len: int, splitter: ReasoningSplitter | None = None) -> SamplingParams:
        context = self.engine.info.context_length
        room = context - prompt_len
        if params.max_new_tokens is None:
            if room < 1:
                raise ContextLengthExceededError.for_tokens(
                    context_length=context, prompt_tokens=prompt_len, completion_tokens=1,
                    param=params.prompt_param,
                )
            max_tokens = room
        else:
            max_tokens = params.max_new_tokens
            if max_tokens < 1:
                raise InvalidRequestError("max_tokens must be at least 1", param=params.max_tokens_param)
            if max_tokens > room:
                raise ContextLengthExceededError.for_tokens(
                    context_length=context, prompt_tokens=prompt_len, completion_tokens=max_tokens,
                    param=params.prompt_param,
                )
        self._check_logit_bias(params.logit_bias)
        self._check_priority(params.priority)
        lora = self._adapter(params)
        if lora is not None and params.echo and params.logprobs is not None:
            raise InvalidRequestError(
                f"The LoRA adapter `{lora}` cannot score prompt tokens (echo with logprobs); ask its base model.",
                param="logprobs",
            )
        knobs = Sampling.of(params)
        return SamplingParams(
            **knobs | {"logit_bias": knobs["logit_bias"] or {}},
            max_tokens=max_tokens,
            stop=tuple(params.stop_list()),
            stop_token_ids=tuple(params.stop_token_ids or ()),
            logprobs=params.logprobs,
            cache_salt=params.cache_salt,
            priority=self._priority(params),
            lora=lora,
            constraint=self._constraint(params, splitter),
        )

    # Generation ------------------------------------------------------------------------------

    def generate(self, params: GenerateParams) -> AsyncGenerator[WorkerChunk, None]:
        """Stream a generation; errors in the request are raised before the first chunk.

        The queue's bounds are checked first and the request's place held while the prompt is
        prepared, so a flood of large prompts is refused before any of them costs CPU."""
        return self.queue.serve(self._generate(params))

    async def _generate(self, params: GenerateParams) -> AsyncGenerator[WorkerChunk, None]:
        async with self.lifecycle.use():  # an idle model loads first; an unload waits for this
            async with contextlib.aclosing(self._generate_loaded(params)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def _generate_loaded(self, params: GenerateParams) -> AsyncGenerator[WorkerChunk, None]:
        # Not current across the yields below (they resume in the reader's context): its children
        # name it as their parent.
        span = tracing.start_generation(params)
        try:
            await self._check_prompt_length(params)
            with tracing.span("chatgate.tokenize", parent=span) as tokenized:
                ids, prompt_text, sampling, splitter = await self._admission.run(lambda: self._prepared(params))
                tokenized.set_attribute("gen_ai.usage.input_tokens", len(ids))
            self.served += 1
            prompt_logprobs = None
            if params.echo and params.logprobs is not None:
                prompt_logprobs = await self._prompt_logprobs(ids, params.logprobs)
            # Closed here, not left to the garbage collector: an unload waits only for this generator.
            async with closing(self.engine.generate(ids, sampling)) as outputs:
                if splitter is not None:
                    async for chunk in self._split(outputs, splitter, span):
                        yield chunk
                    return
                cumulative = prompt_text if params.echo else ""
                first = True
                async for out in outputs:
                    usage = WorkerUsage(
                        prompt_tokens=out.prompt_tokens,
                        completion_tokens=out.completion_tokens,
                        total_tokens=out.prompt_tokens + out.completion_tokens,
                        cached_tokens=out.cached_tokens,
                    )
                    if out.finish_reason is not None:
                        tracing.generation_end(span, out, finish_reason_of(out.finish_reason))
                    text = out.text
                    if params.echo and first:
                        text = prompt_text + text
                    first = False
                    cumulative += out.text
                    yield WorkerChunk(
                        text=text if params.delta else cumulative,
                        usage=usage,
                        finish_reason=finish_reason_of(out.finish_reason),
                        token_logprobs=self._logprobs(out.logprobs),
                        prompt_logprobs=prompt_logprobs,
                        stop_sequence=out.stop_sequence,
                    )
                    prompt_logprobs = None
        except BaseException as exc:
            if span.is_recording() and not isinstance(exc, GeneratorExit):
                tracing.failed(span, exc)
            raise
        finally:
            span.end()

    async def _split(
        self, outputs: AsyncIterator[GenerationOutput], splitter: ReasoningSplitter, span: Span
    ) -> AsyncGenerator[WorkerChunk, None]:
        """Delta chunks of a reply split into thinking and answer; the tokens of every output
        that was thinking, when it began or when it ended, count as reasoning tokens."""
        thinking = 0
        async for out in outputs:
            before = splitter.phase
            reasoning, content = splitter.feed(out.text)
            if out.finish_reason is not None:
                held_reasoning, held_content = splitter.finish()
                reasoning, content = reasoning + held_reasoning, content + held_content
                tracing.generation_end(span, out, finish_reason_of(out.finish_reason))
            if Phase.THINKING in (before, splitter.phase) or reasoning:
                thinking += len(out.token_ids)
            yield WorkerChunk(
                text=content,
                reasoning_content=reasoning,
                usage=WorkerUsage(
                    prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    total_tokens=out.prompt_tokens + out.completion_tokens, reasoning_tokens=thinking,
                    cached_tokens=out.cached_tokens,
                ),
                finish_reason=finish_reason_of(out.finish_reason),
                token_logprobs=self._logprobs(out.logprobs),
                stop_sequence=out.stop_sequence,
            )

    # Embeddings ------------------------------------------------------------------------------

    def _embedding_inputs(self, params: EmbedParams) -> list[list[int]]:
        """Token ids of every input, checked (CPU work: run it in a thread)."""
        if params.input_token_ids is not None:
            inputs = [self._checked_ids(ids, "input") for ids in params.input_token_ids]
        else:
            inputs = [self.engine.encode(text) for text in params.input or []]
        if not inputs:
            raise InvalidRequestError("'input' must not be empty.", param="input")
        limit = self.engine.info.context_length
        for index, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequestError(f"Input {index} is empty.", param="input")
            if len(ids) > limit:
                raise ContextLengthExceededError(
                    f"Input {index} is {len(ids)} tokens long, over this model's maximum of "
                    f"{limit} tokens. Shorten it or split it into several inputs.",
                    param="input",
                )
        return inputs

    async def embed(self, params: EmbedParams) -> EmbedResult:
        """Normalised vectors for every input, batched with concurrent requests."""
        if not self.engine.info.embedding_dim or params.model in self.engine.lora_names():
            raise InvalidRequestError(
                f"The model `{self.engine.info.name}` does not serve embeddings.", param="model"
            )
        await self._admission.check_length(params.input or [], param="input", each=True)
        inputs = await self._admission.run(lambda: self._embedding_inputs(params))
        self.served += 1
        async with self.lifecycle.use():
            vectors = await self._batcher.submit(inputs)
        counts = [len(ids) for ids in inputs]
        # The engine's own vectors: validating every float would hold the event loop for nothing.
        return EmbedResult.model_construct(embedding=vectors, token_num=sum(counts), token_counts=counts)

    async def score_pairs(self, params: ScorePairsParams) -> ScorePairsResult:
        """A cross-encoder's score of every pair, and the tokens it read, under the queue's
        bounds; a pair longer than the model reads is a 400 naming `pairs[i]` (the API server
        names its own field)."""
        return await self.queue.call(lambda: self._score_pairs(params))

    async def _score_pairs(self, params: ScorePairsParams) -> ScorePairsResult:
        if not self.engine.info.cross_encoder:
            raise InvalidRequestError(f"The model `{self.engine.info.name}` is not a cross-encoder.", param="model")
        if not params.pairs:
            raise InvalidRequestError("There are no pairs to score.", param="pairs")
        await self._admission.check_length([a + b for a, b in params.pairs], param="pairs", each=True)
        counts = await self._admission.run(lambda: [self.engine.pair_tokens(a, b) for a, b in params.pairs])
        limit = self.engine.info.context_length
        for index, count in enumerate(counts):
            if count > limit:
                raise ContextLengthExceededError(
                    f"Pair {index} is {count} tokens long, over this model's maximum of {limit} tokens.", param=f"pairs[{index}]"
                )
        self.served += 1
        scores = await self.engine.score_pairs(params.pairs)
        return ScorePairsResult(scores=scores, token_num=sum(counts))

    async def _prompt_logprobs(self, ids: list[int], top: int) -> list[PromptLogprob]:
        scored = await self.engine.prompt_logprobs(ids, top)
        out = []
        for token_id, lp in zip(ids, scored, strict=True):
            entry = self._logprob(lp) if lp is not None else None
            out.append(
                PromptLogprob(
                    token_id=token_id,
                    token=self.engine.decode([token_id]),
                    logprob=entry.logprob if entry else None,
                    top=entry.top if entry else [],
                )
            )
        return out

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> list[WorkerLogprob] | None:
        return None if logprobs is None else [self._logprob(lp) for lp in logprobs]

    def _logprob(self, lp: TokenLogprob) -> WorkerLogprob:
        def alternative(token_id: int, logprob: float) -> TokenAlternative:
            return TokenAlternative(token_id=token_id, token=self.engine.decode([token_id]), logprob=logprob)

        return WorkerLogprob(
            **alternative(lp.token_id, lp.logprob).model_dump(), top=[alternative(i, v) for i, v in lp.top]
        )

    # Status ----------------------------------------------------------------------------------

    def load(self) -> tuple[int, int]:
        """Requests in flight, and sequences the engine is running or queueing."""
        return self.queue.active, self.engine.pending()

    def status(self) -> WorkerStatus:
        """What the worker reports to the controller."""
        return WorkerStatus(
            model_names=self.model_names, speed=1.0, queue_length=self.queue.active
        )

    def engine_stats(self) -> EngineStats | None:
        """The engine's counters for /metrics, if it keeps any."""
        return self.engine.stats()

    def conversation(self) -> Conversation:
        """The model's chat template as a FastChat conversation, for FastChat's API server."""
        try:
            probe = self._render([{"role": "user", "content": "{probe}"}]) if self.engine.info.generates else ""
        except InvalidRequestError:  # no chat template: FastChat's server gets the generic one
            probe = ""
        return chatml_conversation(probe, stop_token_ids=self.engine.eos_token_ids) or generic_conversation()

    def details(self) -> ModelDetails:
        """Context length and the chatgate protocol extensions this worker supports."""
        info = self.engine.info
        return ModelDetails(
            context_length=info.context_length,
            chatgate_extensions=list(EXTENSIONS),
            generates=info.generates,
            embedding_dim=info.embedding_dim,
            cross_encoder=info.cross_encoder,
            concurrency=self.queue.limit,
        )
