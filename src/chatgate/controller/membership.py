"""Who joins the controller's registry and who leaves it, each time confirmed with the worker.

A registration is only a claim: before a worker joins, the controller calls the worker's own
`/worker_get_status` (with the fleet key) and records what the worker answers there. A report
that a worker is down is only a suspicion: the controller probes the worker and drops it only
if the probe fails. So neither a stranger nor a mistaken (or hostile) report changes the table.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from pydantic import ValidationError

from chatgate.controller.registry import Registry
from chatgate.errors import InvalidRequestError
from chatgate.protocol.worker import RegisterWorker, WorkerStatus

log = logging.getLogger(__name__)


class ProbeFailed(Exception):
    """The worker did not confirm itself; the message says why."""


class Membership:
    """Admits workers that answer a status probe; drops suspects that do not."""

    def __init__(self, *, registry: Registry, http: httpx.AsyncClient, probe_timeout: float) -> None:
        self._registry = registry
        self._http = http
        self._timeout = probe_timeout
        self._probing: dict[str, asyncio.Task[None]] = {}

    async def probe(self, address: str) -> WorkerStatus:
        """The worker's own status, or `ProbeFailed` with the reason."""
        try:
            response = await self._http.post(
                f"{address.rstrip('/')}/worker_get_status", json={}, timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            raise ProbeFailed(f"no answer from /worker_get_status ({type(exc).__name__}: {exc})") from exc
        if response.status_code in (401, 403):
            raise ProbeFailed("the worker refused the controller's fleet key")
        if response.status_code != 200:
            raise ProbeFailed(f"/worker_get_status answered HTTP {response.status_code}")
        try:
            return WorkerStatus.model_validate_json(response.content)
        except ValidationError as exc:
            raise ProbeFailed(f"/worker_get_status answered an invalid status: {exc.errors()[0]['msg']}") from exc

    async def admit(self, body: RegisterWorker) -> WorkerStatus:
        """Register the worker as its probe describes it; `InvalidRequestError` if it cannot be."""
        address = body.worker_name
        if not self._registry.has_room_for(address):
            raise InvalidRequestError("The controller's worker table is full.", param="worker_name")
        try:
            status = await self.probe(address)
        except ProbeFailed as exc:
            raise InvalidRequestError(
                f"The controller could not confirm the worker at {address}: {exc}.", param="worker_name"
            ) from exc
        self._registry.register(address, status, check_heart_beat=body.check_heart_beat)
        return status

    def suspect(self, address: str) -> None:
        """Probe a worker reported down, in the background; drop it if the probe fails."""
        if address in self._probing or not any(w.address == address for w in self._registry.workers()):
            return
        task = asyncio.get_running_loop().create_task(self._check(address))
        self._probing[address] = task
        task.add_done_callback(lambda _: self._probing.pop(address, None))

    async def leave(self, address: str) -> bool:
        """Drop a worker that says it is leaving, once its probe confirms it (a worker shutting
        down answers 503); False if it answers as a live worker (it stays)."""
        if not any(w.address == address for w in self._registry.workers()):
            return True
        try:
            await self.probe(address)
        except ProbeFailed as exc:
            self._registry.remove(address)
            log.info("worker %s is leaving (%s): dropped", address, exc)
            return True
        log.warning("worker %s asked to leave but answers its status probe: kept", address)
        return False

    async def _check(self, address: str) -> None:
        try:
            await self.probe(address)
        except ProbeFailed as exc:
            self._registry.remove(address)
            log.info("worker %s reported down and confirmed down (%s): dropped", address, exc)
            return
        log.info("worker %s reported down but answers its status probe: kept", address)

    async def settled(self) -> None:
        """Wait for the probes under way (tests, and a clean shutdown)."""
        while self._probing:
            await asyncio.gather(*self._probing.values(), return_exceptions=True)

    async def close(self) -> None:
        """Stop the probes under way."""
        for task in list(self._probing.values()):
            task.cancel()
        await asyncio.gather(*self._probing.values(), return_exceptions=True)
