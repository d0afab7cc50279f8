"""When the token limit closes constrained JSON, the reply says `length` only if the limit changed
the model's choice: a call that closes by itself inside the closing window is not cut."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from chatgate.engines.constraints import Constraint, ConstraintCompiler
from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.settings import default_cache_dir

pytestmark = pytest.mark.model

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler() -> ConstraintCompiler:
    tokenizer = AutoTokenizer.from_pretrained(cached_checkpoint(resolve_chat_model("default"), default_cache_dir()))
    return ConstraintCompiler(tokenizer, len(tokenizer))


def at(compiler: ConstraintCompiler, text: str) -> Constraint:
    """A constraint that has accepted `text`, token by token."""
    constraint = compiler.compile({"type": "json_schema", "schema": CITY}).start()
    for token in compiler.tokenizer.tokenize_str(text):
        assert constraint.accept(token)
    return constraint


def favouring(compiler: ConstraintCompiler, text: str) -> torch.Tensor:
    """Logits whose best token is the first of `text`."""
    logits = torch.zeros(compiler.vocabulary.size)
    logits[compiler.tokenizer.tokenize_str(text)[0]] = 10.0
    return logits


def finish(constraint: Constraint, compiler: ConstraintCompiler, text: str, remaining: int) -> None:
    for token in compiler.tokenizer.tokenize_str(text):
        constraint.mask(favouring(compiler, compiler.tokenizer.decode_str([token])), remaining)
        assert constraint.accept(token)
        remaining -= 1


def test_closing_by_itself_inside_the_window_is_not_cut(compiler: ConstraintCompiler) -> None:
    constraint = at(compiler, '{"city":"Paris')
    finish(constraint, compiler, '"}', remaining=3)  # inside the window, and what the model wants anyway
    assert not constraint.cut


def test_closing_forced_by_the_limit_is_cut(compiler: ConstraintCompiler) -> None:
    constraint = at(compiler, '{"city":"Paris')
    logits = favouring(compiler, " is lovely")  # the model wants to go on; two tokens are left
    constraint.mask(logits, 2)
    token = int(logits.argmax())
    assert compiler.vocabulary.bytes[token].startswith(b'"')  # only closing is allowed
    assert constraint.accept(token)
    finish(constraint, compiler, '}', remaining=1)
    assert constraint.cut
