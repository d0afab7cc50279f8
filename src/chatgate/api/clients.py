"""The API server's two seams: a router (which worker serves model M) and a worker client.

Each has an in-process implementation, used by `chatgate serve`, and an HTTP one that speaks
FastChat's controller/worker protocol, used by `chatgate api`. Request handling depends only on
the `Router` and `WorkerClient` protocols, so it is the same code in both modes. Transport
failures are translated into chatgate errors here, at the boundary.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Protocol

import anyio
import httpx

from chatgate.errors import ChatgateError, ModelNotFoundError, NoHealthyWorkerError, WorkerError, from_fastchat_code
from chatgate.protocol.worker import (
    CountTokenRequest,
    EmbedParams,
    EmbedResult,
    GenerateParams,
    ModelDetails,
    WorkerChunk,
    WorkerEntry,
    WorkerTable,
)
from chatgate.worker.service import WorkerService

log = logging.getLogger(__name__)


class WorkerClient(Protocol):
    """Talks to one worker."""

    def generate_stream(self, params: GenerateParams) -> AsyncIterator[WorkerChunk]:
        """Stream delta chunks; a request error raises `ChatgateError` before the first one."""
        ...

    async def count_tokens(self, request: CountTokenRequest) -> int:
        """Tokens the prompt takes on this worker's model."""
        ...

    async def embed(self, params: EmbedParams) -> EmbedResult:
        """Embedding vectors of the inputs, in order."""
        ...

    async def model_details(self) -> ModelDetails:
        """Context length and supported extensions."""
        ...


class Router(Protocol):
    """Knows which models are served and by which worker."""

    async def models(self) -> list[str]:
        """Names of the models served now."""
        ...

    async def worker_for(self, model: str) -> WorkerClient:
        """A worker for `model`; raises `ModelNotFoundError` or `NoHealthyWorkerError`."""
        ...


# In-process ------------------------------------------------------------------------------


class LocalWorkerClient:
    """Calls a `WorkerService` in the same process."""

    def __init__(self, service: WorkerService) -> None:
        self._service = service

    def generate_stream(self, params: GenerateParams) -> AsyncIterator[WorkerChunk]:
        return self._service.generate(params.model_copy(update={"delta": True}))

    async def count_tokens(self, request: CountTokenRequest) -> int:
        return self._service.count_tokens(request)

    async def embed(self, params: EmbedParams) -> EmbedResult:
        return await self._service.embed(params)

    async def model_details(self) -> ModelDetails:
        return self._service.details()


class LocalRouter:
    """Routes to workers living in this process."""

    def __init__(self, services: list[WorkerService]) -> None:
        self._clients: dict[str, LocalWorkerClient] = {}
        for service in services:
            for name in service.model_names:
                self._clients[name] = LocalWorkerClient(service)

    async def models(self) -> list[str]:
        return list(self._clients)

    async def worker_for(self, model: str) -> WorkerClient:
        try:
            return self._clients[model]
        except KeyError:
            raise ModelNotFoundError.for_model(model) from None


# Over HTTP ---------------------------------------------------------------------------------


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


async def _close(response: httpx.Response, *, drop_connection: bool) -> None:
    """Close a worker response; an unfinished one also closes its connection.

    Closing the connection is what tells the worker to stop generating. It is done directly
    because httpx's own cleanup can itself be cancelled when the client's request is.
    """
    network_stream = response.extensions.get("network_stream") if drop_connection else None
    if network_stream is not None:
        await network_stream.aclose()
    await response.aclose()


class HttpWorkerClient:
    """Speaks FastChat's worker protocol (with chatgate's delta extension) to one worker."""

    def __init__(self, *, http: httpx.AsyncClient, address: str) -> None:
        self._http = http
        self.address = address.rstrip("/")

    async def generate_stream(self, params: GenerateParams) -> AsyncIterator[WorkerChunk]:
        body = params.model_copy(update={"delta": True}).model_dump(exclude_none=True)
        request = self._http.build_request(
            "POST", f"{self.address}/worker_generate_stream", json=body, timeout=None
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise NoHealthyWorkerError(f"The worker for {params.model!r} cannot be reached.") from exc
        complete = False
        try:
            if response.status_code != 200:
                raise WorkerError(f"worker answered HTTP {response.status_code}")
            async for chunk in _frames(response):
                if chunk.error_code:
                    raise _chunk_error(chunk)
                yield chunk
            complete = True
        except httpx.TransportError as exc:
            raise WorkerError(f"worker {self.address} failed: {exc}") from exc
        finally:
            with anyio.CancelScope(shield=True):
                await _close(response, drop_connection=not complete)

    async def _post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        try:
            response = await self._http.post(f"{self.address}{path}", json=body)
            response.raise_for_status()
            result: dict[str, object] = response.json()
            return result
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise WorkerError(f"worker {self.address} failed: {exc}") from exc

    async def count_tokens(self, request: CountTokenRequest) -> int:
        result = await self._post("/count_token", request.model_dump(exclude_none=True))
        return int(str(result.get("count", 0)))

    async def embed(self, params: EmbedParams) -> EmbedResult:
        result = await self._post("/worker_get_embeddings", params.model_dump(exclude_none=True))
        if result.get("error_code"):
            raise _chunk_error(WorkerChunk.model_validate(result))
        return EmbedResult.model_validate(result)

    async def model_details(self) -> ModelDetails:
        return ModelDetails.model_validate(await self._post("/model_details", {}))


class ControllerRouter:
    """Routes with a copy of the controller's worker table, refreshed when stale or on a miss.

    The controller is asked at most once per `ttl` seconds, never on every request.
    """

    def __init__(self, *, http: httpx.AsyncClient, controller: str, ttl: float) -> None:
        self._http = http
        self._controller = controller.rstrip("/")
        self._ttl = ttl
        self._table: list[WorkerEntry] = []
        self._fetched = float("-inf")

    async def _refresh(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._fetched < self._ttl:
            return
        try:
            response = await self._http.post(f"{self._controller}/list_workers")
            response.raise_for_status()
            self._table = WorkerTable.model_validate(response.json()).workers
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("controller %s unreachable: %s", self._controller, exc)
            if not self._table:
                raise NoHealthyWorkerError("The controller cannot be reached.") from exc
            return
        self._fetched = time.monotonic()

    async def models(self) -> list[str]:
        await self._refresh()
        return sorted({name for entry in self._table for name in entry.model_names})

    async def worker_for(self, model: str) -> WorkerClient:
        await self._refresh()
        candidates = [e for e in self._table if model in e.model_names]
        if not candidates:
            await self._refresh(force=True)
            candidates = [e for e in self._table if model in e.model_names]
        if not candidates:
            raise ModelNotFoundError.for_model(model)
        best = min(e.queue_length / max(e.speed, 1e-6) for e in candidates)
        pick = random.choice([e for e in candidates if e.queue_length / max(e.speed, 1e-6) == best])
        return HttpWorkerClient(http=self._http, address=pick.address)
