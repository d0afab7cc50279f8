"""FastChat's controller endpoints (and chatgate's `/list_workers`, `/report_worker_down`,
`/unregister_worker`): thin adapters from HTTP to the app's `Registry`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request

from chatgate.controller.dispatch import METHODS
from chatgate.controller.membership import Membership
from chatgate.controller.registry import Registry
from chatgate.protocol.worker import HeartBeat, RegisterWorker, WorkerDown, WorkerTable

log = logging.getLogger(__name__)

router = APIRouter()


@dataclass(frozen=True)
class ControllerState:
    """What the controller's routes are handed: the registry, the dispatch method's name, and
    until when (monotonic) the table may still be missing workers that have not re-registered."""

    registry: Registry
    dispatch_method: str
    settle_until: float = 0.0


def controller_state(request: Request) -> ControllerState:
    """Route dependency: the app's state."""
    state: ControllerState = request.app.state.controller
    return state


def worker_registry(request: Request) -> Registry:
    """Route dependency: the app's worker registry."""
    return controller_state(request).registry


Workers = Depends(worker_registry)


def membership(request: Request) -> Membership:
    """Route dependency: who admits and drops workers (made in the app's lifespan)."""
    service: Membership = request.app.state.membership
    return service


Members = Depends(membership)


@router.get("/ready")
async def ready() -> dict[str, str]:
    """The controller is ready as soon as it serves HTTP."""
    return {"status": "ready"}


@router.post("/register_worker")
async def register_worker(body: RegisterWorker, members: Membership = Members) -> dict[str, bool]:
    """Add or replace a worker, as its own status probe describes it (400 if it cannot)."""
    status = await members.admit(body)
    log.info("registered worker %s for %s", body.worker_name, status.model_names)
    return {"ok": True}


@router.post("/receive_heart_beat")
async def receive_heart_beat(body: HeartBeat, registry: Registry = Workers) -> dict[str, bool]:
    """Record a heartbeat; `exist: false` tells a forgotten worker to register again."""
    return {"exist": registry.heartbeat(body.worker_name, body.queue_length)}


@router.post("/refresh_all_workers")
async def refresh_all_workers(registry: Registry = Workers) -> dict[str, bool]:
    """Drop workers whose heartbeats stopped."""
    registry.expire()
    return {"ok": True}


@router.post("/list_models")
@router.post("/list_language_models")
async def list_models(registry: Registry = Workers) -> dict[str, list[str]]:
    """Models some live worker serves."""
    return {"models": registry.models()}


@router.post("/list_workers")
async def list_workers(state: ControllerState = Depends(controller_state)) -> WorkerTable:
    """The worker table API servers dispatch from, with the dispatch method to use."""
    return WorkerTable(
        workers=[w.entry() for w in state.registry.workers()],
        dispatch_method=state.dispatch_method,
        settling=time.monotonic() < state.settle_until,
    )


@router.post("/report_worker_down")
async def report_worker_down(body: WorkerDown, members: Membership = Members) -> dict[str, bool]:
    """Probe a worker an API server could not reach; it leaves the table only if the probe fails."""
    members.suspect(body.worker_name)
    log.info("worker %s reported down", body.worker_name)
    return {"ok": True}


@router.post("/unregister_worker")
async def unregister_worker(body: WorkerDown, members: Membership = Members) -> dict[str, bool]:
    """A worker shutting down leaves the table at once (confirmed by probing it: it answers 503)."""
    return {"ok": await members.leave(body.worker_name)}


@router.post("/get_worker_address")
async def get_worker_address(
    body: dict[str, str], state: ControllerState = Depends(controller_state)
) -> dict[str, str]:
    """One worker for the model, picked by the dispatch method ("" when none serves it)."""
    workers = state.registry.workers(body.get("model"))
    return {"address": METHODS[state.dispatch_method](workers).address if workers else ""}


@router.post("/worker_get_status")
async def worker_get_status(registry: Registry = Workers) -> dict[str, object]:
    """The fleet's totals, as FastChat's controller reports them."""
    workers = registry.workers()
    return {
        "model_names": registry.models(),
        "speed": sum(w.speed for w in workers),
        "queue_length": sum(w.queue_length for w in workers),
    }
