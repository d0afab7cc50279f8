"""Constrained decoding for `response_format`: JSON, or JSON valid against a schema.

Grammars come from llguidance, built against the model's own tokenizer; each constrained
sequence gets a matcher that masks the tokens its grammar forbids before sampling and follows
the tokens sampled, so every request in a shared batch carries its own constraint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

from chatgate.errors import InvalidRequestError

if TYPE_CHECKING:  # a TypedDict that exists only in llguidance's stubs
    from llguidance._lib import JsonCompileOptions

SCHEMA_PARAM = "response_format.json_schema.schema"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Compact JSON: a small model given room for whitespace spends its tokens indenting (and often
# loops on newlines and spaces until max_tokens); with none allowed, every token says something.
COMPACT: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class ConstraintCompiler:
    """Turns `response_format` constraints into grammars for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer: LLTokenizer = from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, spec: dict[str, Any]) -> Grammar:
        """The grammar for `{"type": "json_object"}` or `{"type": "json_schema", "schema": ...}`."""
        kind = spec.get("type")
        if kind == "json_object":
            schema = ANY_OBJECT
        elif kind == "json_schema":
            given = spec.get("schema")
            if not isinstance(given, dict):
                raise InvalidRequestError("The JSON schema must be an object.", param=SCHEMA_PARAM)
            schema = given
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                raise InvalidRequestError(f"Invalid JSON schema: {exc.message}", param=SCHEMA_PARAM) from None
        else:
            raise InvalidRequestError(f"Unknown response_format type {kind!r}.", param="response_format.type")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid JSON schema: {exc}", param=SCHEMA_PARAM) from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise InvalidRequestError(f"Unsupported JSON schema: {messages[0]}", param=SCHEMA_PARAM)
        return Grammar(self, grammar)


class Grammar:
    """A compiled grammar; each sequence starts its own `Constraint` from it."""

    def __init__(self, compiler: ConstraintCompiler, grammar: str) -> None:
        self._compiler = compiler
        self._grammar = grammar

    def start(self) -> Constraint:
        """A fresh matcher at the start of the grammar."""
        return Constraint(LLMatcher(self._compiler.tokenizer, self._grammar))


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: LLMatcher) -> None:
        self._matcher = matcher

    def mask(self, logits: torch.Tensor) -> None:
        """Forbid, in place, every token the grammar does not allow next."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]].astype(bool)
        logits[~torch.from_numpy(allowed)] = float("-inf")

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar does not allow it."""
        return bool(self._matcher.consume_token(token)) and not self._matcher.is_error()
