"""`enter_together`: models load concurrently, and when one fails none is left loading outside
the exit stack (a sibling still starting would never be closed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from chatgate.tasks import enter_together

pytestmark = pytest.mark.anyio


class Model:
    def __init__(self, name: str, *, load: float, fails: bool = False) -> None:
        self.name, self.load, self.fails = name, load, fails
        self.state = "new"

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[str]:
        self.state = "loading"
        try:
            await asyncio.sleep(self.load)
        except asyncio.CancelledError:
            self.state = "cancelled"
            raise
        if self.fails:
            self.state = "failed"
            raise ValueError(f"{self.name} cannot load")
        self.state = "open"
        try:
            yield self.name
        finally:
            self.state = "closed"


async def test_all_open_together_and_close_with_the_stack() -> None:
    models = [Model("a", load=0.05), Model("b", load=0.05)]
    async with contextlib.AsyncExitStack() as stack:
        began = asyncio.get_running_loop().time()
        assert await enter_together(stack, [m.opened() for m in models]) == ["a", "b"]
        assert asyncio.get_running_loop().time() - began < 0.5  # at once, not one after the other
        assert [m.state for m in models] == ["open", "open"]
    assert [m.state for m in models] == ["closed", "closed"]


async def test_one_failing_stops_the_slow_ones_and_closes_the_opened() -> None:
    fast, failing, slow = Model("fast", load=0.0), Model("bad", load=0.05, fails=True), Model("slow", load=30)
    with pytest.raises(ValueError, match="bad cannot load"):  # its own error, not a group
        async with contextlib.AsyncExitStack() as stack:
            await enter_together(stack, [fast.opened(), failing.opened(), slow.opened()])
    assert (fast.state, failing.state, slow.state) == ("closed", "failed", "cancelled")
