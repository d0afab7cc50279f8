"""Server-sent events in the forms OpenAI streams them: chat and completions send `data: {json}`
lines, then `[DONE]`; the Responses API sends named events (`event:` and `data:`), no `[DONE]`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from pydantic import BaseModel

from chatgate.api.errors import OPENAI, ErrorDialect
from chatgate.errors import ChatgateError
from chatgate.protocol.responses import StreamEvent

log = logging.getLogger(__name__)


def event(payload: str) -> str:
    """One SSE event carrying `payload`."""
    return f"data: {payload}\n\n"


def _unexpected(request_id: str) -> ChatgateError:
    log.exception("stream failed (request %s)", request_id)
    return ChatgateError(f"The server had an error while streaming (request id {request_id}).")


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
        yield event(json.dumps(_unexpected(request_id).body()))
        return
    yield event("[DONE]")


async def named_sse(
    events: AsyncGenerator[StreamEvent, None] | AsyncGenerator[BaseModel, None],
    request_id: str,
    dialect: ErrorDialect = OPENAI,
) -> AsyncIterator[str]:
    """Encode named events (each names itself in `type`); an error mid-stream becomes an
    `error` event in the route's dialect (numbered next, in the Responses API's)."""
    sequence = -1
    try:
        async with contextlib.aclosing(events):
            async for item in events:
                sequence = getattr(item, "sequence_number", sequence + 1)
                yield f"event: {getattr(item, 'type')}\ndata: {item.model_dump_json()}\n\n"
    except Exception as exc:
        error = exc if isinstance(exc, ChatgateError) else _unexpected(request_id)
        yield f"event: error\ndata: {json.dumps(dialect.stream_error(error, sequence + 1))}\n\n"
