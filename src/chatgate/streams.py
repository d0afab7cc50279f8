"""Helpers for async streams: start one early, and merge several into one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TypeVar

from chatgate.tasks import cancel_and_wait

T = TypeVar("T")

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
