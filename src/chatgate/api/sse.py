"""Server-sent events in the form OpenAI streams them: `data: {json}` lines, then `[DONE]`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from pydantic import BaseModel

from chatgate.errors import ChatgateError

log = logging.getLogger(__name__)


def event(payload: str) -> str:
    """One SSE event carrying `payload`."""
    return f"data: {payload}\n\n"


async def sse(chunks: AsyncGenerator[BaseModel, None], request_id: str) -> AsyncIterator[str]:
    """Encode a stream of response chunks; an error mid-stream becomes an `error` event
    (an unexpected one names `request_id`, the id in the response's `x-request-id` header)."""
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield event(chunk.model_dump_json())
    except ChatgateError as exc:
        yield event(json.dumps(exc.body()))
        return
    except Exception:
        log.exception("stream failed (request %s)", request_id)
        error = ChatgateError(f"The server had an error while streaming (request id {request_id}).")
        yield event(json.dumps(error.body()))
        return
    yield event("[DONE]")
