"""Clients that leave or stop reading: their generation is cancelled and their slot freed."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI

from chatgate.engines.fake import FakeEngine
from chatgate.streams import MERGE_BUFFER, merge
from tests.support.app import make_app, running
from tests.support.asgi import call, until

pytestmark = pytest.mark.anyio

M = "fake-model"
LONG = [{"role": "user", "content": "hi"}]


async def test_a_non_streaming_client_that_leaves_cancels_its_generation() -> None:
    engine = FakeEngine(token_delay=0.05)  # ~2 s for the whole reply
    async with running(make_app(engine)) as app:
        leave, sent = asyncio.Event(), list[dict[str, Any]]()
        task = asyncio.create_task(call(app, {"model": M, "messages": LONG, "n": 3}, leave=leave, sent=sent))
        await until(lambda: engine.active == 3)
        begin = time.monotonic()
        leave.set()
        await asyncio.wait_for(task, 5)
        await until(lambda: engine.active == 0, 1.0)
        assert time.monotonic() - begin < 1.0  # well before the reply would have finished
        assert sent[0]["status"] == 499


async def test_a_stream_nobody_reads_is_cancelled_after_the_write_timeout() -> None:
    engine = FakeEngine(token_delay=0.01)
    async with running(make_app(engine, stream_write_timeout=0.3)) as app:
        leave, sent = asyncio.Event(), list[dict[str, Any]]()
        body = {"model": M, "messages": LONG, "stream": True, "n": 4, "max_tokens": 500}
        task = asyncio.create_task(call(app, body, leave=leave, sent=sent, block_body=True))
        await until(lambda: len(sent) > 3)
        await asyncio.wait_for(task, 5)  # the response ends although the client never read
        await until(lambda: engine.active == 0, 2.0)
        assert len(sent) == 4  # nothing more was written after the write that never completed


async def test_merge_holds_back_streams_a_slow_reader_does_not_take() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    merged = merge([endless(), endless()])
    assert await anext(merged) is not None
    for _ in range(50):  # the reader pauses; the pumps may only fill the buffer
        await asyncio.sleep(0)
    assert pulled <= MERGE_BUFFER + 4, pulled
    await merged.aclose()
