"""The pool of `chatgate api`: workers a controller knows, picked from a local copy of its table.

The pool keeps its own copy of the controller's worker table, refreshed in the background,
and picks workers from it with the controller's dispatch method, so no request waits on the
controller, and a controller that is gone or frozen leaves the copy serving. A worker that
fails before answering is taken out of rotation at once and reported to the controller,
which probes it before dropping it.
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
from opentelemetry.trace import SpanKind

from chatgate import tracing
from chatgate.api.workers.base import PoolSource, Worker, WorkerPool
from chatgate.api.workers.http import Bounds, HttpWorker, WorkerFacts
from chatgate.controller.dispatch import METHODS
from chatgate.errors import ModelNotFoundError, NoHealthyWorkerError
from chatgate.fleet import fleet_client
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


# How long a worker this server saw fail stays out of its rotation while the controller
# probes it: it comes back earlier if the controller drops it and it registers again.
QUARANTINE = 10.0


class ControllerPool:
    """Routes from a local copy of the controller's worker table.

    The copy is kept while the controller cannot be reached (requests go on being served;
    `degraded()` says so). Workers that failed here stay out of rotation for `QUARANTINE`
    seconds, or until the controller drops them, and what is cached per worker is forgotten
    when the worker leaves the table.
    """

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        controller: str,
        refresh: float,
        control: httpx.AsyncClient | None = None,
        controller_timeout: float = 2.0,
        bounds: Bounds = Bounds(),
    ) -> None:
        self._http = http
        self._control = control or http
        self._controller = controller.rstrip("/")
        self._refresh_every = refresh
        self._controller_timeout = controller_timeout
        self._bounds = bounds
        self._table: list[WorkerEntry] = []
        self._dispatch = "shortest_queue"
        self._fetched = float("-inf")
        self._reachable = False
        self._down: dict[str, float] = {}
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
        """Fetch the worker table now (one fetch at a time); on failure keep the old one."""
        async with self._lock:
            try:
                # Within a request (a table miss) the call is a span of its trace, and the
                # controller's own span joins it; background refreshes trace nothing.
                with tracing.span("chatgate.controller list_workers", kind=SpanKind.CLIENT):
                    table = await self._fetch_table()
            except (httpx.HTTPError, ValueError) as exc:
                if self._reachable:
                    log.warning("controller %s unreachable: %s", self._controller, exc)
                self._reachable = False
                raise NoHealthyWorkerError("The controller cannot be reached.") from exc
            workers = table.workers
            if table.settling:  # a restarted controller: keep the workers not seen failing
                known = set(self._down) | {entry.address for entry in workers}
                workers = workers + [entry for entry in self._table if entry.address not in known]
            self._table, self._dispatch = workers, table.dispatch_method
            self._fetched, self._reachable = time.monotonic(), True
            self._forget_departed()

    def _forget_departed(self) -> None:
        """Drop what is cached about workers no longer in the table."""
        present = {entry.address for entry in self._table}
        now = time.monotonic()
        self._down = {a: t for a, t in self._down.items() if a in present and now - t < QUARANTINE}
        self._facts.forget(keep={(entry.address, model) for entry in self._table for model in entry.model_names})

    async def _fetch_table(self) -> WorkerTable:
        response = await self._control.post(f"{self._controller}/list_workers", timeout=self._controller_timeout)
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
        response = await self._control.post(f"{self._controller}{path}", json=body, timeout=self._controller_timeout)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def _ensure_table(self) -> None:
        if self._fetched == float("-inf"):
            await self.refresh()  # no table yet: there is nothing to serve from but the controller

    def _served(self) -> set[str]:
        return {name for entry in self._table for name in entry.model_names}

    async def models(self) -> list[str]:
        await self._ensure_table()
        return sorted(self._served())

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
        await self._ensure_table()
        candidates = self._candidates(model, exclude)
        if not candidates and model not in self._served() and self._reachable:
            with contextlib.suppress(NoHealthyWorkerError):
                await self.refresh()  # maybe it registered a moment ago
            candidates = self._candidates(model, exclude)
        if not candidates:
            if model in self._served():
                raise NoHealthyWorkerError(f"No healthy worker serves `{model}` right now.")
            raise ModelNotFoundError.for_model(model)
        pick = METHODS.get(self._dispatch, METHODS["shortest_queue"])(candidates)
        return HttpWorker(
            http=self._http, address=pick.address, model=model, facts=self._facts, bounds=self._bounds,
            on_failure=self.report_failure,
        )

    def _in_rotation(self) -> list[WorkerEntry]:
        return [e for e in self._table if e.address not in self._down]

    def _candidates(self, model: str, exclude: frozenset[str]) -> list[_Load]:
        return [
            _Load(
                address=e.address,
                speed=e.speed,
                queue_length=max(e.queue_length, self._in_flight[e.address]),
            )
            for e in self._in_rotation()
            if model in e.model_names and e.address not in exclude
        ]

    def report_failure(self, worker: Worker) -> None:
        if worker.address in self._down:
            return
        self._down[worker.address] = time.monotonic()
        self._facts.forget(drop=worker.address)  # a restarted worker may serve another model
        log.warning("worker %s failed; out of rotation", worker.address)
        task = asyncio.get_running_loop().create_task(self._report(worker.address))
        task.add_done_callback(lambda t: t.exception())

    async def _report(self, address: str) -> None:
        with contextlib.suppress(httpx.HTTPError), tracing.span("chatgate.controller report_worker_down", kind=SpanKind.CLIENT):
            await self._control.post(
                f"{self._controller}/report_worker_down",
                json=WorkerDown(worker_name=address).model_dump(),
                timeout=self._controller_timeout,
            )

    def load(self) -> list[tuple[str, int, int]]:
        return [
            (e.address, max(e.queue_length, self._in_flight[e.address]), self._in_flight[e.address])
            for e in self._in_rotation()
        ]

    def readiness(self) -> dict[str, int]:
        counts = dict.fromkeys(self._served(), 0)
        for entry in self._in_rotation():
            for name in entry.model_names:
                counts[name] += 1
        return counts

    def degraded(self) -> str | None:
        if self._reachable:
            return None
        age = time.monotonic() - self._fetched
        return f"the controller cannot be reached; serving from the worker table of {age:.0f}s ago"


def bounds_of(settings: ApiProcessSettings) -> Bounds:
    """The worker call bounds the settings ask for."""
    return Bounds(
        connect=settings.worker_connect_timeout,
        first_frame=settings.worker_first_frame_timeout,
        between_frames=settings.worker_frame_timeout,
        max_frame_bytes=settings.worker_max_frame_bytes,
        pool=settings.worker_pool_timeout,
        silence=settings.worker_silence_timeout,
        keepalive=settings.worker_keepalive_interval,
    )


def controller_pool(settings: ApiProcessSettings) -> PoolSource:
    """Serve through workers a controller knows (`chatgate api`)."""

    @contextlib.asynccontextmanager
    async def pool() -> AsyncIterator[WorkerPool]:
        bounds = bounds_of(settings)
        limits = httpx.Limits(max_connections=settings.worker_max_connections, max_keepalive_connections=64)
        # The controller gets a client of its own, so busy worker connections never delay it.
        async with (
            fleet_client(settings, timeout=bounds.timeout(bounds.first_frame), limits=limits) as http,
            fleet_client(settings, timeout=httpx.Timeout(settings.controller_timeout)) as control,
        ):
            workers = ControllerPool(
                http=http, control=control, controller=settings.controller_address,
                refresh=settings.worker_table_refresh, controller_timeout=settings.controller_timeout, bounds=bounds,
            )
            refresher = asyncio.create_task(workers.run())
            try:
                yield workers
            finally:
                await cancel_and_wait(refresher)

    return pool
