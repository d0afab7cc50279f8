"""Tokens to text deltas: stop strings, split UTF-8 characters, finish reasons."""

from __future__ import annotations

from typing import Any

from chatgate.engines.base import SamplingParams
from chatgate.engines.fake import EOS, FakeEngine
from chatgate.engines.sequence import SequenceState

decode = FakeEngine().decode


def run(text: str, **params: Any) -> tuple[list[str], str | None]:
    """`text` fed through a sequence under `params` (`SamplingParams` fields; `max_tokens` 1000 unless given)."""
    state = SequenceState(
        prompt_ids=[1, 2],
        params=SamplingParams(**{"max_tokens": 1000, **params}),
        decode=decode,
        eos_token_ids=frozenset({EOS}),
    )
    deltas: list[str] = []
    for token in [*text.encode(), EOS]:
        out = state.append(token)
        if out is not None:
            deltas.append(out.text)
        if state.finished:
            break
    return deltas, state.finish_reason


def test_plain_text_ends_with_stop_at_eos() -> None:
    deltas, reason = run("hello world")
    assert "".join(deltas) == "hello world"
    assert reason == "stop"


def test_multibyte_character_is_never_split() -> None:
    deltas, _ = run("a✓b€c")
    assert "".join(deltas) == "a✓b€c"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_not_returned() -> None:
    deltas, reason = run("one two. three", stop=(". ",))
    assert "".join(deltas) == "one two"
    assert reason == "stop"


def test_stop_string_prefix_is_held_back_then_released() -> None:
    deltas, _ = run("ab.c", stop=(".x",))
    assert "".join(deltas) == "ab.c"
    assert ".x" not in "".join(deltas)


def test_earliest_of_several_stops_wins() -> None:
    deltas, _ = run("xx END yy STOP", stop=("STOP", "END"))
    assert "".join(deltas) == "xx "


def test_length_finish_and_token_count() -> None:
    state = SequenceState(
        prompt_ids=[1], params=SamplingParams(max_tokens=3), decode=decode, eos_token_ids=frozenset()
    )
    outs = [state.append(t) for t in b"abcdef"[:3]]
    assert state.finish_reason == "length"
    last = outs[-1]
    assert last is not None and last.completion_tokens == 3 and last.prompt_tokens == 1


def test_stop_token_ids_end_the_sequence() -> None:
    deltas, reason = run("abc", stop_token_ids=(ord("b"),))
    assert "".join(deltas) == "a" and reason == "stop"
