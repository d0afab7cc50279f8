"""A worker over HTTP: FastChat's worker protocol, to a chatgate or a FastChat worker.

Transport failures become chatgate errors here, at the boundary: a worker that cannot be
reached, or fails before its first byte, raises `WorkerUnavailableError` so the pool can take
it out of rotation and the caller can retry elsewhere.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import httpx

from chatgate.errors import (
    ChatgateError,
    ContextLengthExceededError,
    InvalidRequestError,
    WorkerError,
    WorkerUnavailableError,
    from_fastchat_code,
)
from chatgate.protocol.conversation import Conversation, render
from chatgate.protocol.worker import (
    EXT_CHAT_TEMPLATE, CountTokenRequest, EmbedParams, EmbedResult, GenerateParams, ModelDetails, WorkerChunk,
)

log = logging.getLogger(__name__)


def _chunk_error(chunk: WorkerChunk) -> ChatgateError:
    return from_fastchat_code(chunk.error_code, chunk.text, param=chunk.param)


# Largest worker stream frame accepted: one chunk of text and log-probabilities is far smaller.
MAX_FRAME_BYTES = 16 * 1024 * 1024


async def _frames(response: httpx.Response) -> AsyncIterator[WorkerChunk]:
    """The NUL-delimited JSON chunks of a worker's stream."""
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        *frames, buffer = buffer.split(b"\0")
        if len(buffer) > MAX_FRAME_BYTES:
            raise WorkerError(f"A worker stream frame is over {MAX_FRAME_BYTES} bytes.")
        for frame in frames:
            if frame.strip():
                yield WorkerChunk.model_validate_json(frame)


async def _deltas(chunks: AsyncIterator[WorkerChunk]) -> AsyncIterator[WorkerChunk]:
    """Cumulative text (FastChat's stream) as deltas; a trailing half character waits."""
    sent = ""
    async for chunk in chunks:
        text = chunk.text if chunk.finish_reason else chunk.text.rstrip("\ufffd")
        delta = text[len(sent) :] if text.startswith(sent) else ""
        sent = text if text.startswith(sent) else sent
        yield chunk.model_copy(update={"text": delta})


async def _close(response: httpx.Response, *, drop_connection: bool) -> None:
    """Close a worker response; an unfinished one also closes its connection.

    Closing the connection is what tells the worker to stop generating. It is done directly
    because httpx's own cleanup can itself be cancelled when the client's request is.
    """
    network_stream = response.extensions.get("network_stream") if drop_connection else None
    if network_stream is not None:
        await network_stream.aclose()
    await response.aclose()


@dataclass
class WorkerFacts:
    """What an API server learns about each worker once: its details and conversation."""

    in_flight: Counter[str] = field(default_factory=Counter)
    details: dict[str, ModelDetails] = field(default_factory=dict)
    conversations: dict[tuple[str, str], Conversation] = field(default_factory=dict)


class HttpWorker:
    """Speaks FastChat's worker protocol to one worker.

    With a chatgate worker it uses the extensions the worker advertises (the worker applies
    the model's chat template and streams deltas). With a FastChat worker it does what
    FastChat's API server does: builds the prompt from the worker's conversation template,
    sizes `max_new_tokens` to the context, and turns cumulative text into deltas.
    """

    def __init__(self, *, http: httpx.AsyncClient, address: str, facts: WorkerFacts) -> None:
        self._http = http
        self.address = address.rstrip("/")
        self._facts = facts
        self._in_flight = facts.in_flight

    def _unavailable(self, exc: Exception | str) -> WorkerUnavailableError:
        return WorkerUnavailableError(f"The worker at {self.address} is unavailable: {exc}")

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[WorkerChunk]:
        self._in_flight[self.address] += 1
        try:
            details = await self.model_details()
            native = EXT_CHAT_TEMPLATE in details.chatgate_extensions
            if not native:
                params = await self._fastchat_params(params, details)
            body = params.model_copy(update={"delta": native}).model_dump(exclude_none=True)
            request = self._http.build_request(
                "POST", f"{self.address}/worker_generate_stream", json=body, timeout=None
            )
            chunks = self._stream(request)
            async for chunk in chunks if native else _deltas(chunks):
                yield chunk
        finally:
            self._in_flight[self.address] -= 1

    async def _fastchat_params(self, params: GenerateParams, details: ModelDetails) -> GenerateParams:
        """Parameters a FastChat worker understands: a rendered prompt and a sized budget."""
        if params.prompt_token_ids is not None:
            raise InvalidRequestError(
                "This model's worker takes text prompts only, not token ids.", param=params.prompt_param
            )
        update: dict[str, object] = {"messages": None}
        prompt = params.prompt or ""
        if params.messages is not None:
            conv = await self._conversation(params.model)
            prompt = render(conv, params.messages)
            stops = [conv.stop_str] if isinstance(conv.stop_str, str) else list(conv.stop_str or [])
            update |= {"stop": params.stop_list() + stops, "stop_token_ids": conv.stop_token_ids}
        count = await self.count_tokens(CountTokenRequest(prompt=prompt))
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

    async def _stream(self, request: httpx.Request) -> AsyncIterator[WorkerChunk]:
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        started = complete = False
        try:
            if response.status_code != 200:
                raise self._unavailable(f"HTTP {response.status_code}")
            async for chunk in _frames(response):
                if chunk.error_code:
                    raise _chunk_error(chunk)
                started = True
                yield chunk
            complete = True
        except httpx.TransportError as exc:
            if not started:
                raise self._unavailable(exc) from exc
            raise WorkerError(f"The worker at {self.address} failed mid-stream: {exc}") from exc
        finally:
            with anyio.CancelScope(shield=True):
                await _close(response, drop_connection=not complete)

    async def _post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        try:
            response = await self._http.post(f"{self.address}{path}", json=body)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        if response.status_code >= 500:
            raise self._unavailable(f"HTTP {response.status_code}")
        try:
            response.raise_for_status()
            result: dict[str, object] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise WorkerError(f"The worker at {self.address} answered badly: {exc}") from exc
        if isinstance(result.get("error_code"), int) and result["error_code"]:
            raise _chunk_error(WorkerChunk.model_validate(result))
        return result

    async def count_tokens(self, request: CountTokenRequest) -> int:
        result = await self._post("/count_token", request.model_dump(exclude_none=True))
        return int(str(result.get("count", 0)))

    async def embed(self, params: EmbedParams) -> EmbedResult:
        result = await self._post("/worker_get_embeddings", params.model_dump(exclude_none=True))
        return EmbedResult.model_validate(result)

    async def model_details(self) -> ModelDetails:
        if self.address not in self._facts.details:
            details = ModelDetails.model_validate(await self._post("/model_details", {}))
            self._facts.details[self.address] = details
        return self._facts.details[self.address]
