"""Background tasks: the one way a chatgate process stops tasks it started."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel every task, then wait until each has finished unwinding (None is skipped)."""
    started = [task for task in tasks if task is not None]
    for task in started:
        task.cancel()
    for task in started:
        with contextlib.suppress(asyncio.CancelledError):
            await task


T = TypeVar("T")


async def enter_together(stack: contextlib.AsyncExitStack, contexts: Sequence[AbstractAsyncContextManager[T]]) -> list[T]:
    """Enter every context at once (models load concurrently), each exit registered on `stack` as
    it is entered. If one fails, the others are cancelled and awaited before its error is raised:
    none is left loading outside the stack, which would never close it."""
    tasks = [asyncio.ensure_future(stack.enter_async_context(context)) for context in contexts]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
