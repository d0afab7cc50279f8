"""The one way tests wait for something: poll a condition until a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import pytest

Check = Callable[[], bool]
AsyncCheck = Callable[[], bool | Awaitable[bool]]


def _failed(what: str, timeout: float, details: Callable[[], str] | None) -> None:
    pytest.fail(f"{what} not met in {timeout}s" + (f":\n{details()}" if details else ""))


def poll(
    check: Check,
    *,
    what: str,
    timeout: float,
    interval: float = 0.05,
    ignore: tuple[type[Exception], ...] = (),
    details: Callable[[], str] | None = None,
) -> float:
    """Call `check` until it is true and return the seconds that took; fail the test (with
    `details()`) after `timeout`. Exceptions of the `ignore`d types count as not yet."""
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except ignore:
            pass
        if time.monotonic() - start > timeout:
            _failed(what, timeout, details)
        time.sleep(interval)


async def apoll(
    check: AsyncCheck,
    *,
    what: str,
    timeout: float,
    interval: float = 0.02,
    ignore: tuple[type[Exception], ...] = (),
) -> float:
    """`poll` for async tests: `check` may be a coroutine function; waiting yields to the loop."""
    start = time.monotonic()
    while True:
        try:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return time.monotonic() - start
        except ignore:
            pass
        if time.monotonic() - start > timeout:
            _failed(what, timeout, None)
        await asyncio.sleep(interval)
