"""The one request flow of chat and text completions: check, parameters, start, stream or collect.

`GenerationServing.create` is written once. A serving class supplies `prepare` (request to
worker parameters, and the `Reply` that builds its response objects); a `Reply` supplies the
chunk building through four small hooks. Nothing else differs between chat and completions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

from chatgate import tracing
from chatgate.api import access
from chatgate.api.auth import cache_salt
from chatgate.api.limits import grant as limits
from chatgate.api.workers.base import Worker, WorkerPool
from chatgate.api.workers.failover import with_failover
from chatgate.errors import ChatgateError, InvalidRequestError, NoHealthyWorkerError, WorkerLostError
from chatgate.metrics import ApiMetrics
from chatgate.protocol.openai import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionTokensDetails,
    FinishReason,
    PromptTokensDetails,
    SamplingRequest,
    TopLogprob,
    Usage,
)
from chatgate.protocol.limits import Cost, CostError, logprob_entries
from chatgate.protocol.worker import CountTokenRequest, GenerateParams, PromptLogprob, Sampling, WorkerChunk, WorkerLogprob, WorkerUsage
from chatgate.streams import merge, primed

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """What one choice produced, collected from its stream."""

    text: str = ""
    reasoning: str = ""  # the thinking, where the worker tells it apart
    finish_reason: FinishReason = None
    usage: Usage = field(default_factory=Usage)
    logprobs: list[WorkerLogprob] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    stop_sequence: str | None = None  # the stop string that ended it, when the worker says

    def add(self, chunk: WorkerChunk) -> None:
        """Fold one worker chunk into the choice."""
        self.text += chunk.text
        self.reasoning += chunk.reasoning_content
        self.logprobs += chunk.token_logprobs or []
        self.prompt_logprobs += chunk.prompt_logprobs or []
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.stop_sequence = chunk.stop_sequence or self.stop_sequence
        if chunk.usage is not None:
            self.usage = usage_of(chunk.usage)


def usage_of(worker: WorkerUsage) -> Usage:
    """The OpenAI usage of one choice from its worker's."""
    details = PromptTokensDetails(cached_tokens=worker.cached_tokens)
    usage = Usage.model_validate(worker.model_dump(exclude={"cached_tokens", "reasoning_tokens"}) | {"prompt_tokens_details": details})
    if worker.reasoning_tokens is not None:
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=worker.reasoning_tokens)
    return usage


async def _metered(
    stream: AsyncGenerator[WorkerChunk, None], metrics: ApiMetrics | None, model: str, begin: float, *, count_prompt: bool
) -> AsyncGenerator[WorkerChunk, None]:
    """Pass chunks through, observing time to first text, gaps between texts and tokens, and
    charging the tokens to the request's key (its tokens-per-minute limit).

    The charge is what the worker's latest usage says, and never less than the tokens seen
    delivered (one per scored token, else one per chunk of text): a worker that reports usage
    only at the end (an `openai` upstream) or not at all is still charged for a stream its
    client left early."""
    last: float | None = None
    usage = None
    delivered = 0
    reason: str | None = None
    try:
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                now = time.perf_counter()
                said = chunk.text or chunk.reasoning_content
                if said and (entry := access.record()) is not None:
                    entry.first_token()
                if said and metrics is not None:
                    if last is None:
                        metrics.ttft.labels(model=model).observe(now - begin)
                    else:
                        metrics.itl.labels(model=model).observe(now - last)
                    last = now
                usage = chunk.usage or usage
                reason = chunk.finish_reason or reason
                delivered += len(chunk.token_logprobs) if chunk.token_logprobs else int(bool(said))
                yield chunk
    finally:  # a stream the client left still used its tokens
        await _account(usage or WorkerUsage(), delivered, metrics, model, count_prompt, reason)


async def _account(
    usage: WorkerUsage, delivered: int, metrics: ApiMetrics | None, model: str, count_prompt: bool,
    finish_reason: str | None = None,
) -> None:
    prompt = usage.prompt_tokens if count_prompt else 0
    completion = max(usage.completion_tokens, delivered)
    tracing.request_usage(input_tokens=prompt, output_tokens=completion, finish_reason=finish_reason)
    entry = access.record()
    if entry is not None:
        entry.prompt_tokens += prompt
        entry.completion_tokens += completion
        entry.cached_tokens += usage.cached_tokens if count_prompt else 0
    await limits.charge(prompt + completion)
    if metrics is not None:
        metrics.prompt_tokens.labels(model=model).inc(prompt)
        metrics.completion_tokens.labels(model=model).inc(completion)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(items: list[WorkerLogprob]) -> ChatLogprobs:
    """Per-token log-probabilities in the chat completion shape."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=item.token,
                logprob=item.logprob,
                bytes=_bytes(item.token),
                top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=_bytes(a.token)) for a in item.top],
            )
            for item in items
        ]
    )


def completion_logprobs(
    items: list[WorkerLogprob], offset: int, prompt: list[PromptLogprob] | None = None
) -> CompletionLogprobs:
    """Per-token log-probabilities in the legacy completions shape, offsets from `offset`;
    with `echo`, the prompt's tokens come first (the very first has no log-probability)."""
    out = CompletionLogprobs()
    for entry in prompt or []:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({a.token: a.logprob for a in reversed(entry.top)} if entry.logprob is not None else None)
        out.text_offset.append(offset)
        offset += len(entry.token)
    for item in items:
        out.tokens.append(item.token)
        out.token_logprobs.append(item.logprob)
        out.top_logprobs.append({a.token: a.logprob for a in reversed(item.top)})
        out.text_offset.append(offset)
        offset += len(item.token)
    return out


def total_usage(choices: list[Choice], per_prompt: int) -> Usage:
    """Usage of a response: each distinct prompt counted once, every completion counted. A
    prompt's cached tokens are the fewest any of its choices had: the `n` copies of one prompt
    may find each other's KV, which a prompt counted once must not count."""
    usage = Usage()
    for start in range(0, len(choices), per_prompt):
        copies = [choice.usage for choice in choices[start : start + per_prompt]]
        usage.prompt_tokens += copies[0].prompt_tokens
        usage.prompt_tokens_details.cached_tokens += min(u.prompt_tokens_details.cached_tokens for u in copies)
        usage.completion_tokens += sum(u.completion_tokens for u in copies)
        for u in copies:
            if u.completion_tokens_details is not None:
                details = usage.completion_tokens_details or CompletionTokensDetails()
                details.reasoning_tokens += u.completion_tokens_details.reasoning_tokens
                usage.completion_tokens_details = details
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


def sampling_params(request: SamplingRequest) -> dict[str, object]:
    """Worker-protocol fields every choice of an OpenAI request shares: model, stops, the cache
    salt, and the sampling knobs (defaults from the protocol's one declaration)."""
    return {
        **Sampling.of(request),
        "model": request.model,
        "stop": request.stop_list() or None,
        "cache_salt": cache_salt(request.cache_salt),
        "priority": request.priority,
        "priority_floor": limits.priority_floor(),
    }


def with_seeds(params: GenerateParams, n: int, seed: int | None) -> list[GenerateParams]:
    """`n` copies of `params`; with a seed, choice i uses seed + i so choices differ (wrapping
    within signed 64 bits, so the largest seed stays a valid seed)."""
    if seed is None:
        return [params] * n
    return [params.model_copy(update={"seed": (seed + i + 2**63) % 2**64 - 2**63}) for i in range(n)]


async def _check_open_budget(worker: Worker, params: list[GenerateParams]) -> None:
    """Refuse a response that would hold more log-probability entries than allowed if every
    choice ran to the end of the context (its budget was left open)."""
    context = (await worker.model_details()).context_length
    entries, detail = logprob_entries(choices=len(params), alternatives=params[0].logprobs or 0, tokens=context)
    try:
        Cost(logprob_entries=entries, logprob_param=params[0].max_tokens_param, logprob_detail=detail).check()
    except CostError as exc:
        raise InvalidRequestError(
            f"Invalid value for '{exc.param}': left open, it allows {exc} Set it.", param=exc.param, code="invalid_value"
        ) from None


async def _abandon(tasks: Sequence[asyncio.Future[AsyncGenerator[WorkerChunk, None]]]) -> None:
    """Cancel starts still waiting for their first chunk and close streams that started."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().aclose()


RequestT = TypeVar("RequestT", bound=SamplingRequest)
ResponseT = TypeVar("ResponseT", bound=BaseModel)
ChunkT = TypeVar("ChunkT", bound=BaseModel)


class Reply(ABC, Generic[ResponseT, ChunkT]):
    """How one request's results become response objects: the hooks of the request flow."""

    def opening(self, choices: int) -> Iterable[ChunkT]:
        """Chunks sent before any generated text (none by default)."""
        return ()

    @abstractmethod
    def chunks(self, index: int, part: WorkerChunk, choice: Choice, sent: int) -> Iterable[ChunkT]:
        """Chunks for one worker chunk of choice `index`; `choice` already holds it, and
        `sent` is how much of the choice's text came before it."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> ChunkT:
        """The last chunk of a stream that asked for usage."""

    @abstractmethod
    def response(self, choices: list[Choice], usage: Usage) -> ResponseT:
        """The whole response of a request that did not stream."""


class GenerationServing(ABC, Generic[RequestT, ResponseT, ChunkT]):
    """Starts generations on a worker and collects or merges their streams."""

    # Fields an error names as chat's request does, renamed as this route's request names them.
    param_names: ClassVar[dict[str, str]] = {}

    def __init__(self, *, pool: WorkerPool, max_n: int, metrics: ApiMetrics | None = None) -> None:
        self._pool = pool
        self._max_n = max_n
        self._metrics = metrics
        self._uncharged: set[asyncio.Task[None]] = set()  # charges of cut requests, still counting

    @abstractmethod
    def prepare(self, request: RequestT) -> tuple[list[GenerateParams], Reply[ResponseT, ChunkT]]:
        """Worker parameters for every choice, and the reply that builds the response."""

    async def create(self, request: RequestT) -> ResponseT | AsyncGenerator[ChunkT, None]:
        """Answer a request: a response, or a stream of chunks."""
        self.check_n(request.n)
        params, reply = self.prepare(request)
        if tracing.traced():
            tracing.request_attributes(tracing.genai_generation(params[0]))
        choices_param = "n" if request.n > 1 else params[0].prompt_param
        if request.stream:
            streams = await self.start(request.model, params, choices_param=choices_param)
            return self._stream(streams, reply, request)
        choices = await self._collect_anywhere(request.model, params, choices_param)
        return reply.response(choices, total_usage(choices, request.n))

    async def _collect_anywhere(self, model: str, params: list[GenerateParams], choices_param: str) -> list[Choice]:
        """Every choice run to its end. A worker lost mid-way costs the client nothing yet: the
        request starts once more on another worker (the lost one is out of rotation); the client
        gets the loss when that one is lost too, or no other is left."""
        lost: WorkerLostError | None = None
        # Once more only: a request that itself kills workers takes out two, not every one.
        for _ in range(2):
            try:
                streams = await self.start(model, params, choices_param=choices_param, held=True)
            except NoHealthyWorkerError:
                if lost is not None:
                    raise lost from None
                raise
            try:
                return await self.collect(streams)
            except WorkerLostError as exc:
                lost = exc
        assert lost is not None
        raise lost

    async def _stream(
        self, streams: list[AsyncGenerator[WorkerChunk, None]], reply: Reply[ResponseT, ChunkT], request: RequestT
    ) -> AsyncGenerator[ChunkT, None]:
        choices = [Choice() for _ in streams]
        for chunk in reply.opening(len(streams)):
            yield chunk
        async with contextlib.aclosing(merge(streams)) as merged:
            async for index, part in merged:
                sent = len(choices[index].text)
                choices[index].add(part)
                for chunk in reply.chunks(index, part, choices[index], sent):
                    yield chunk
        if request.include_usage():
            yield reply.usage_chunk(total_usage(choices, request.n))

    def check_n(self, n: int) -> None:
        """Refuse more choices than the server allows."""
        if n > self._max_n:
            raise InvalidRequestError(f"n must be at most {self._max_n}.", param="n")

    async def start(
        self, model: str, params: list[GenerateParams], *, choices_param: str = "n", held: bool = False
    ) -> list[AsyncGenerator[WorkerChunk, None]]:
        """Start every generation and wait for each one's first chunk, so errors raise here;
        if the worker fails before answering, all of them move to another worker. Too many
        choices for a worker is an error naming `choices_param`."""
        begin = time.perf_counter()
        first_of_prompt = [i == 0 or params[i].prompt_key() != params[i - 1].prompt_key() for i in range(len(params))]
        try:
            streams = await with_failover(self._pool, model, lambda worker: self._start_on(worker, params, choices_param, held))
        except ChatgateError as exc:  # named as this route's request names the field
            exc.param = self.param_names.get(exc.param or "", exc.param)
            raise
        except asyncio.CancelledError:
            # Cut before any first chunk (its deadline passed, its client left): the worker may
            # have prefilled the prompts, and no usage came back to charge them by.
            distinct = [p for p, first in zip(params, first_of_prompt, strict=True) if first]
            self._uncharged.add(task := asyncio.create_task(self._charge_prompts(model, distinct)))
            task.add_done_callback(self._uncharged.discard)
            raise
        return [
            _metered(stream, self._metrics, model, begin, count_prompt=first)
            for stream, first in zip(streams, first_of_prompt, strict=True)
        ]

    async def _charge_prompts(self, model: str, params: list[GenerateParams]) -> None:
        """Charge the key for prompts whose generation was cut before it reported usage: the
        worker counts their tokens (run in the request's context, so the same key is charged)."""
        total = 0
        for p in params:
            if p.prompt_token_ids is not None:
                total += len(p.prompt_token_ids)
                continue
            request = CountTokenRequest(prompt=p.prompt, messages=p.messages)
            try:
                total += await with_failover(self._pool, model, lambda worker: worker.count_tokens(request))
            except ChatgateError:
                log.warning("could not count the tokens of a cut request's prompt; it is not charged")
                return
        await limits.charge(total)

    @staticmethod
    async def _start_on(
        worker: Worker, params: list[GenerateParams], choices_param: str, held: bool
    ) -> list[AsyncGenerator[WorkerChunk, None]]:
        """Start every choice on `worker`, all or none: a request of more choices than the worker
        takes at once is refused before any starts, and when one choice fails to start the
        others are stopped at once, so a request that cannot be served holds no slot. A `held`
        response (not streamed) with log-probabilities and an open budget is checked against
        the log-probability cap at this model's context length."""
        if held and params[0].logprobs is not None and params[0].max_new_tokens is None:
            await _check_open_budget(worker, params)
        if len(params) > 1:
            capacity = (await worker.model_details()).concurrency
            if capacity is not None and len(params) > capacity:
                raise InvalidRequestError(
                    f"This request asks for {len(params)} choices at once (prompts × n); this model's "
                    f"workers run at most {capacity} at a time. Send fewer prompts or a lower n.",
                    param=choices_param,
                )
        tasks = [asyncio.ensure_future(primed(worker.generate_stream(p))) for p in params]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
            if failed is not None or any(not t.done() for t in tasks):  # an error, or we were cancelled
                await _abandon(tasks)
        error = failed.exception() if failed is not None else None
        if error is not None:
            raise error
        return [t.result() for t in tasks]

    @staticmethod
    async def collect(streams: Sequence[AsyncIterator[WorkerChunk]]) -> list[Choice]:
        """Run every stream to its end, concurrently."""
        choices = [Choice() for _ in streams]
        async for index, chunk in merge(streams):
            choices[index].add(chunk)
        return choices
