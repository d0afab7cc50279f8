"""The HTTP router and worker client: FastChat's controller/worker protocol, spoken by `chatgate api`.

The router keeps its own copy of the controller's worker table, refreshed in the background,
and picks workers from it with the controller's dispatch method, so no request waits on the
controller. A worker that cannot be reached, or fails before its first byte, is taken out of
the copy at once and reported to the controller; the caller retries elsewhere. Transport
failures become chatgate errors here, at the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from dataclasses import dataclass, field

import anyio
import httpx

from chatgate.api.clients import WorkerClient
from chatgate.controller.dispatch import METHODS
from chatgate.errors import (
    ChatgateError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    NoHealthyWorkerError,
    WorkerError,
    WorkerUnavailableError,
    from_fastchat_code,
)
from chatgate.protocol.conversation import Conversation, render
from chatgate.protocol.worker import (
    EXT_CHAT_TEMPLATE,
    CountTokenRequest,
    EmbedParams,
    EmbedResult,
    GenerateParams,
    ModelDetails,
    WorkerChunk,
    WorkerDown,
    WorkerEntry,
    WorkerTable,
)

log = logging.getLogger(__name__)


def _chunk_error(chunk: WorkerChunk) -> ChatgateError:
    return from_fastchat_code(chunk.error_code, chunk.text, param=chunk.param)


async def _frames(response: httpx.Response) -> AsyncIterator[WorkerChunk]:
    """The NUL-delimited JSON chunks of a worker's stream."""
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        *frames, buffer = buffer.split(b"\0")
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


class HttpWorkerClient:
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


@dataclass(frozen=True)
class _Load:
    """A worker as dispatch sees it: its table entry plus this server's own in-flight count."""

    address: str
    speed: float
    queue_length: int


class ControllerRouter:
    """Routes from a local copy of the controller's worker table."""

    def __init__(self, *, http: httpx.AsyncClient, controller: str, refresh: float) -> None:
        self._http = http
        self._controller = controller.rstrip("/")
        self._refresh_every = refresh
        self._table: list[WorkerEntry] = []
        self._dispatch = "shortest_queue"
        self._fetched = float("-inf")
        self._known_models: set[str] = set()
        self._facts = WorkerFacts()
        self._in_flight = self._facts.in_flight
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        """Keep the table fresh until cancelled."""
        while True:
            with contextlib.suppress(NoHealthyWorkerError):
                await self.refresh()
            await asyncio.sleep(self._refresh_every)

    async def refresh(self) -> None:
        """Fetch the worker table now (one fetch at a time)."""
        async with self._lock:
            try:
                table = await self._fetch_table()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("controller %s unreachable: %s", self._controller, exc)
                raise NoHealthyWorkerError("The controller cannot be reached.") from exc
            self._table, self._dispatch = table.workers, table.dispatch_method
            self._known_models |= {name for entry in self._table for name in entry.model_names}
            self._fetched = time.monotonic()

    async def _fetch_table(self) -> WorkerTable:
        response = await self._http.post(f"{self._controller}/list_workers")
        if response.status_code != 404:
            response.raise_for_status()
            return WorkerTable.model_validate(response.json())
        # A FastChat controller has no worker table to share: ask it for a worker per model.
        models = (await self._post_controller("/list_models", {})).get("models", [])
        by_address: dict[str, WorkerEntry] = {}
        for model in models:
            address = str((await self._post_controller("/get_worker_address", {"model": model})).get("address", ""))
            if address:
                entry = by_address.setdefault(address, WorkerEntry(address=address, model_names=[]))
                entry.model_names.append(str(model))
        return WorkerTable(workers=list(by_address.values()))

    async def _post_controller(self, path: str, body: dict[str, object]) -> dict[str, Any]:
        response = await self._http.post(f"{self._controller}{path}", json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def _ensure_table(self) -> None:
        if time.monotonic() - self._fetched > max(self._refresh_every * 3, 1.0):
            await self.refresh()  # the background refresh is not running or keeps failing

    async def models(self) -> list[str]:
        await self._ensure_table()
        return sorted({name for entry in self._table for name in entry.model_names})

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> WorkerClient:
        await self._ensure_table()
        candidates = self._candidates(model, exclude)
        if not candidates and model not in self._known_models:
            await self.refresh()  # maybe it registered a moment ago
            candidates = self._candidates(model, exclude)
        if not candidates:
            if model in self._known_models:
                raise NoHealthyWorkerError(f"No healthy worker serves `{model}` right now.")
            raise ModelNotFoundError.for_model(model)
        pick = METHODS.get(self._dispatch, METHODS["shortest_queue"])(candidates)
        return HttpWorkerClient(http=self._http, address=pick.address, facts=self._facts)

    def _candidates(self, model: str, exclude: frozenset[str]) -> list[_Load]:
        return [
            _Load(
                address=e.address,
                speed=e.speed,
                queue_length=max(e.queue_length, self._in_flight[e.address]),
            )
            for e in self._table
            if model in e.model_names and e.address not in exclude
        ]

    def report_failure(self, worker: WorkerClient) -> None:
        self._table = [e for e in self._table if e.address != worker.address]
        self._facts.details.pop(worker.address, None)  # a restarted worker may serve another model
        log.warning("worker %s failed; out of rotation", worker.address)
        task = asyncio.get_running_loop().create_task(self._report(worker.address))
        task.add_done_callback(lambda t: t.exception())

    async def _report(self, address: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self._http.post(
                f"{self._controller}/report_worker_down",
                json=WorkerDown(worker_name=address).model_dump(),
                timeout=2.0,
            )

    def load(self) -> list[tuple[str, int, int]]:
        return [
            (e.address, max(e.queue_length, self._in_flight[e.address]), self._in_flight[e.address])
            for e in self._table
        ]

    def readiness(self) -> dict[str, int]:
        counts = {model: 0 for model in self._known_models}
        for entry in self._table:
            for name in entry.model_names:
                counts[name] = counts.get(name, 0) + 1
        return counts
