"""The worker seam's interface: a `Worker` (one worker, however it is reached) and a
`WorkerPool` (which worker serves model M).

Request handling depends only on these protocols, so it is the same code whether the workers
live in this process (`local.py`, `chatgate serve`) or behind HTTP (`http.py` and
`controller.py`, `chatgate api`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from chatgate.protocol import worker as wire


class Worker(Protocol):
    """One worker, as the API server talks to it."""

    address: str

    def generate_stream(self, params: wire.GenerateParams) -> AsyncIterator[wire.WorkerChunk]:
        """Stream delta chunks; a request error raises `ChatgateError` before the first one."""
        ...

    async def count_tokens(self, request: wire.CountTokenRequest) -> int:
        """Tokens the prompt takes on this worker's model."""
        ...

    async def score_pairs(self, params: wire.ScorePairsParams) -> wire.ScorePairsResult:
        """A cross-encoder's score of each text pair, and the tokens read."""
        ...

    async def embed(self, params: wire.EmbedParams) -> wire.EmbedResult:
        """Embedding vectors of the inputs, in order."""
        ...

    async def tokenize(self, params: wire.TokenizeParams) -> wire.TokenizeResult:
        """Token ids as generation would encode the prompt; `InvalidRequestError` from a
        worker without the extension."""
        ...

    async def detokenize(self, params: wire.DetokenizeParams) -> wire.DetokenizeResult:
        """The text of token ids."""
        ...

    async def model_details(self) -> wire.ModelDetails:
        """Context length and supported extensions."""
        ...


class WorkerPool(Protocol):
    """Knows which models are served and picks a worker for each request."""

    async def models(self) -> list[str]:
        """Names of the models served now."""
        ...

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
        """A worker for `model` other than `exclude`d addresses.

        Raises `ModelNotFoundError` for a model nobody serves, `NoHealthyWorkerError` when its
        workers are all down.
        """
        ...

    def report_failure(self, worker: Worker) -> None:
        """Take a worker that failed before answering out of rotation."""
        ...

    def readiness(self) -> dict[str, int]:
        """Healthy workers per served model."""
        ...

    def degraded(self) -> str | None:
        """Why the pool routes from possibly stale knowledge (e.g. its controller is gone), or None."""
        ...

    def load(self) -> list[tuple[str, int, int]]:
        """(worker, queued or running requests, running sequences) for each known worker."""
        ...


PoolSource = Callable[[], AbstractAsyncContextManager[WorkerPool]]
"""What `create_api_app` is given: opens the pool in the app's lifespan and closes it after."""
