"""Holding a parallel slot while its request runs: the lease is renewed on a timer (a stream may
run for minutes), given back when the request ends, and a give-back that fails (Redis briefly
unreachable) is retried in the background for as long as the lease could still be alive.

However those calls fail, the slot is back within one lease lifetime: the store lets a lease
that is neither renewed nor released lapse on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio

from chatgate.api.limits.store import LimitStore
from chatgate.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 3  # a lease is renewed this often per lifetime, so one failed renewal is harmless
FIRST_RETRY = 0.25  # seconds before a failed release is tried again; the wait doubles each time


class LeaseKeeper:
    """Keeps the leases of the requests in flight, and the retries of failed releases."""

    def __init__(self, store: LimitStore) -> None:
        self._store = store
        self._retries: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def held(self, key: str, lease: str) -> AsyncIterator[None]:
        """Renew `lease` while the block runs; release it after, however the block ends."""
        renewer = asyncio.create_task(self._renew(key, lease))
        try:
            yield
        finally:
            # Shielded: a request cancelled by its client must still give its slot back.
            with anyio.CancelScope(shield=True):
                await cancel_and_wait(renewer)
                if not await self._release(key, lease):
                    self._retry_later(key, lease)

    async def _renew(self, key: str, lease: str) -> None:
        while True:
            await asyncio.sleep(self._store.lease_seconds / RENEWALS_PER_LEASE)
            try:
                if not await self._store.renew(key, lease):
                    log.warning("a parallel-slot lease lapsed while its request ran; the slot is free early")
                    return
            except Exception as exc:  # the next renewal may succeed; the lease has time left
                log.warning("could not renew a parallel-slot lease: %s", exc)

    async def _release(self, key: str, lease: str) -> bool:
        try:
            await self._store.release(key, lease)
        except Exception as exc:
            log.warning("could not release a parallel-slot lease (will retry): %s", exc)
            return False
        return True

    def _retry_later(self, key: str, lease: str) -> None:
        task = asyncio.create_task(self._retry(key, lease))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, key: str, lease: str) -> None:
        """Retry with doubling waits until the lease would have lapsed anyway."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._store.lease_seconds
        delay = FIRST_RETRY
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            if await self._release(key, lease):
                return
            delay *= 2
        log.warning("gave up releasing a parallel-slot lease; it lapses on its own")

    async def close(self) -> None:
        """Stop the retries still waiting (their leases lapse on their own)."""
        await cancel_and_wait(*self._retries)
