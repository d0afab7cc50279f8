"""A worker's registration with the controller and its periodic heartbeat."""

from __future__ import annotations

import asyncio
import logging

import httpx

from chatgate.protocol.worker import HeartBeat, RegisterWorker, WorkerDown
from chatgate.worker.served import ServedModels

log = logging.getLogger(__name__)

# Seconds the controller may take to confirm a departure (it probes the worker, which answers at once).
LEAVE_TIMEOUT = 5.0


class Heartbeat:
    """Registers the worker and all its models' names, then reports its queue length (summed
    over its models) every interval."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        controller: str,
        address: str,
        models: ServedModels,
        interval: float,
    ) -> None:
        self._http = http
        self._controller = controller.rstrip("/")
        self._address = address
        self._models = models
        self._interval = interval
        self._registered_names: list[str] = []

    async def register(self) -> None:
        """Announce this worker and its models to the controller."""
        status = self._models.status()
        body = RegisterWorker(worker_name=self._address, worker_status=status)
        response = await self._http.post(
            f"{self._controller}/register_worker", json=body.model_dump()
        )
        if response.status_code in (400, 401):  # the controller says why: log it, retry later
            log.warning("the controller refused this worker: %s", response.text[:500])
        response.raise_for_status()
        self._registered_names = list(status.model_names)

    async def beat(self) -> None:
        """Send one heartbeat; register again if the controller has forgotten us, or if the
        models served changed (a LoRA adapter loaded or unloaded), so it learns them now."""
        if self._models.model_names != self._registered_names:
            await self.register()
            return
        body = HeartBeat(worker_name=self._address, queue_length=self._models.status().queue_length)
        response = await self._http.post(
            f"{self._controller}/receive_heart_beat", json=body.model_dump()
        )
        response.raise_for_status()
        if not response.json().get("exist", False):
            await self.register()

    async def run(self) -> None:
        """Register and beat until cancelled; a missing controller is retried, never fatal."""
        registered = False
        while True:
            try:
                if registered:
                    await self.beat()
                else:
                    await self.register()
                    registered = True
            except httpx.HTTPError as exc:
                log.warning("controller %s unreachable: %s", self._controller, exc)
            await asyncio.sleep(self._interval)

    async def leave(self) -> None:
        """Ask the controller to drop this worker now: it is shutting down, and answers the
        controller's probe with 503. (A FastChat controller has no such call; it drops the
        worker when its heartbeats stop.) Failures are logged: the worker leaves regardless."""
        body = WorkerDown(worker_name=self._address)
        try:
            response = await self._http.post(
                f"{self._controller}/unregister_worker", json=body.model_dump(), timeout=LEAVE_TIMEOUT
            )
        except httpx.HTTPError as exc:
            log.warning("could not deregister from controller %s: %s", self._controller, exc)
            return
        if response.status_code == 404:
            log.info("controller %s cannot deregister workers; it drops this one when heartbeats stop", self._controller)
        elif response.status_code != 200 or not response.json().get("ok"):
            log.warning("controller %s did not deregister this worker: %s", self._controller, response.text[:500])
        else:
            log.info("deregistered from controller %s", self._controller)
