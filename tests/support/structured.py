"""The person schema and question the structured-output tests constrain the real model with."""

from __future__ import annotations

from tests.support.app import Messages

# Strings bounded: unbounded, the tiny model can loop inside one until max_tokens (under vLLM,
# whose grammar lays JSON out with newlines, a tag grew "Ada_Ale_Ale_..." for 200 tokens).
PERSON: dict[str, object] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK: Messages = [{"role": "user", "content": "Describe a person called Ada as JSON."}]
