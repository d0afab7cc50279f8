"""A worker over HTTP: FastChat's worker protocol, to a chatgate or a FastChat worker.

Transport failures become chatgate errors here, at the boundary:

- a worker that cannot be reached, times out before its first frame or answers 5xx raises
  `WorkerUnavailableError`: the pool takes it out of rotation and the caller retries elsewhere;
- a 429 (or an overloaded error frame) raises `OverloadedError`: busy, not down, so the caller
  tries another worker without reporting this one;
- any other 4xx is about the request and goes back to the client as it is;
- a stream that breaks or goes silent after its first frame ends that request with a
  `WorkerError` (it cannot move elsewhere) and takes the worker out of rotation;
- no free connection within the pool timeout is a 503 of this server, not the worker's fault.

Every call is bounded: connect timeout, time to the first frame, silence between frames, and
the size of one frame. A chatgate worker that advertises keep-alive frames is asked for them
and then gets only `silence` seconds, before and between frames alike: it speaks at least every
`keepalive` seconds while it is alive (queued, prefilling, or between tokens), so a few seconds
of silence mean it is frozen, however long its prefill. FastChat workers keep the long bounds.

Messages never name the worker: its address and the transport's own words go to the log
(`HttpWorker._fault`), the client reads only what went wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from chatgate.errors import (
    ChatgateError,
    ContextLengthExceededError,
    InvalidRequestError,
    NoHealthyWorkerError,
    OverloadedError,
    QueueTimeoutError,
    RequestTooLargeError,
    WorkerError,
    WorkerLostError,
    WorkerUnavailableError,
    from_fastchat_code,
)
from chatgate.protocol.conversation import Conversation, render
from chatgate.protocol import worker as wire

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
E = TypeVar("E", bound=ChatgateError)


def _chunk_error(chunk: wire.WorkerChunk) -> ChatgateError:
    return from_fastchat_code(chunk.error_code, chunk.text, param=chunk.param)


@dataclass(frozen=True)
class Bounds:
    """How long and how much a worker call may take (see the `worker_*` API settings)."""

    connect: float = 3.0
    first_frame: float = 60.0
    between_frames: float = 30.0
    max_frame_bytes: int = 8 * 1024 * 1024
    pool: float = 5.0
    silence: float = 5.0  # before and between frames, for workers that send keep-alive frames
    keepalive: float = 1.0  # the keep-alive interval such workers are asked for

    def with_keepalive(self) -> Bounds:
        """The bounds of a stream whose worker sends keep-alive frames (never looser than the
        first-frame and frame bounds, for an operator who tightened those)."""
        return dataclasses.replace(
            self, first_frame=min(self.silence, self.first_frame), between_frames=min(self.silence, self.between_frames)
        )

    def timeout(self, read: float | None) -> httpx.Timeout:
        """httpx's timeouts for one call; `read` None when the caller keeps its own deadlines."""
        return httpx.Timeout(connect=self.connect, read=read, write=self.connect, pool=self.pool)


class FrameTooLarge(Exception):
    """A worker's stream frame is over the cap."""


async def _next(data: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(data)
    except StopAsyncIteration:
        return None


class _FrameReader:
    """The NUL-delimited JSON chunks of a worker's stream, each within its deadline
    (`TimeoutError`) and size cap (`FrameTooLarge`).

    Each read runs in a task of its own: a client that goes away cancels the request's task,
    and a cancellation landing inside httpx's read leaves the pooled connection marked busy
    forever (the pool fills up with dead connections). `abandon` ends an unfinished stream
    instead: it closes the socket under the pending read and lets that read unwind.
    """

    def __init__(self, response: httpx.Response, bounds: Bounds) -> None:
        self._response = response
        self._bounds = bounds
        self._data = aiter(response.aiter_bytes())
        self._pending: asyncio.Task[bytes | None] | None = None

    async def _read(self, deadline: float) -> bytes | None:
        if self._pending is None:
            self._pending = asyncio.ensure_future(_next(self._data))
        async with asyncio.timeout_at(deadline):
            data = await asyncio.shield(self._pending)
        self._pending = None
        return data

    async def frames(self) -> AsyncIterator[wire.WorkerChunk]:
        """The chunks, as they arrive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._bounds.first_frame
        buffer = b""
        cap = self._bounds.max_frame_bytes
        while (data := await self._read(deadline)) is not None:
            *frames, buffer = (buffer + data).split(b"\0")
            if len(buffer) > cap or any(len(f) > cap for f in frames):
                raise FrameTooLarge(f"a stream frame over {cap} bytes")
            for frame in frames:
                if frame.strip() and frame != wire.KEEPALIVE_FRAME:  # a keep-alive only resets the deadline
                    yield wire.WorkerChunk.model_validate_json(frame)
            if frames:
                deadline = loop.time() + self._bounds.between_frames

    async def abandon(self) -> None:
        """Drop the connection of an unfinished stream (which tells the worker to stop)."""
        network_stream = self._response.extensions.get("network_stream")
        if network_stream is not None:
            await network_stream.aclose()
        if self._pending is not None:
            await asyncio.wait([self._pending])
            if not self._pending.cancelled():
                self._pending.exception()  # retrieved: the read failed as the socket closed
        await self._response.aclose()


def _detail(content: bytes) -> str:
    """The reason a worker gave for refusing a request, from whichever body shape it uses."""
    text = content.decode(errors="replace")[:500]
    try:
        body = json.loads(content)
    except ValueError:
        return text
    if isinstance(body, dict):
        error = body.get("error")
        for value in (error.get("message") if isinstance(error, dict) else error, body.get("text"), body.get("detail")):
            if value:
                return str(value)[:500]
    return text


async def _head(response: httpx.Response, limit: int = 65536) -> bytes:
    """At most `limit` bytes of a streamed body (an error's reason is short)."""
    content = b""
    async for data in response.aiter_bytes():
        content += data
        if len(content) >= limit:
            break
    return content[:limit]


async def _deltas(chunks: AsyncIterator[wire.WorkerChunk]) -> AsyncIterator[wire.WorkerChunk]:
    """Cumulative text (FastChat's stream) as deltas; a trailing half character waits."""
    sent = ""
    async for chunk in chunks:
        text = chunk.text if chunk.finish_reason else chunk.text.rstrip("\ufffd")
        delta = text[len(sent) :] if text.startswith(sent) else ""
        sent = text if text.startswith(sent) else sent
        yield chunk.model_copy(update={"text": delta})


@dataclass
class WorkerFacts:
    """What an API server learns once about each model of each worker: its details and conversation."""

    in_flight: Counter[str] = field(default_factory=Counter)
    details: dict[tuple[str, str], wire.ModelDetails] = field(default_factory=dict)
    conversations: dict[tuple[str, str], Conversation] = field(default_factory=dict)
    # Unfinished worker streams being closed in the background (referenced until done).
    closing: set[asyncio.Task[None]] = field(default_factory=set)

    def close_later(self, reader: _FrameReader) -> None:
        """Abandon an unfinished stream in a task of its own, which no client can cancel."""
        task = asyncio.get_running_loop().create_task(reader.abandon())
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    def forget(self, *, keep: set[tuple[str, str]] | None = None, drop: str | None = None) -> None:
        """Forget workers: all but the (address, model) pairs in `keep`, or just the worker `drop`.
        A model a worker no longer serves is forgotten too (adapters come and go by name).

        Counts of requests still in flight stay until they end, so they are never negative.
        """
        addresses = {address for address, _ in keep} if keep is not None else set()

        def gone(key: tuple[str, str]) -> bool:
            return key[0] == drop if keep is None else key not in keep

        for key in [k for k in self.details if gone(k)]:
            del self.details[key]
        for key in [k for k in self.conversations if gone(k)]:
            del self.conversations[key]
        for address in [a for a, n in self.in_flight.items() if n <= 0 and (a == drop if keep is None else a not in addresses)]:
            del self.in_flight[address]


class HttpWorker:
    """Speaks FastChat's worker protocol to one worker, about the one model it was picked for
    (every call names it: a worker may serve several).

    With a chatgate worker it uses the extensions the worker advertises (the worker applies
    the model's chat template and streams deltas). With a FastChat worker it does what
    FastChat's API server does: builds the prompt from the worker's conversation template,
    sizes `max_new_tokens` to the context, and turns cumulative text into deltas.
    """

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        address: str,
        model: str,
        facts: WorkerFacts,
        bounds: Bounds = Bounds(),
        on_failure: Callable[[HttpWorker], None] | None = None,
    ) -> None:
        self._http = http
        self.address = address.rstrip("/")
        self.model = model
        self._facts = facts
        self._in_flight = facts.in_flight
        self._bounds = bounds
        self._on_failure = on_failure

    def _fault(self, error: type[E], message: str, detail: object = None) -> E:
        """`error` with `message` for the client; this worker's address and `detail` are logged."""
        log.warning("worker %s: %s%s", self.address, message, f" ({detail})" if detail else "")
        return error(message)

    def _unavailable(self, exc: Exception | str) -> WorkerUnavailableError:
        return self._fault(WorkerUnavailableError, "A worker of this model is unavailable.", exc)

    def _transport_error(self, exc: httpx.TransportError) -> ChatgateError:
        if isinstance(exc, httpx.PoolTimeout):  # our own connections are all busy, not the worker
            return NoHealthyWorkerError("Every connection to the workers is busy; retry shortly.")
        return self._unavailable(f"{type(exc).__name__} {exc}".strip())

    def _refused(self, status: int, content: bytes) -> ChatgateError:
        """The error for a non-200 answer (see the module docstring for which is which)."""
        detail = _detail(content)
        if status >= 500:
            return self._unavailable(f"HTTP {status}")
        if status == 429:
            return OverloadedError(detail or "The model is overloaded; retry shortly.")
        if status in (401, 403):
            return self._fault(WorkerError, f"A worker refused this server's fleet key (HTTP {status}).")
        if status == 413:
            return RequestTooLargeError(detail or "The request is too large for the worker.")
        return InvalidRequestError(f"The worker refused the request: {detail or f'HTTP {status}'}")

    async def generate_stream(self, params: wire.GenerateParams) -> AsyncIterator[wire.WorkerChunk]:
        self._in_flight[self.address] += 1
        try:
            details = await self.model_details()
            native = wire.EXT_CHAT_TEMPLATE in details.chatgate_extensions
            if not native:
                params = await self._fastchat_params(params, details)
            bounds, keepalive = self._bounds, None
            if wire.EXT_KEEPALIVE in details.chatgate_extensions:
                bounds, keepalive = bounds.with_keepalive(), bounds.keepalive
            update = {"delta": native, "keepalive": keepalive, "model": params.model or self.model}
            body = params.model_copy(update=update).model_dump(exclude_none=True)
            request = self._http.build_request(
                "POST", f"{self.address}/worker_generate_stream", json=body, timeout=bounds.timeout(None)
            )
            chunks = self._stream(request, bounds)
            async for chunk in chunks if native else _deltas(chunks):
                yield chunk
        finally:
            self._in_flight[self.address] -= 1

    async def _fastchat_params(self, params: wire.GenerateParams, details: wire.ModelDetails) -> wire.GenerateParams:
        """Parameters a FastChat worker understands: a rendered prompt and a sized budget."""
        if params.prompt_token_ids is not None:
            raise InvalidRequestError(
                "This model's worker takes text prompts only, not token ids.", param=params.prompt_param
            )
        if params.continue_final_message or params.chat_template_kwargs:
            # FastChat's conversation templates have no such switches: refused, not ignored.
            field = "continue_final_message" if params.continue_final_message else "chat_template_kwargs"
            raise InvalidRequestError(f"This model's worker does not support {field}.", param=field)
        # FastChat workers get their usual payload: no chatgate-only fields such as `cache_salt`.
        update: dict[str, object] = {"messages": None, "cache_salt": None}
        prompt = params.prompt or ""
        if params.messages is not None:
            conv = await self._conversation(params.model or self.model)
            prompt = render(conv, params.messages)
            stops = [conv.stop_str] if isinstance(conv.stop_str, str) else list(conv.stop_str or [])
            update |= {"stop": params.stop_list() + stops, "stop_token_ids": conv.stop_token_ids}
        count = await self.count_tokens(wire.CountTokenRequest(prompt=prompt))
        room = details.context_length - count
        wanted = params.max_new_tokens if params.max_new_tokens is not None else room
        if wanted > room or room < 1:
            raise ContextLengthExceededError.for_tokens(
                context_length=details.context_length, prompt_tokens=count,
                completion_tokens=max(wanted, 1), param=params.prompt_param,
            )
        return params.model_copy(update={**update, "prompt": prompt, "max_new_tokens": wanted})

    async def _conversation(self, model: str) -> Conversation:
        key = (self.address, model)
        if key not in self._facts.conversations:
            result = await self._post("/worker_get_conv_template", {"model": model})
            self._facts.conversations[key] = Conversation.model_validate(result.get("conv") or {})
        return self._facts.conversations[key]

    async def _stream(self, request: httpx.Request, bounds: Bounds) -> AsyncIterator[wire.WorkerChunk]:
        try:
            async with asyncio.timeout(bounds.first_frame):
                response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        except TimeoutError as exc:
            raise self._unavailable(f"no answer in {bounds.first_frame:g}s") from exc
        started = complete = False
        reader = _FrameReader(response, bounds)
        try:
            if response.status_code != 200:
                async with asyncio.timeout(bounds.between_frames):
                    raise self._refused(response.status_code, await _head(response))
            async for chunk in reader.frames():
                if chunk.error_code:
                    raise self._frame_error(chunk, started=started)
                started = True
                yield chunk
            complete = True
        except (httpx.TransportError, TimeoutError) as exc:
            raise self._broken(exc, started=started) from exc
        except FrameTooLarge as exc:
            raise self._fault(WorkerError, f"The worker sent {exc}; the request was ended.") from exc
        except ValidationError as exc:
            raise self._fault(WorkerError, "The worker sent a malformed frame.") from exc
        finally:
            if complete:
                await asyncio.shield(response.aclose())
            else:
                self._facts.close_later(reader)

    def _frame_error(self, chunk: wire.WorkerChunk, *, started: bool) -> ChatgateError:
        """The error a worker sent as a frame. One saying it cannot serve (e.g. it is shutting
        down) before anything was generated moves the request to another worker; one that the
        request waited too long in its queue goes to the client (the worker is busy, not down,
        and the request has had its wait)."""
        error = _chunk_error(chunk)
        if isinstance(error, NoHealthyWorkerError) and not isinstance(error, QueueTimeoutError) and not started:
            return self._unavailable(error.message)
        return error

    def _broken(self, exc: Exception, *, started: bool) -> ChatgateError:
        """The error for a stream that broke or went silent, before or after its first frame."""
        silent = isinstance(exc, TimeoutError)
        what = "stopped answering" if silent else "failed"
        if not started:
            return self._unavailable(what)
        # Mid-stream, the request cannot move to another worker, but the next ones should not
        # go to this one: a frozen worker, or one whose connection broke (a killed process resets
        # every stream at once, long before the controller's heartbeat notices).
        if self._on_failure is not None:
            self._on_failure(self)
        return self._fault(WorkerLostError, f"The worker {what} mid-stream.", exc)

    async def _post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        if not body.get("model"):  # the worker may serve several models
            body = {**body, "model": self.model}
        try:
            response = await self._http.post(
                f"{self.address}{path}", json=body, timeout=self._bounds.timeout(self._bounds.first_frame)
            )
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        if response.status_code != 200:
            raise self._refused(response.status_code, response.content)
        try:
            result = response.json()
        except ValueError as exc:
            raise self._fault(WorkerError, "The worker answered badly: not JSON.", exc) from exc
        if not isinstance(result, dict):
            raise self._fault(WorkerError, "The worker answered badly: not a JSON object.")
        if isinstance(result.get("error_code"), int) and result["error_code"]:
            raise _chunk_error(self._parse(wire.WorkerChunk, result))
        return result

    def _parse(self, model: type[M], result: dict[str, object]) -> M:
        """A worker's answer as `model`; a malformed one is the worker's error, not ours."""
        try:
            return model.model_validate(result)
        except ValidationError as exc:
            raise self._fault(WorkerError, f"The worker answered badly: {exc.errors()[0]['msg']}") from exc

    async def count_tokens(self, request: wire.CountTokenRequest) -> int:
        result = await self._post("/count_token", request.model_dump(exclude_none=True))
        count = result.get("count", 0)
        if not isinstance(count, int):
            raise self._fault(WorkerError, "The worker answered badly: a token count that is not a number.", count)
        return count

    async def embed(self, params: wire.EmbedParams) -> wire.EmbedResult:
        result = await self._post("/worker_get_embeddings", params.model_dump(exclude_none=True))
        return self._parse(wire.EmbedResult, result)

    async def score_pairs(self, params: wire.ScorePairsParams) -> wire.ScorePairsResult:
        if not (await self.model_details()).cross_encoder:  # a FastChat worker has no /worker_score
            raise InvalidRequestError(f"The model `{params.model}` is not a cross-encoder.", param="model")
        return self._parse(wire.ScorePairsResult, await self._post("/worker_score", params.model_dump()))

    async def tokenize(self, params: wire.TokenizeParams) -> wire.TokenizeResult:
        await self._require(wire.EXT_TOKENIZE, "/tokenize")
        return wire.TokenizeResult.model_validate(await self._post("/tokenize", params.model_dump(exclude_none=True)))

    async def detokenize(self, params: wire.DetokenizeParams) -> wire.DetokenizeResult:
        await self._require(wire.EXT_TOKENIZE, "/detokenize")
        return wire.DetokenizeResult.model_validate(await self._post("/detokenize", params.model_dump()))

    async def _require(self, extension: str, what: str) -> None:
        """Refuse what a worker does not advertise (a FastChat worker, or an older chatgate)."""
        if extension not in (await self.model_details()).chatgate_extensions:
            raise InvalidRequestError(f"{what} is not supported by this worker.", param="model")

    async def model_details(self) -> wire.ModelDetails:
        key = (self.address, self.model)
        if key not in self._facts.details:
            details = self._parse(wire.ModelDetails, await self._post("/model_details", {"model": self.model}))
            self._facts.details[key] = details
        return self._facts.details[key]
