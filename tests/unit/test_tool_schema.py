"""Tool-call arguments are constrained to the declared properties, as OpenAI's strict mode does."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from chatgate.api.serving.tools import closed

CITY: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_declared_properties_only() -> None:
    schema = closed(CITY)
    jsonschema.validate({"city": "Paris"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "Paris", "type": "object"}, schema)
    assert CITY.get("additionalProperties") is None  # the caller's schema is left alone


def test_nested_objects_closed_through_every_schema_keyword() -> None:
    inner = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = closed(
        {
            "type": "object",
            "properties": {"a": inner, "b": {"type": "array", "items": inner}, "c": {"anyOf": [inner, {"type": "null"}]}},
            "$defs": {"d": inner},
        }
    )
    for path in (["properties", "a"], ["properties", "b", "items"], ["properties", "c", "anyOf", 0], ["$defs", "d"]):
        node: Any = schema
        for step in path:
            node = node[step]
        assert node["additionalProperties"] is False, path


def test_explicit_permission_and_free_form_objects_kept() -> None:
    open_schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}}
    assert closed(open_schema) == open_schema
    free = {"type": "object", "properties": {"meta": {"type": "object"}}}
    assert closed(free)["properties"]["meta"] == {"type": "object"}
    # A property *named* like a keyword is a property, not a schema keyword.
    named = {"type": "object", "properties": {"items": {"type": "string"}, "properties": {"type": "integer"}}}
    assert closed(named)["properties"] == named["properties"]
