"""The JSON cursor behind budget-aware constrained decoding: from any prefix of a JSON object, the
text it proposes closes it; and it notices an item repeated in the watched array."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings, strategies as st

from chatgate.engines.json_cursor import JsonCursor

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=12)
objects = st.dictionaries(st.text(max_size=3), values, max_size=4)


def compact(value: Any, ascii_only: bool = True) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only).encode()


@settings(max_examples=150, deadline=None)
@given(objects)
def test_every_prefix_plus_its_closing_is_json(value: dict[str, Any]) -> None:
    text = compact(value)
    for end in range(len(text) + 1):
        cursor = JsonCursor()
        cursor.feed(text[:end])
        closed = text[:end] + cursor.closing().encode()
        assert isinstance(json.loads(closed), dict), closed
        assert cursor.complete == (end == len(text))


def test_bytes_fed_one_token_at_a_time_or_all_at_once_agree() -> None:
    text = compact({"a": [1, "x\\\"y", {"b": None}], "\u00e9": True}, ascii_only=False)
    whole, pieces = JsonCursor(), JsonCursor()
    whole.feed(text[:20])
    for i in range(20):
        pieces.feed(text[i : i + 1])
    assert whole.closing() == pieces.closing()


def test_in_string_only_inside_a_string_and_not_mid_escape() -> None:
    cursor = JsonCursor()
    cursor.feed(b'{"city":"Par')
    assert cursor.in_string and cursor.closing() == '"}'
    cursor.feed(b"\\")
    assert not cursor.in_string
    cursor.feed(b'n"')
    assert not cursor.in_string and cursor.closing() == "}"


def test_a_repeated_call_in_the_watched_array_is_noticed_whatever_its_key_order() -> None:
    cursor = JsonCursor(watch="tool_calls")
    cursor.feed(b'{"tool_calls":[{"name":"f","arguments":{"city":"Paris","unit":"c"}},')
    cursor.feed(b'{"name":"f","arguments":{"city":"Rome","unit":"c"}},')
    assert not cursor.repeated
    cursor.feed(b'{"arguments":{"unit":"c","city":"Paris"},"name":"f"}')
    assert cursor.repeated and cursor.closing() == "]}"


def test_only_the_watched_array_counts() -> None:
    cursor = JsonCursor(watch="tool_calls")
    cursor.feed(b'{"other":[1,1],"tool_calls":[{"a":[2,2]}')
    assert not cursor.repeated
