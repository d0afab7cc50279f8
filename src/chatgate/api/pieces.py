"""Large JSON response bodies written a piece at a time, so the event loop is never held long.

Serialising a 2,048-vector embeddings response is a third of a second of CPU that holds the
interpreter: written in one go, every stream and `/health` would wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from pydantic import BaseModel

PIECE = 64  # list items per piece: a few milliseconds of serialising


def is_large(items: Sequence[object]) -> bool:
    """Whether a list is long enough to write in pieces."""
    return len(items) > PIECE


async def json_in_pieces(model: BaseModel, field: str) -> AsyncIterator[bytes]:
    """`model` as JSON, its list `field` serialised `PIECE` items at a time with the loop free
    in between. The envelope is serialised with the list empty, and the items spliced in."""
    items: Sequence[BaseModel] = getattr(model, field)
    envelope = model.model_copy(update={field: []}).model_dump_json()
    # Inside JSON strings quotes are escaped, so the first unescaped `"field":[]` is the field.
    before, after = envelope.split(f'"{field}":[]', 1)
    yield f'{before}"{field}":['.encode()
    for start in range(0, len(items), PIECE):
        await asyncio.sleep(0)
        piece = ",".join(item.model_dump_json() for item in items[start : start + PIECE])
        yield (("," if start else "") + piece).encode()
    yield f"]{after}".encode()
