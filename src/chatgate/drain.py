"""Graceful shutdown of a serving process (a worker, an API server, `chatgate serve`).

On SIGTERM, or the first Ctrl-C, the process drains before uvicorn's own shutdown:

1. it takes no new work: generation and embedding calls raise `ShuttingDownError` (503 with
   Retry-After; an API server retries the call on another worker), and `/ready` answers 503;
2. it runs its leaving hooks: a worker stops its heartbeat and deregisters from the controller,
   so API servers stop sending it work;
3. running streams finish, for up to `--shutdown-timeout` seconds;
4. streams still running then end with `ShuttingDownError`: an SSE error event for a client, an
   error frame for an API server (which retries elsewhere if nothing was generated yet),
   never a cut connection.

Only then does uvicorn close its sockets and run the lifespan's shutdown. A second signal skips
what is left of the wait (uvicorn's shutdown cuts what still runs after a few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

import uvicorn

from chatgate.errors import ShuttingDownError
from chatgate.streams import until_done

log = logging.getLogger(__name__)

T = TypeVar("T")

# After the shutdown timeout, how long the ended streams get to unwind before uvicorn's turn.
UNWIND = 5.0


class Drain:
    """A process's draining: whether it still takes work, and the streams it is running."""

    def __init__(self, *, timeout: float, what: str = "This server") -> None:
        self.timeout = timeout
        self.draining = False
        self._what = what
        self._active = 0
        self._hooks: list[Callable[[], Awaitable[None]]] = []
        self._over = False
        self._expired: asyncio.Future[None] | None = None

    @contextlib.contextmanager
    def leaving(self, hook: Callable[[], Awaitable[None]]) -> Iterator[None]:
        """Within this block, draining runs `hook` first, before it waits for streams (a
        worker deregisters while it is registered)."""
        self._hooks.append(hook)
        try:
            yield
        finally:
            self._hooks.remove(hook)

    def check(self) -> None:
        """Refuse new work while draining."""
        if self.draining:
            raise self.refusal()

    def refusal(self) -> ShuttingDownError:
        """The error new work gets while draining."""
        return ShuttingDownError(f"{self._what} is shutting down; retry shortly.")

    @property
    def active(self) -> int:
        """Streams running now."""
        return self._active

    async def guard(self, stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        """`stream`, counted as running work, and ended with `ShuttingDownError` if it still
        runs when the shutdown timeout is over."""
        self._active += 1
        try:
            async for item in until_done(stream, self._expiry, self._ended):
                yield item
        finally:
            self._active -= 1

    def _ended(self) -> ShuttingDownError:
        return ShuttingDownError(
            f"{self._what} shut down before this response was finished (it waited "
            f"{self.timeout:g}s for it); retry the request."
        )

    def _expiry(self) -> asyncio.Future[None]:
        """A future done once the shutdown timeout is over (one per event loop)."""
        loop = asyncio.get_running_loop()
        if self._expired is None or self._expired.get_loop() is not loop:
            self._expired = loop.create_future()
            if self._over:
                self._expired.set_result(None)
        return self._expired

    async def run(self) -> None:
        """Drain: refuse new work, run the leaving hooks, wait for the running streams, end the rest."""
        self.draining = True
        log.info("shutting down: %d streams running; waiting up to %gs for them", self._active, self.timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        for hook in self._hooks:
            try:
                await hook()
            except Exception:
                log.exception("a shutdown hook failed; shutting down anyway")
        await self._settle(deadline)
        if self._active:
            log.warning("ending %d streams still running after %gs", self._active, self.timeout)
            self._over = True
            expired = self._expiry()
            if not expired.done():
                expired.set_result(None)
            await self._settle(loop.time() + UNWIND)
        log.info("drained: %d streams left", self._active)

    async def _settle(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.05)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which drains the app (`Drain.run`) on the first SIGTERM or SIGINT
    before its own shutdown; a second signal goes straight to uvicorn's."""

    def __init__(self, config: uvicorn.Config, *, drain: Drain) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leaving: asyncio.Task[None] | None = None
        self._signalled = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self._loop is None or not self.started or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        # A signal handler runs between two bytecodes of the loop: hand the work to the loop.
        self._loop.call_soon_threadsafe(self._leave, sig)

    def _leave(self, sig: int) -> None:
        assert self._loop is not None
        self._leaving = self._loop.create_task(self._drain.run())
        self._leaving.add_done_callback(lambda task: self._drained(task, sig))

    def _drained(self, task: asyncio.Task[None], sig: int) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("draining failed", exc_info=task.exception())
        super().handle_exit(sig, None)
