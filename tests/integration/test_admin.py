"""`/metrics` and `/ready` show a key only what it may see: with API keys configured, `/metrics`
(every model, every worker's address in a fleet, everyone's traffic) needs one of
`--admin-keys`; `/ready` shows other keys only the models they may use, and never a worker's
address."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from chatgate.api.app import create_api_app
from chatgate.api.workers.base import PoolSource, Worker, WorkerPool
from chatgate.engines.fake import FakeEngine
from chatgate.errors import ModelNotFoundError
from chatgate.settings import ApiProcessSettings
from tests.support.app import make_app, raw, running

pytestmark = pytest.mark.anyio

ADMIN, USER, SCOPED = "sk-admin", "sk-user", "sk-scoped"
WORKER_URL = "http://10.1.2.3:21002"


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({SCOPED: {"name": "scoped", "models": ["other-model"]}}))
    return path


async def get(app: FastAPI, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with raw(app) as http:
        return await http.get(path, headers=headers)


def two_models(tmp_path: Path, **settings: Any) -> FastAPI:
    return make_app(FakeEngine(), FakeEngine(name="other-model"), api_keys=[USER], api_keys_file=keys_file(tmp_path), **settings)


async def test_metrics_need_an_admin_key_once_keys_are_checked(tmp_path: Path) -> None:
    async with running(two_models(tmp_path, admin_keys=[ADMIN])) as app:
        for key in (USER, SCOPED):
            refused = await get(app, "/metrics", key)
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert error["code"] == "admin_key_required" and "fake-model" not in refused.text
        assert (await get(app, "/metrics", None)).status_code == 401
        scraped = await get(app, "/metrics", ADMIN)
        assert scraped.status_code == 200 and 'chatgate_workers{model="other-model"}' in scraped.text
        # An admin key is an API key too.
        assert (await get(app, "/v1/models", ADMIN)).status_code == 200


async def test_without_admin_keys_no_key_reads_metrics(tmp_path: Path) -> None:
    async with running(two_models(tmp_path)) as app:
        assert (await get(app, "/metrics", USER)).status_code == 403


async def test_without_any_key_the_server_is_open_as_before() -> None:
    async with running(make_app(FakeEngine())) as app:
        assert (await get(app, "/metrics", None)).status_code == 200
        assert (await get(app, "/ready", None)).json()["workers"] == {"fake-model": 1}


async def test_a_probe_without_a_key_gets_the_readiness_status_alone(tmp_path: Path) -> None:
    async with running(two_models(tmp_path, admin_keys=[ADMIN])) as app:
        probe = await get(app, "/ready", None)
        assert probe.status_code == 200 and probe.json() == {"status": "ready"}
        wrong = await get(app, "/ready", "sk-not-a-key")  # a key that is given is still checked
        assert wrong.status_code == 401
        assert (await get(app, "/metrics", None)).status_code == 401


async def test_ready_shows_a_key_only_the_models_it_may_use(tmp_path: Path) -> None:
    async with running(two_models(tmp_path, admin_keys=[ADMIN])) as app:
        scoped = await get(app, "/ready", SCOPED)
        assert scoped.status_code == 200 and scoped.json()["workers"] == {"other-model": 1}
        assert "fake-model" not in scoped.text
        assert (await get(app, "/ready", USER)).json()["workers"] == {"fake-model": 1, "other-model": 1}
        assert (await get(app, "/ready", ADMIN)).json()["workers"] == {"fake-model": 1, "other-model": 1}


class FleetPool:
    """A fleet's worker table as the API server sees it: one model, one remote worker."""

    async def models(self) -> list[str]:
        return ["fake-model"]

    async def worker_for(self, model: str, *, exclude: frozenset[str] = frozenset()) -> Worker:
        raise ModelNotFoundError.for_model(model)

    def report_failure(self, worker: Worker) -> None:
        """Nothing to report to."""

    def readiness(self) -> dict[str, int]:
        return {"fake-model": 1}

    def degraded(self) -> str | None:
        return None

    def load(self) -> list[tuple[str, int, int]]:
        return [(WORKER_URL, 3, 2)]


def fleet_pool() -> PoolSource:
    @contextlib.asynccontextmanager
    async def pool() -> AsyncIterator[WorkerPool]:
        yield FleetPool()

    return pool


async def test_in_a_fleet_worker_addresses_are_on_the_admins_metrics_only() -> None:
    app = create_api_app(ApiProcessSettings(api_keys=[USER], admin_keys=[ADMIN]), fleet_pool())
    async with running(app):
        assert (await get(app, "/metrics", USER)).status_code == 403
        ready = await get(app, "/ready", USER)
        assert ready.status_code == 200 and "10.1.2.3" not in ready.text
        scraped = await get(app, "/metrics", ADMIN)
        assert f'chatgate_worker_queue_length{{worker="{WORKER_URL}"}} 3.0' in scraped.text
        assert f'chatgate_worker_waiting_requests{{worker="{WORKER_URL}"}} 1.0' in scraped.text
