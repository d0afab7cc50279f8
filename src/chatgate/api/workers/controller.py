"""The pool of `chatgate api`: workers a controller knows, picked from a local copy of its table.

The pool keeps its own copy of the controller's worker table, refreshed in the background,
and picks workers from it with the controller's dispatch method, so no request waits on the
controller. A worker that fails before answering is taken out of the copy at once and
reported to the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from chatgate.api.workers.base import PoolSource, Worker, WorkerPool
from chatgate.api.workers.http import HttpWorker, WorkerFacts
from chatgate.controller.dispatch import METHODS
from chatgate.errors import ModelNotFoundError, NoHealthyWorkerError
from chatgate.protocol.worker import WorkerDown, WorkerEntry, WorkerTable
from chatgate.settings import ApiProcessSettings
from chatgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Load:
    """A worker as dispatch sees it: its table entry plus this server's own in-flight count."""

    address: str
    speed: float
    queue_length: int


class ControllerPool:
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

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
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
        return HttpWorker(http=self._http, address=pick.address, facts=self._facts)

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

    def report_failure(self, worker: Worker) -> None:
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


def controller_pool(settings: ApiProcessSettings) -> PoolSource:
    """Serve through workers a controller knows (`chatgate api`)."""

    @contextlib.asynccontextmanager
    async def pool() -> AsyncIterator[WorkerPool]:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits) as http:
            workers = ControllerPool(
                http=http, controller=settings.controller_address, refresh=settings.worker_table_refresh
            )
            refresher = asyncio.create_task(workers.run())
            try:
                yield workers
            finally:
                await cancel_and_wait(refresher)

    return pool
