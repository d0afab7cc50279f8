"""Driving an app as an ASGI server would, for tests that need what a client can do but an HTTP
client library cannot: leave mid-request, or stop reading."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI


def scope(path: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    """An HTTP POST scope for `path`, with `headers` beside the JSON content type."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"chatgate"), *headers],
        "client": ("127.0.0.1", 1), "server": ("chatgate", 80),
    }


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait (polling) until `condition()` holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def call(app: FastAPI, body: dict[str, Any], *, leave: asyncio.Event, sent: list[dict[str, Any]],
               block_body: bool = False, path: str = "/v1/chat/completions") -> None:
    """POST `body` to `path`, then disconnect once `leave` is set; what the app sends lands in
    `sent`. With `block_body`, the client stops reading after a few body messages."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> MutableMapping[str, Any]:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))
        if block_body and message["type"] == "http.response.body" and len(sent) > 3:
            await asyncio.Event().wait()  # a client that stopped reading: the write never completes

    await app(scope(path), receive, send)
