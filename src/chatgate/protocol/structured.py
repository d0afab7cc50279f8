"""Structured output beyond `response_format`: vLLM's `structured_outputs` (and its older
`guided_*` spellings) and llama.cpp's `grammar` (GBNF) and `json_schema`, on chat and completions.

Each becomes one constraint in the worker protocol's form (`GenerateParams.response_format`):
`{"type": "json_object"}`, `{"type": "json_schema", "schema": ...}`, `{"type": "regex", "regex": ...}`,
`{"type": "choice", "choice": [...]}` or `{"type": "grammar", "grammar": <Lark or GBNF>}`, each
with the `param` an engine's error names. A request carries at most one (counting
`response_format` and a `tool_choice` that forces a call). Regexes and grammars are compiled by
the door (`check_grammar`, in a worker thread, as JSON schemas are checked) so a bad one is a
400 with the compiler's message before any worker is asked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Annotated, Any

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark
from pydantic import AfterValidator, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from chatgate.protocol import limits
from chatgate.protocol.limits import PublicRequest

# One regex or grammar's text: far beyond any hand-written grammar, and compiled in well under
# a second (llguidance compiles lazily, and its lexer has its own state limits).
MAX_GRAMMAR_CHARS = 64 * 1024
# Rules (and terminals) a grammar may define. llguidance follows a chain of rules recursively:
# about 2,800 in a chain overflow a thread's stack and kill the process (measured: 2,000 pass),
# so the count is capped well below, before llguidance sees the grammar. Real grammars define
# tens to a few hundred.
MAX_GRAMMAR_RULES = 1000
_DEFINITION = re.compile(r"^\s*[?!]?[A-Za-z_][A-Za-z0-9_]*(\.-?\d+)?\s*:", re.M)
MAX_CHOICES = 1024  # `choice` entries; together they count against MAX_GRAMMAR_CHARS


def _json_schema(value: dict[str, Any] | str) -> dict[str, Any]:
    """A schema given as an object, or (as vLLM also takes it) as a JSON string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError("it is a string that is not JSON; give the schema as an object") from None
        if not isinstance(value, dict):
            raise ValueError("a JSON schema must be an object")
    return limits.bounded_schema(value)


def _choices(value: list[str]) -> list[str]:
    if sum(len(c) for c in value) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"the choices hold more than {MAX_GRAMMAR_CHARS} characters together")
    return value


Schema = Annotated[dict[str, Any] | str, AfterValidator(_json_schema)]
GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Choices = Annotated[
    list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES), AfterValidator(_choices)
]


def _unsupported(name: str, why: str) -> Any:
    def check(value: Any) -> Any:
        if value is not None and value is not False:
            raise ValueError(f"{name} is not supported by this server: {why}")
        return value

    return AfterValidator(check)


class StructuredOutputs(PublicRequest):
    """vLLM's `structured_outputs`: exactly one constraint, and options on it."""

    json_: Schema | None = Field(None, alias="json")
    regex: GrammarText | None = None
    choice: Choices | None = None
    grammar: GrammarText | None = None
    json_object: bool | None = None
    structural_tag: Annotated[str | dict[str, Any] | None, _unsupported("structural_tag", "give a grammar instead")] = None
    whitespace_pattern: Annotated[str | None, _unsupported("whitespace_pattern", "JSON is always compact here")] = None
    # Accepted as vLLM accepts them: there is one backend and no fallback, and JSON output never
    # has free whitespace here. Properties a schema does not close stay allowed, as JSON Schema says.
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: Annotated[
        bool | None, _unsupported("disable_additional_properties", "close the schema with additionalProperties: false")
    ] = None

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object") if self._kind(k) not in (None, False)]
        if len(kinds) != 1:
            found = ", ".join(kinds) or "none"
            raise ValueError(f"give exactly one of json, regex, choice, grammar and json_object (found: {found})")
        return self

    def _kind(self, name: str) -> Any:
        return self.json_ if name == "json" else getattr(self, name)

    def constraint(self, param: str) -> dict[str, Any]:
        """The worker-protocol constraint this asks for."""
        if self.json_ is not None:
            return {"type": "json_schema", "schema": self.json_, "param": f"{param}.json"}
        if self.regex is not None:
            return {"type": "regex", "regex": self.regex, "param": f"{param}.regex"}
        if self.choice is not None:
            return {"type": "choice", "choice": self.choice, "param": f"{param}.choice"}
        if self.grammar is not None:
            return {"type": "grammar", "grammar": self.grammar, "param": f"{param}.grammar"}
        return {"type": "json_object", "param": param}


# The fields below, in the order a conflict is reported; each is one way to constrain output.
STRUCTURED_FIELDS = (
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "grammar", "json_schema",
)


class StructuredFields(PublicRequest):
    """The structured-output fields chat and completions requests share (vLLM's and llama.cpp's)."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: Schema | None = None
    guided_regex: GrammarText | None = None
    guided_choice: Choices | None = None
    guided_grammar: GrammarText | None = None
    # vLLM chose the backend by this until it removed the field (v0.12), and now ignores it:
    # there is one backend here, so any name is accepted and ignored.
    guided_decoding_backend: Annotated[str, Field(max_length=64)] | None = None
    guided_whitespace_pattern: Annotated[str | None, _unsupported("guided_whitespace_pattern", "JSON is always compact here")] = None
    grammar: GrammarText | None = Field(None, description="llama.cpp's server: a GBNF (or Lark) grammar.")
    json_schema: Schema | None = Field(None, description="llama.cpp's server: a JSON schema the output follows.")

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredFields:
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        # `response_format` with a forced tool call stays allowed, as OpenAI allows it (the call's
        # grammar wins); any of these fields with either, or two of these, is a conflict.
        if given:
            given += self.other_constraints()
        if len(given) > 1:
            message = f"only one way of constraining the output may be given, but this request has {', '.join(given)}"
            detail = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(given[1],), input=None)
            raise ValidationError.from_exception_data(type(self).__name__, [detail])
        return self

    def other_constraints(self) -> list[str]:
        """Fields outside these that constrain output too (chat: `response_format`, `tool_choice`)."""
        return []

    def structured_constraint(self) -> dict[str, Any] | None:
        """The worker-protocol constraint these fields ask for, if any."""
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint("structured_outputs")
        for name, kind, key in (("guided_json", "json_schema", "schema"), ("json_schema", "json_schema", "schema"),
                                ("guided_regex", "regex", "regex"), ("guided_choice", "choice", "choice"),
                                ("guided_grammar", "grammar", "grammar"), ("grammar", "grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                return {"type": kind, key: value, "param": name}
        return None

    def structured_schemas(self) -> Iterable[tuple[str, dict[str, Any]]]:
        """The JSON schemas these fields carry, with the field that holds each."""
        spec = self.structured_constraint()
        if spec is not None and spec["type"] == "json_schema":
            yield spec["param"], spec["schema"]

    def grammars(self) -> Iterable[tuple[str, dict[str, Any]]]:
        spec = self.structured_constraint()
        if spec is not None and spec["type"] in ("regex", "choice", "grammar"):
            yield spec["param"], spec


def lark_of(spec: dict[str, Any]) -> str:
    """llguidance's grammar for a regex, choice or grammar constraint; `ValueError` with the
    converter's message when a GBNF grammar does not convert."""
    kind = spec["type"]
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec["regex"])
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec["choice"]))
    try:
        lark = any_to_lark(spec["grammar"])
    except Exception as exc:  # the converter raises its own error type, and others on odd input
        raise ValueError(f"the grammar is neither Lark nor GBNF: {exc}") from None
    # One definition per line (llguidance's Lark refuses two on a line), so this counts them all.
    rules = len(_DEFINITION.findall(lark))
    if rules > MAX_GRAMMAR_RULES:
        raise ValueError(f"the grammar defines {rules} rules; at most {MAX_GRAMMAR_RULES} are accepted")
    return LLMatcher.grammar_from_lark(lark)


def check_grammar(spec: dict[str, Any]) -> None:
    """Raise `ValueError` with the compiler's message if a regex, choice or grammar constraint
    does not compile (CPU work: the door runs it in a worker thread)."""
    failed, messages = LLMatcher.validate_grammar_with_warnings(lark_of(spec))
    if failed:
        raise ValueError(messages[0].strip())

