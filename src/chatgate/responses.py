"""Starlette responses shared by chatgate's processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its iterator however the response ends.

    Starlette leaves the body iterator suspended when the client goes away; closing it here
    runs every `finally` down the chain at once, so a generation stops as soon as its client
    disconnects instead of whenever the garbage collector gets to it.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            iterator = self.body_iterator
            if isinstance(iterator, AsyncIterator) and hasattr(iterator, "aclose"):
                await iterator.aclose()
