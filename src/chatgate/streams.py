"""Helpers for async streams: start one early, merge several into one, beat while one is
silent, and end one when told to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

from chatgate.tasks import cancel_and_wait

T = TypeVar("T")
U = TypeVar("U")

MERGE_BUFFER = 64  # items `merge` holds for a slow reader before its streams wait


async def chain(first: T, rest: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """Yield `first`, then everything from `rest`; closing this closes `rest`."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        closer = getattr(rest, "aclose", None)
        if closer is not None:
            await closer()


@contextlib.asynccontextmanager
async def closing(stream: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T], None]:
    """`contextlib.aclosing` for any async iterator: closed on exit if it can be (a generator
    left to the garbage collector runs its `finally` at some later time)."""
    try:
        yield stream
    finally:
        closer = getattr(stream, "aclose", None)
        if closer is not None:
            await closer()


async def empty() -> AsyncGenerator[T, None]:
    """A stream with nothing in it."""
    return
    yield  # pragma: no cover


async def primed(stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """Run `stream` to its first item now, so its early errors raise here, not mid-response."""
    iterator = aiter(stream)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return empty()
    return chain(first, iterator)


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several streams as items arrive, tagging each with its stream's index.

    An error in any stream is raised here; closing the merged stream cancels all of them.
    The queue between them is bounded: a reader that falls behind holds the streams back
    instead of their output piling up in memory.
    """
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue(maxsize=MERGE_BUFFER)

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                await closer()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            entry = await queue.get()
            if entry is None:
                remaining -= 1
            elif isinstance(entry, BaseException):
                raise entry
            else:
                yield entry
    finally:
        await cancel_and_wait(*tasks)


class _End:
    """The end of a stream, as `_Ahead` reports it (a task cannot return StopAsyncIteration)."""


_END = _End()


async def _next_or_end(stream: AsyncIterator[T]) -> T | _End:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


class _Ahead(Generic[T]):
    """Reads a stream's next item in a task of its own, so a wait for it can stop (a beat is
    due, a deadline passed) without cancelling the read. Closing it cancels a pending read,
    which unwinds the stream as a cancelled request would, then closes the stream."""

    def __init__(self, stream: AsyncIterator[T]) -> None:
        self._stream = stream
        self._pending: asyncio.Task[T | _End] | None = None

    async def wait(self, *, timeout: float | None = None, until: asyncio.Future[Any] | None = None) -> bool:
        """Whether the next item (or the end, or an error) is in, after at most `timeout`
        seconds, or sooner if `until` is done."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(_next_or_end(self._stream))
        waiting: set[asyncio.Future[Any]] = {self._pending} if until is None else {self._pending, until}
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return self._pending.done()

    def take(self) -> T | _End:
        """The item that is in (its error raises here)."""
        assert self._pending is not None and self._pending.done()
        pending, self._pending = self._pending, None
        return pending.result()

    async def aclose(self) -> None:
        """Stop a pending read and close the stream."""
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.wait([self._pending])
            if not self._pending.cancelled():
                self._pending.exception()  # retrieved: the read ended as it was stopped
            self._pending = None
        closer = getattr(self._stream, "aclose", None)
        if closer is not None:
            await closer()


async def with_beats(stream: AsyncIterator[T], *, every: float, beat: U) -> AsyncGenerator[T | U, None]:
    """`stream`'s items, and `beat` each time `every` seconds pass without one."""
    ahead = _Ahead(stream)
    try:
        while True:
            if not await ahead.wait(timeout=every):
                yield beat
                continue
            item = ahead.take()
            if isinstance(item, _End):
                return
            yield item
    finally:
        await ahead.aclose()


async def until_done(
    stream: AsyncIterator[T], stop: Callable[[], asyncio.Future[Any]], error: Callable[[], BaseException]
) -> AsyncGenerator[T, None]:
    """`stream`'s items until the future `stop()` is done; then `stream` is closed (its work
    cancelled) and `error()` raised, even while it was waiting for an item."""
    ahead = _Ahead(stream)
    try:
        while True:
            if not await ahead.wait(until=stop()):
                raise error()
            item = ahead.take()
            if isinstance(item, _End):
                return
            yield item
    finally:
        await ahead.aclose()
