"""Tool-call arguments are constrained to the declared properties, as OpenAI's strict mode does;
a forced call list ends at its first repeated call, which is dropped."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from chatgate.api.serving.tools import ToolPlan, closed
from chatgate.protocol.openai import FunctionDefinition

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


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_marked_distinct_and_repeats_are_dropped(parallel: bool) -> None:
    plan = ToolPlan([FunctionDefinition(name="get_weather", parameters=CITY)], "required", None, parallel, False)
    assert (plan.constraint() or {})["distinct"] == "tool_calls"
    reply = ('{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_weather","arguments":{"city":"Rome"}},'
             '{"arguments":{"city":"Paris"},"name":"get_weather"}]}')
    calls = plan.parse(reply) or []
    expected = ['{"city": "Paris"}', '{"city": "Rome"}'] if parallel else ['{"city": "Paris"}']
    assert [c.function.arguments for c in calls] == expected
