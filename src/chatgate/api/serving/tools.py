"""Function calling: tools described to the model, calls constrained and parsed out of its reply.

A model whose chat template renders tools gets them through its template (the worker decides,
from `tools` and `tool_messages`); any other is shown them in a system message (below,
`TOOL_PROMPT`), which works with FastChat workers too. The model replies either with
plain text or with one JSON object, `{"tool_calls": [{"name": ..., "arguments": {...}}]}`. With
`tool_choice` `"required"` or a named function, decoding is constrained by a grammar to exactly
that object, with each call's arguments matching its function's JSON schema (closed to
properties it does not declare, as in OpenAI's strict mode), and a call that repeats an earlier
one ends the list (see `constraints.py`); with `"auto"` the reply is parsed, and counts as tool
calls only if it is such an object naming known functions. Exact repeats are dropped either way.
Earlier turns with `tool_calls` are shown to the model in the same form, and `tool` messages as
they are. Legacy `functions` / `function_call` map onto the same plan.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from chatgate.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    MessageToolCall,
    ToolCall,
)

TOOL_PROMPT = (
    "You can call these functions:\n{tools}\n"
    "To call functions, reply with only a JSON object of the form "
    '{{"tool_calls": [{{"name": <function name>, "arguments": <arguments object>}}]}}. '
    "Otherwise, answer in plain text."
)


@dataclass(frozen=True)
class ToolPlan:
    """How a request uses tools."""

    functions: list[FunctionDefinition]
    mode: str  # "auto", "required" or "named"
    named: str | None
    parallel: bool
    legacy: bool  # the request used `functions` / `function_call`

    @property
    def single(self) -> bool:
        """One call at most: parallel calls are off, or a named `tool_choice` forces that one
        call (a small model left an open array repeats the same call until `max_tokens`)."""
        return not self.parallel or self.mode == "named"

    def constraint(self) -> dict[str, Any] | None:
        """The grammar constraint for `required` / named calls; None for `auto`."""
        if self.mode == "auto":
            return None
        chosen = [f for f in self.functions if self.mode == "required" or f.name == self.named]
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": closed(f.parameters)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in chosen
        ]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
        if self.single:
            array["maxItems"] = 1
        schema = {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"], "additionalProperties": False}
        # An exact repeat of a call already made is never useful, and a small model makes one
        # until `max_tokens`: the engine closes the array at the first repeat (`parse` drops it).
        return {"type": "json_schema", "schema": schema, "distinct": "tool_calls"}

    def tool_choice(self) -> str | dict[str, Any]:
        """OpenAI's `tool_choice` for this plan (legacy `function_call` included)."""
        if self.mode == "named":
            return {"type": "function", "function": {"name": self.named}}
        return self.mode

    def parse(self, text: str) -> list[ToolCall] | None:
        """The tool calls in a reply, or None if it is plain text."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's limit
            return None
        calls = data.get("tool_calls") if isinstance(data, dict) else None
        names = {f.name for f in self.functions}
        if not isinstance(calls, list) or not calls:
            return None
        # Arguments as an object, or already as OpenAI's string form: an upstream's tool call is
        # passed on as the upstream made it, even when that string is not an object.
        if not all(isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments"), dict | str) for c in calls):
            return None
        if self.single:
            calls = calls[:1]
        return [
            ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))
            for name, arguments in _distinct(calls)
        ]


def _distinct(calls: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each call's name and arguments, in order, without exact repeats (same name, equal arguments)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for call in calls:
        key = (call["name"], json.dumps(call["arguments"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append((call["name"], _argument_text(call["arguments"])))
    return out


def _argument_text(arguments: dict[str, Any] | str) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def closed(schema: Any) -> Any:
    """`schema` with every object that declares `properties` closed to other properties, unless
    it says otherwise (as OpenAI's strict mode does): a small model otherwise keeps inventing
    properties (often the schema's own words, `"type"`, `"properties"`) until `max_tokens`."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _closed_child(key, value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# Keywords whose values are schemas, or maps / lists of schemas.
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
_SCHEMA_VALUES = frozenset({"items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties"})


def _closed_child(key: str, value: Any) -> Any:
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        return {name: closed(sub) for name, sub in value.items()}
    if key in _SCHEMA_VALUES:
        return closed(value)
    return value


def plan(request: ChatCompletionRequest) -> ToolPlan | None:
    """The tool plan of a request, or None when it offers no tools (or forbids calling them)."""
    if request.functions:
        legacy = request.function_call or "auto"
        if legacy == "none":
            return None
        named = None if isinstance(legacy, str) else legacy.name
        return ToolPlan(request.functions, "named" if named else "auto", named, False, True)
    if not request.tools:
        return None
    choice = request.tool_choice or "auto"
    if choice == "none":
        return None
    functions = [t.function for t in request.tools]
    parallel = request.parallel_tool_calls is not False
    if isinstance(choice, str):
        return ToolPlan(functions, choice, None, parallel, False)
    return ToolPlan(functions, "named", choice.function.name, parallel, False)


def _call_text(calls: list[MessageToolCall]) -> str:
    out = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except (ValueError, RecursionError):  # shown to the model as the client sent it
            arguments = call.function.arguments
        out.append({"name": call.function.name, "arguments": arguments})
    return json.dumps({"tool_calls": out})


def render_messages(request: ChatCompletionRequest, tool_plan: ToolPlan | None) -> list[dict[str, Any]]:
    """The conversation as the worker's chat template receives it."""
    messages = [message_dict(m) for m in request.messages]
    offered = tool_plan.functions if tool_plan else [t.function for t in request.tools or []] or request.functions or []
    if offered:
        described = json.dumps([f.model_dump(exclude_none=True, by_alias=True) for f in offered])
        prompt = TOOL_PROMPT.format(tools=described)
        # Templates want at most one system message, first: join the tool prompt to it.
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def message_dict(m: ChatMessage) -> dict[str, Any]:
    """A message as the worker's chat template receives it; earlier calls in chatgate's tool form."""
    content = m.text()
    if m.role == "assistant" and m.tool_calls:
        content = _call_text(m.tool_calls)
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.name:
        out["name"] = m.name
    return out


def native_tools(request: ChatCompletionRequest, tool_plan: ToolPlan | None) -> dict[str, Any]:
    """Tools and the plain conversation, for workers whose chat template renders tools itself."""
    if tool_plan is None:
        return {}
    tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in tool_plan.functions]
    messages = [
        {k: v for k, v in m.model_dump(exclude_none=True).items() if k != "content"} | {"content": m.text()}
        for m in request.messages
    ]
    return {"tools": tools, "tool_messages": messages, "tool_choice": tool_plan.tool_choice()}
