"""Tokens to text deltas: stop strings, split UTF-8 characters, finish reasons."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from chatgate.engines.base import GenerationOutput, SamplingParams
from chatgate.engines.fake import EOS, FakeEngine
from chatgate.engines.sequence import OutputChannel, Sequence

decode = FakeEngine().decode


def run(text: str, **params: Any) -> tuple[list[str], str | None]:
    """`text` fed through a sequence under `params` (`SamplingParams` fields; `max_tokens` 1000 unless given)."""
    seq = Sequence(
        prompt_ids=[1, 2],
        params=SamplingParams(**{"max_tokens": 1000, **params}),
        decode=decode,
        eos_token_ids=frozenset({EOS}),
    )
    deltas: list[str] = []
    for token in [*text.encode(), EOS]:
        out = seq.append(token)
        if out is not None:
            deltas.append(out.text)
        if seq.finished:
            break
    return deltas, seq.finish_reason


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
    seq = Sequence(
        prompt_ids=[1], params=SamplingParams(max_tokens=3), decode=decode, eos_token_ids=frozenset()
    )
    outs = [seq.append(t) for t in b"abcdef"[:3]]
    assert seq.finish_reason == "length"
    last = outs[-1]
    assert last is not None and last.completion_tokens == 3 and last.prompt_tokens == 1


def test_stop_token_ids_end_the_sequence() -> None:
    deltas, reason = run("abc", stop_token_ids=(ord("b"),))
    assert "".join(deltas) == "a" and reason == "stop"


def _output(text: str) -> GenerationOutput:
    return GenerationOutput(text=text, token_ids=[], prompt_tokens=1, completion_tokens=1)


@pytest.mark.anyio
async def test_outputs_from_a_thread_arrive_in_order_with_few_wakeups(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    wakeups = 0
    wake = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return wake(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    channels = [OutputChannel(loop) for _ in range(16)]
    steps = 50

    def engine() -> None:  # one batch step puts one output per row, as the scheduler does
        for step in range(steps):
            for channel in channels:
                channel.put(_output(str(step)))

    # Outputs put while the loop has not drained the mailbox share one wake-up: all of them, here.
    worker = threading.Thread(target=engine)
    worker.start()
    worker.join()
    got = [[(await channel.get()).text for _ in range(steps)] for channel in channels]
    assert got == [[str(step) for step in range(steps)]] * 16
    assert wakeups <= 2, wakeups
    # Interleaved with the reader, they still arrive in order, with fewer wake-ups than outputs
    # (how many fewer depends on how the two threads are scheduled: a loaded machine wakes more).
    wakeups = 0
    worker = threading.Thread(target=engine)
    worker.start()
    got = [[(await channel.get()).text for _ in range(steps)] for channel in channels]
    worker.join()
    assert got == [[str(step) for step in range(steps)]] * 16
    assert wakeups < steps * 16, wakeups


def test_a_closed_loop_cancels_the_channel() -> None:
    loop = asyncio.new_event_loop()
    channel = OutputChannel(loop)
    loop.close()
    channel.put(_output("late"))
    assert channel.cancelled


def test_a_loop_that_is_gone_leaves_no_mailbox_behind() -> None:
    import gc
    import weakref

    loop = asyncio.new_event_loop()
    OutputChannel(loop).put(_output("x"))
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None  # its mailbox (keyed weakly by the loop) no longer holds it alive


@pytest.mark.parametrize(
    ("text", "stop", "matched"),
    [
        ("one two. three", (". ", "zz"), ". "),  # the stop string that ended it, in the last output
        ("abcdef", ("cd", "bcd"), "bcd"),  # the earliest match wins, whichever is listed first
        ("hello", ("zz",), None),  # ended by the end-of-sequence token: no stop string
        ("hello world", (), None),
    ],
)
def test_the_stop_string_that_ended_it_is_reported(text: str, stop: tuple[str, ...], matched: str | None) -> None:
    state = Sequence(prompt_ids=[1], params=SamplingParams(max_tokens=1000, stop=stop), decode=decode, eos_token_ids=frozenset({EOS}))
    outputs = [out for token in [*text.encode(), EOS] if not state.finished and (out := state.append(token)) is not None]
    assert state.finish_reason == "stop" and state.stop_sequence == matched
    assert outputs[-1].stop_sequence == matched and all(out.stop_sequence is None for out in outputs[:-1])
