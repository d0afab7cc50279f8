"""One contract for the three stored-response backends (memory, SQLite, a real Redis): records
and their events kept and read back, writes conditional on the kept status, the count and byte
bounds per owner (its own oldest go first), expiry, and for SQLite what a reopened file still
holds; a running response whose runner went silent reads as failed; an unreachable Redis is a plain 503."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from chatgate.api.stored.backend import RUNNING, Backend, Bounds, MemoryBackend, Record
from chatgate.api.stored.sqlite import SqliteBackend
from chatgate.api.stored.store import STALE, ResponseStore
from chatgate.engines.fake import FakeEngine
from chatgate.protocol.responses import ResponseObject, ResponsesRequest
from tests.support.app import make_app, raw, running, sdk
from tests.support.polling import apoll
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.anyio


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Make = Callable[[Bounds], Awaitable[Backend]]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """Opens a backend of the parameter's kind with the bounds given (closed after the test)."""
    opened: list[Backend] = []

    async def open_one(bounds: Bounds) -> Backend:
        backend: Backend
        if request.param == "memory":
            backend = MemoryBackend(bounds)
        elif request.param == "sqlite":
            backend = await SqliteBackend.open(tmp_path / f"{uuid.uuid4().hex}.sqlite3", bounds)
        else:
            from chatgate.api.stored.redis_backend import RedisBackend

            backend = RedisBackend(request.getfixturevalue("redis_url"), bounds, prefix=f"test:{uuid.uuid4().hex}")
        opened.append(backend)
        return backend

    yield open_one
    for backend in opened:
        await backend.close()


def rec(index: int, *, status: str = "completed", size: int = 10, owner: str = "k") -> Record:
    return Record(id=f"resp_{index}", owner=owner, status=status, data="x" * size)


WIDE = Bounds(ttl=3600, max_count=1000, max_bytes=10**7)


async def test_records_and_events_round_trip(make: Make) -> None:
    backend = await make(WIDE)
    assert await backend.put(rec(1), events=["e0", "e1"])
    got = await backend.get("resp_1")
    assert got is not None and (got.owner, got.status, got.data, got.size) == ("k", "completed", "x" * 10, 14)
    assert await backend.events("resp_1", 0) == ["e0", "e1"] and await backend.events("resp_1", 1) == ["e1"]
    assert await backend.put(rec(1, size=5))  # no events given: they stay
    assert await backend.events("resp_1", 0) == ["e0", "e1"]
    await backend.add_events("resp_1", ["e2", "e3"], 2)
    assert await backend.events("resp_1", 2) == ["e2", "e3"]
    assert await backend.events("resp_1", 9) == []
    assert await backend.get("resp_nope") is None and await backend.events("resp_nope", 0) == []
    await backend.add_events("resp_nope", ["e"], 0)  # no record: nothing kept
    assert await backend.events("resp_nope", 0) == []
    assert await backend.delete("resp_1") and not await backend.delete("resp_1")
    assert await backend.get("resp_1") is None and await backend.events("resp_1", 0) == []


async def test_a_conditional_write_needs_the_kept_status(make: Make) -> None:
    backend = await make(WIDE)
    assert not await backend.put(rec(1, status="cancelled"), only_from=RUNNING)  # nothing kept yet
    assert await backend.put(rec(1, status="queued"))
    assert await backend.put(rec(1, status="in_progress"), only_from=RUNNING)
    assert await backend.put(rec(1, status="cancelled"), only_from=RUNNING)
    assert not await backend.put(rec(1, status="completed"), only_from=RUNNING)  # cancelled stays
    got = await backend.get("resp_1")
    assert got is not None and got.status == "cancelled"


async def test_the_oldest_go_first_by_count_and_by_bytes(make: Make) -> None:
    backend = await make(Bounds(ttl=3600, max_count=3, max_bytes=2000))
    for index in range(5):
        assert await backend.put(rec(index))
    assert [await backend.get(f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
    for index in range(10, 14):
        assert await backend.put(rec(index, size=700))
    assert [await backend.get(f"resp_{i}") is not None for i in range(10, 14)] == [False, False, True, True]
    assert not await backend.put(rec(99, size=3000))  # larger than the whole budget: not kept
    assert await backend.get("resp_99") is None
    await backend.add_events("resp_13", ["y" * 500], 0)  # events count too: the next write makes room
    assert await backend.put(rec(20, size=700))
    assert await backend.get("resp_12") is None and await backend.get("resp_13") is not None


async def test_an_owner_over_its_quota_loses_only_its_own_oldest(make: Make) -> None:
    backend = await make(Bounds(ttl=3600, max_count=2, max_bytes=1000))
    assert await backend.put(rec(1, owner="a"))
    assert await backend.put(rec(2, owner="a", size=600))
    for index in range(10, 15):  # b makes many more than its quota, by count then by bytes
        assert await backend.put(rec(index, owner="b", size=300 if index < 14 else 900))
    assert await backend.get("resp_1") is not None and await backend.get("resp_2") is not None
    assert [await backend.get(f"resp_{i}") is not None for i in range(10, 15)] == [False] * 4 + [True]
    await backend.add_events("resp_2", ["y" * 300], 0)  # a's events count against a's quota only
    assert await backend.put(rec(3, owner="a", size=150))  # a's two oldest go: by count, then by bytes
    assert await backend.get("resp_1") is None and await backend.get("resp_2") is None
    assert await backend.get("resp_14") is not None
    assert await backend.put(rec(15, owner="b", size=900))  # b's oldest goes, a's stays
    assert await backend.get("resp_14") is None and await backend.get("resp_3") is not None
    assert await backend.put(rec(4, owner="a", size=800))
    assert await backend.delete("resp_4")  # forgetting frees the owner's quota
    assert await backend.put(rec(5, owner="a", size=800))
    assert await backend.get("resp_3") is not None and await backend.get("resp_15") is not None


async def test_records_expire(make: Make, request: pytest.FixtureRequest) -> None:
    backend = await make(Bounds(ttl=0.5, max_count=10, max_bytes=10**6))
    assert await backend.put(rec(1), events=["e"])
    assert await backend.get("resp_1") is not None

    async def gone() -> bool:
        return await backend.get("resp_1") is None

    waited = await apoll(gone, what="the record expiring", timeout=5)
    assert waited >= 0.2
    assert not await backend.put(rec(1, status="cancelled"), only_from=RUNNING)


async def test_sqlite_keeps_what_was_acknowledged_across_a_reopen(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "kept.sqlite3"
    first = await SqliteBackend.open(path, WIDE, clock=clock)
    assert await first.put(rec(1), events=["e0"])
    await first.add_events("resp_1", ["e1"], 1)
    # No close: a process that dies keeps its committed writes (WAL, synchronous=FULL).
    again = await SqliteBackend.open(path, WIDE, clock=clock)
    got = await again.get("resp_1")
    assert got is not None and got.data == "x" * 10 and await again.events("resp_1", 0) == ["e0", "e1"]
    mode = again.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal" and again.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    clock.now += 3601  # expired: invisible at once, and purged from the file by the next write
    assert await again.get("resp_1") is None
    assert await again.put(rec(2))
    assert again.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    await first.close()
    await again.close()


async def test_a_running_response_whose_runner_went_silent_reads_as_failed() -> None:
    clock = Clock()
    clock.now = time.time()
    store = ResponseStore(MemoryBackend(WIDE, clock=clock))
    running = ResponseObject(id="resp_1", created_at=0, status="in_progress", model="m", background=True)
    await store.keep(ResponsesRequest(model="m", input="hi"), running, [], "k")
    assert (await store.get("resp_1", "k")).response.status == "in_progress"
    clock.now -= STALE + 1  # its last write, seen from now, is older than STALE
    await store.keep(ResponsesRequest(model="m", input="hi"), running, [], "k")
    seen = (await store.get("resp_1", "k")).response
    assert seen.status == "failed" and seen.error is not None and "stopped" in seen.error["message"]


async def test_an_unreachable_redis_is_a_503_that_does_not_name_it(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started: nothing listens on its port
    async with running(make_app(FakeEngine(), redis_url=server.url, responses_store="auto")) as app, raw(app) as http:
        created = await http.post("/v1/responses", json={"model": "fake-model", "input": "hi"})
        got = await http.get("/v1/responses/resp_1")
        unstored = await http.post("/v1/responses", json={"model": "fake-model", "input": "hi", "store": False})
    for r in (created, got):
        assert r.status_code == 503 and r.json()["error"]["message"] == "The response store is unavailable; retry shortly."
        assert str(server.port) not in r.text
    assert unstored.status_code == 200  # what needs no store is served


async def test_a_redis_with_a_password_serves_through_a_url_carrying_it(tmp_path: Path) -> None:
    """The Kubernetes recipe's Redis requires a password, which the API servers' URL carries
    (`redis://:<password>@host:port/0`); without it the store is a 503 that names neither."""
    server = RedisServer(tmp_path, password="s3cret-pass")
    server.start()
    try:
        guarded = f"redis://:s3cret-pass@127.0.0.1:{server.port}/0"
        async with running(make_app(FakeEngine(), api_keys=["sk-a"], redis_url=guarded, responses_store="auto")) as app:
            client = sdk(app, "sk-a")
            made = await client.responses.create(model="fake-model", input="hi", max_output_tokens=5)
            assert (await client.responses.retrieve(made.id)).id == made.id
        async with running(make_app(FakeEngine(), redis_url=server.url, responses_store="auto")) as app, raw(app) as http:
            refused = await http.post("/v1/responses", json={"model": "fake-model", "input": "hi"})
        assert refused.status_code == 503 and "s3cret" not in refused.text and str(server.port) not in refused.text
    finally:
        server.stop()


async def test_sqlite_purges_expired_rows_without_a_write(tmp_path: Path) -> None:
    clock = Clock()
    backend = await SqliteBackend.open(tmp_path / "p.sqlite3", WIDE, clock=clock)
    assert await backend.put(rec(1), events=["e"])
    clock.now += 3601
    task = asyncio.create_task(backend._purge_every(0.05))  # the minute's round, made short
    try:
        await apoll(lambda: backend.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0, what="the purge", timeout=5)
    finally:
        task.cancel()
    assert backend.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    await backend.close()
