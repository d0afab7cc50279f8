"""Constrained decoding for `response_format`, forced tool calls and the structured-output
fields (`protocol/structured.py`): JSON, or JSON valid against a schema, that is finished before
the token limit; or text matching a regex, one of a list of choices, or a Lark / GBNF grammar.

Grammars come from llguidance, built against the model's own tokenizer; each constrained
sequence gets a matcher that masks the tokens its grammar forbids before sampling and follows
the tokens sampled, so every request in a shared batch carries its own constraint.

For JSON, two things a grammar cannot say are added here, with a `JsonCursor` following the text:
- *Budget*: once the tokens left come close to what closing every open string, array and object
  takes, no new key, item or value may start (the string being written may go on while there is
  room), and at the end only the closing text is allowed. The reply is then complete JSON, and
  the sequence ends with `finish_reason` `"length"`: it was still cut by the limit, and clients
  that check for that (as they must with OpenAI and vLLM, whose JSON is then unterminated) still
  see it.
- *Repeats*: a spec with `"distinct": <property>` (the tool-call grammar sets it for its
  `tool_calls` array) closes that array as soon as an item repeats an earlier one. A small model
  otherwise repeats the same call until `max_tokens`; the caller drops the repeated item.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

from chatgate.engines.json_cursor import JsonCursor
from chatgate.errors import InvalidRequestError
from chatgate.protocol.structured import lark_of

if TYPE_CHECKING:  # a TypedDict that exists only in llguidance's stubs
    from llguidance._lib import JsonCompileOptions

SCHEMA_PARAM = "response_format.json_schema.schema"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Compact JSON: a small model given room for whitespace spends its tokens indenting (and often
# loops on newlines and spaces until max_tokens); with none allowed, every token says something.
COMPACT: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# Tokens kept in hand, beyond the closing text, before nothing new may be opened: one token can
# open a few things at once (`[{"` ...), and each then needs closing.
WINDOW = 8
_CACHED_GRAMMARS = 64
# The longest a regex or grammar's first mask may take (a plain one takes well under 10 ms).
TRIAL_SECONDS = 0.25
# Bytes that may change what closing takes: a string token without them only extends the string.
_STRUCTURAL = frozenset(b'"\\{}[],:')


class ConstraintCompiler:
    """Turns `response_format` constraints into grammars for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer: LLTokenizer = from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocabulary = Vocabulary(self.tokenizer)
        # Grammars compiled lately, by the constraint's canonical JSON: the n choices of one
        # request (each its own generation) and repeated requests compile a schema once. A
        # refusal is kept too: a constraint whose trial took seconds to refuse costs that once.
        self._compiled: OrderedDict[str, Grammar | InvalidRequestError] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: dict[str, Any]) -> Grammar:
        """The grammar for `{"type": "json_object"}` or `{"type": "json_schema", "schema": ...}`,
        from the cache when the same constraint was compiled lately."""
        key = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        with self._lock:
            known = self._compiled.get(key)
            if known is not None:
                self._compiled.move_to_end(key)
        if isinstance(known, InvalidRequestError):
            raise InvalidRequestError(known.message, param=known.param, code=known.code)
        if known is not None:
            return known
        try:
            result: Grammar | InvalidRequestError = self._compile(spec)
        except InvalidRequestError as exc:
            result = exc
        with self._lock:
            self._compiled[key] = result
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        if isinstance(result, InvalidRequestError):
            raise result
        return result

    def _compile(self, spec: dict[str, Any]) -> Grammar:
        kind = spec.get("type")
        if kind in ("regex", "choice", "grammar"):
            return self._compile_text(spec)
        param = str(spec.get("param") or SCHEMA_PARAM)
        if kind == "json_object":
            schema = ANY_OBJECT
        elif kind == "json_schema":
            given = spec.get("schema")
            if not isinstance(given, dict):
                raise InvalidRequestError("The JSON schema must be an object.", param=param)
            schema = given
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                raise InvalidRequestError(f"Invalid JSON schema: {exc.message}", param=param) from None
        else:
            raise InvalidRequestError(f"Unknown response_format type {kind!r}.", param="response_format.type")
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid JSON schema: {exc}", param=param) from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise InvalidRequestError(f"Unsupported JSON schema: {messages[0]}", param=param)
        self._trial(grammar, "JSON schema", param)  # its `pattern`s are regexes too
        distinct = spec.get("distinct")
        return Grammar(self, grammar, distinct if isinstance(distinct, str) else None)

    def _compile_text(self, spec: dict[str, Any]) -> Grammar:
        """A regex, choice or grammar constraint: no JSON to follow, so no budget closing."""
        param = str(spec.get("param") or spec["type"])
        try:
            grammar = lark_of(spec)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequestError(f"Invalid {spec['type']}: {exc}", param=param) from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise InvalidRequestError(f"Invalid {spec['type']}: {messages[0].strip()}", param=param)
        self._trial(grammar, spec["type"], param)
        return Grammar(self, grammar, json=False)

    def _trial(self, grammar: str, kind: str, param: str) -> None:
        """Refuse a grammar whose first mask is slow. Masks are computed in the scheduler's
        thread, where a slow one stalls the whole batch: a regex such as `(a{1000}){1000}`
        validates at once but takes seconds to follow over a real vocabulary. This trial runs
        here, in the thread that prepares the request."""
        started = time.perf_counter()
        LLMatcher(self.tokenizer, grammar).compute_bitmask()
        if time.perf_counter() - started > TRIAL_SECONDS:
            raise InvalidRequestError(
                f"The {kind} is too complex to follow over this model's vocabulary; simplify it "
                "(large counted repetitions such as a{1000} are the usual cause).", param=param,
            )


class Vocabulary:
    """Each token's bytes, looked up both ways, for the closing text and the budget window."""

    def __init__(self, tokenizer: LLTokenizer) -> None:
        self.size = tokenizer.vocab_size
        self.bytes = [tokenizer.decode_bytes([i]) for i in range(self.size)]
        self._ids: dict[bytes, list[int]] = {}
        plain = np.zeros(self.size, dtype=bool)
        for token, data in enumerate(self.bytes):
            self._ids.setdefault(data, []).append(token)
            # llguidance spells special tokens with a leading 0xFF, which no text contains.
            plain[token] = bool(data) and data[0] != 0xFF and not _STRUCTURAL.intersection(data)
        self.plain = plain  # tokens that only extend a string

    def prefixes(self, text: str) -> np.ndarray:
        """Tokens spelling a start of `text`."""
        data = text.encode()
        out = np.zeros(self.size, dtype=bool)
        for end in range(1, len(data) + 1):
            out[self._ids.get(data[:end], [])] = True
        return out


class Grammar:
    """A compiled grammar; each sequence starts its own `Constraint` from it."""

    def __init__(
        self, compiler: ConstraintCompiler, grammar: str, distinct: str | None = None, *, json: bool = True
    ) -> None:
        self._compiler = compiler
        self._grammar = grammar
        self._distinct = distinct
        self._json = json

    def start(self) -> Constraint:
        """A fresh matcher at the start of the grammar."""
        matcher = LLMatcher(self._compiler.tokenizer, self._grammar)
        cursor = JsonCursor(watch=self._distinct) if self._json else None
        return Constraint(matcher, self._compiler.vocabulary, cursor)


class Constraint:
    """One sequence's position in its grammar, and in the JSON it spells (None: not JSON)."""

    def __init__(self, matcher: LLMatcher, vocabulary: Vocabulary, cursor: JsonCursor | None) -> None:
        self._matcher = matcher
        self._vocabulary = vocabulary
        self._cursor = cursor
        self._budgeted = False  # the token limit has narrowed the choice

    @property
    def cut(self) -> bool:
        """Complete, but only because the token limit closed it: end with `"length"` now."""
        return self._budgeted and self._cursor is not None and self._cursor.complete

    def mask(self, logits: torch.Tensor, remaining: int) -> None:
        """Forbid, in place, every token the grammar does not allow next, nor the closing when
        `remaining` tokens (this one included) are all that is left, or an item has repeated."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]].astype(bool)
        if self._cursor is None:
            logits[~torch.from_numpy(allowed)] = float("-inf")
            return
        closing = self._cursor.closing()
        if closing and (self._cursor.repeated or remaining <= len(closing) + WINDOW):
            narrowed = allowed & self._closers(closing, remaining)[: allowed.shape[0]]
            if narrowed.any():  # else the schema wants more than closers: the grammar decides
                if not self._cursor.repeated and not self._budgeted:
                    self._budgeted = self._binding(logits, allowed, narrowed)
                allowed = narrowed
        logits[~torch.from_numpy(allowed)] = float("-inf")

    @staticmethod
    def _binding(logits: torch.Tensor, allowed: np.ndarray, narrowed: np.ndarray) -> bool:
        """Whether the limit changed the choice: the model's best token under the grammar alone
        is one the closing window forbids. (A closed tool schema that only allows `}` anyway is
        not cut by the limit, so its calls still parse.)"""
        scores = logits[: allowed.shape[0]].clone()
        scores[~torch.from_numpy(allowed)] = float("-inf")
        return not bool(narrowed[int(scores.argmax())])

    def _closers(self, closing: str, remaining: int) -> np.ndarray:
        assert self._cursor is not None  # only JSON is closed
        tokens = self._vocabulary.prefixes(closing)
        if self._cursor.in_string and remaining > len(closing) and not self._cursor.repeated:
            tokens |= self._vocabulary.plain  # the string being written may go on while there is room
        return tokens

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar does not allow it."""
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            return False
        if self._cursor is not None:
            self._cursor.feed(self._vocabulary.bytes[token])
        return True
