"""The streaming HTTP response every chatgate process answers streams with: it closes its stream
when the client leaves, and bounds how long a write waits on a client that stopped reading."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class ClientStalledError(Exception):
    """A client stopped reading its stream for longer than the write timeout."""


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its iterator however the response ends.

    Starlette leaves the body iterator suspended when the client goes away; closing it here
    runs every `finally` down the chain at once, so a generation stops as soon as its client
    disconnects instead of whenever the garbage collector gets to it.

    With `write_timeout`, a client that does not take a piece within that many seconds (it
    stopped reading, so the server's send buffer is full) has its stream ended the same way:
    its generation is cancelled and its slot freed instead of output piling up for it.
    """

    def __init__(self, content: AsyncIterator[Any], *, write_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, self._timed(send))
        except ClientStalledError:
            log.info("client stopped reading for %ss; stream cancelled", self.write_timeout)
        finally:
            iterator = self.body_iterator
            if isinstance(iterator, AsyncIterator) and hasattr(iterator, "aclose"):
                await iterator.aclose()

    def _timed(self, send: Send) -> Send:
        if self.write_timeout is None:
            return send
        timeout = self.write_timeout

        async def timed_send(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except TimeoutError:
                raise ClientStalledError() from None

        return timed_send
