"""Stored responses in a SQLite file (the default: `<cache dir>/responses.sqlite3`).

Durability: every write is one transaction committed before the call returns, so before the
client is answered; the journal is WAL with `synchronous=FULL`, so a committed write survives a
crash of the process and of the machine (NORMAL would survive the process only). Several
processes may share the file (WAL readers do not block the writer; a writer waits up to
`busy_timeout` for another).

Every call runs in a worker thread, one at a time per backend (the connection is not shared
between threads at once): the event loop never waits on the disk. Expired rows are invisible to
reads at once, and deleted from the file every minute (and by a write, at most once a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio

from chatgate.api.stored.backend import Bounds, Record

T = TypeVar("T")
log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, data TEXT NOT NULL,
    size INTEGER NOT NULL, expires REAL NOT NULL, updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires);
CREATE INDEX IF NOT EXISTS responses_by_owner ON responses (owner, expires);
CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (id, seq)
) WITHOUT ROWID;
"""

PURGE_EVERY = 60.0  # seconds between deletions of expired rows


class SqliteBackend:
    """The `Backend` over one SQLite file."""

    def __init__(self, path: Path, bounds: Bounds, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._bounds = bounds
        self._clock = clock
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None
        self._purged = 0.0
        self._purging: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, bounds: Bounds, *, clock: Callable[[], float] = time.time) -> SqliteBackend:
        """Open (creating) the file and its tables, in a thread."""
        backend = cls(path, bounds, clock=clock)
        await backend._run(backend._connect)
        backend._purging = asyncio.create_task(backend._purge_every(PURGE_EVERY), name="purge stored responses")
        return backend

    async def _purge_every(self, seconds: float) -> None:
        """Delete expired rows every `seconds`, written to or not, until closed."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self._run(lambda: self._purge(force=True))
            except sqlite3.Error:  # a busy or full disk now: the next round tries again
                log.warning("could not purge expired stored responses", exc_info=True)

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(_SCHEMA)
        self._db = db
        self._purge(force=True)

    async def _run(self, work: Callable[[], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work()

        return await anyio.to_thread.run_sync(locked, limiter=self._limiter)

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection."""
        assert self._db is not None, "SqliteBackend used before open()"
        return self._db

    def _purge(self, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._purged < PURGE_EVERY:
            return
        self._purged = now
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM events WHERE id IN (SELECT id FROM responses WHERE expires <= ?)", (now,))
            self.db.execute("DELETE FROM responses WHERE expires <= ?", (now,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _make_room(self, owner: str, size: int, now: float) -> None:
        """Delete `owner`'s own oldest rows until one more of `size` bytes fits its quota (inside
        the caller's transaction): another owner's rows are never touched."""
        db, b = self.db, self._bounds
        count, total = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses WHERE owner = ? AND expires > ?", (owner, now)
        ).fetchone()
        if count < b.max_count and total + size <= b.max_bytes:
            return
        doomed = []
        for response_id, kept_size in db.execute("SELECT id, size FROM responses WHERE owner = ? AND expires > ? ORDER BY expires", (owner, now)):
            if count < b.max_count and total + size <= b.max_bytes:
                break
            doomed.append((response_id,))
            count, total = count - 1, total - kept_size
        db.executemany("DELETE FROM events WHERE id = ?", doomed)
        db.executemany("DELETE FROM responses WHERE id = ?", doomed)

    def _put(self, record: Record, events: list[str] | None, only_from: frozenset[str] | None) -> bool:
        self._purge()
        now = self._clock()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT status FROM responses WHERE id = ? AND expires > ?", (record.id, now)).fetchone()
            if only_from is not None and (row is None or row[0] not in only_from):
                db.execute("ROLLBACK")
                return False
            if events is None:
                (events_size,) = db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM events WHERE id = ?", (record.id,)).fetchone()
            else:
                events_size = sum(map(len, events))
            size = len(record.data) + events_size
            db.execute("DELETE FROM responses WHERE id = ?", (record.id,))
            if events is not None or size > self._bounds.max_bytes:
                db.execute("DELETE FROM events WHERE id = ?", (record.id,))
            if size > self._bounds.max_bytes:
                db.execute("COMMIT")
                return False
            self._make_room(record.owner, size, now)
            db.execute(
                "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.owner, record.status, record.data, size, now + self._bounds.ttl, now),
            )
            if events is not None:
                db.executemany("INSERT INTO events VALUES (?, ?, ?)", [(record.id, i, e) for i, e in enumerate(events)])
            db.execute("COMMIT")
            return True
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    async def put(self, record: Record, *, events: list[str] | None = None, only_from: frozenset[str] | None = None) -> bool:
        return await self._run(lambda: self._put(record, events, only_from))

    def _get(self, response_id: str) -> Record | None:
        row = self.db.execute(
            "SELECT id, owner, status, data, size, expires, updated FROM responses WHERE id = ? AND expires > ?",
            (response_id, self._clock()),
        ).fetchone()
        return Record(*row) if row is not None else None

    async def get(self, response_id: str) -> Record | None:
        return await self._run(lambda: self._get(response_id))

    def _delete(self, response_id: str) -> bool:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            gone = db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount
            db.execute("DELETE FROM events WHERE id = ?", (response_id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return gone > 0

    async def delete(self, response_id: str) -> bool:
        return await self._run(lambda: self._delete(response_id))

    def _add_events(self, response_id: str, events: list[str], start: int) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone() is not None:
                db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?)", [(response_id, start + i, e) for i, e in enumerate(events)])
                db.execute("UPDATE responses SET size = size + ? WHERE id = ?", (sum(map(len, events)), response_id))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def add_events(self, response_id: str, events: list[str], start: int) -> None:
        await self._run(lambda: self._add_events(response_id, events, start))

    async def events(self, response_id: str, start: int) -> list[str]:
        def read() -> list[str]:
            rows = self.db.execute("SELECT data FROM events WHERE id = ? AND seq >= ? ORDER BY seq", (response_id, start))
            return [data for (data,) in rows]

        return await self._run(read)

    async def close(self) -> None:
        if self._purging is not None:
            self._purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purging

        def close() -> None:
            if self._db is not None:
                db, self._db = self._db, None
                db.close()

        await self._run(close)
