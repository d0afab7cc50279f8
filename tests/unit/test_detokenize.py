"""Incremental detokenisation: the same text as a full decode, at a cost that does not grow."""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq

import pytest

from chatgate.engines.base import SamplingParams
from chatgate.engines.detokenize import IncrementalDecoder
from chatgate.engines.fake import FakeEngine
from chatgate.engines.sequence import Sequence
from tests.support.tokenizer import real_tokenizer

byte_decode = FakeEngine().decode
WORDS = ["hello", "wörld", "✓", "😀", "€uro", " ", "\n", "日本語", "a", "STOP", "."]


def sentencepiece_decode(ids: Seq[int]) -> str:
    """A SentencePiece-like decoder: token i is '▁w' or 'w'; the first piece loses its space."""
    text = "".join(("▁" if i % 2 else "") + WORDS[i // 2 % len(WORDS)] for i in ids)
    return text.replace("▁", " ").removeprefix(" ")


def pieces(decode: object, ids: list[int]) -> str:
    decoder = IncrementalDecoder(decode)  # type: ignore[arg-type]
    return "".join(decoder.push(t) for t in ids) + decoder.flush()


def random_bytes_text(rng: random.Random, n: int) -> list[int]:
    return list("".join(rng.choice(WORDS) for _ in range(n)).encode())


@pytest.mark.parametrize("seed", range(20))
def test_byte_level_pieces_join_to_the_full_decode(seed: int) -> None:
    rng = random.Random(seed)
    ids = random_bytes_text(rng, 40)
    if seed % 3 == 0:  # junk bytes that never form a character, then a character split in two
        ids[5:5] = [0x80] * 12 + [0xE2, 0x9C]
    assert pieces(byte_decode, ids) == byte_decode(ids)


def test_pieces_never_end_in_half_a_character() -> None:
    decoder = IncrementalDecoder(byte_decode)
    out = [decoder.push(t) for t in "a✓😀b".encode()]
    assert "".join(out) == "a✓😀b"
    assert all("\ufffd" not in piece for piece in out)


@pytest.mark.parametrize("seed", range(5))
def test_sentencepiece_spaces_are_kept_between_pieces(seed: int) -> None:
    ids = [random.Random(seed).randrange(2 * len(WORDS)) for _ in range(60)]
    assert pieces(sentencepiece_decode, ids) == sentencepiece_decode(ids)


class CountingDecode:
    """A decoder that records how many tokens each call decodes."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, ids: Seq[int]) -> str:
        self.calls.append(len(ids))
        return byte_decode(ids)


def test_work_per_token_does_not_grow_over_4000_tokens() -> None:
    counting = CountingDecode()
    params = SamplingParams(max_tokens=4000, stop=("never appears", "STOP!"))
    seq = Sequence(prompt_ids=[1], params=params, decode=counting, eos_token_ids=frozenset())
    ids = random_bytes_text(random.Random(7), 2000)[:4000]
    work: list[int] = []
    text = ""
    for token in ids:
        before = len(counting.calls)
        out = seq.append(token)
        work.append(sum(counting.calls[before:]))
        text += out.text if out is not None else ""
    assert seq.finish_reason == "length" and text == byte_decode(ids)
    first, last = sum(work[:500]), sum(work[-500:])
    assert last <= 1.3 * first, (first, last)


@pytest.mark.model
def test_real_tokenizer_pieces_join_to_the_full_decode() -> None:
    tokenizer = real_tokenizer()

    def decode(ids: Seq[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))  # type: ignore[attr-defined]

    text = "Grüße aus Zürich! 日本語のテキスト 😀👍🏽 — naïve café\n\tcode: `x = 1`  <|im_end|> end"
    ids = list(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]
    assert pieces(decode, ids) == decode(ids)
    rng = random.Random(0)
    vocab = int(tokenizer.vocab_size)  # type: ignore[attr-defined]
    for _ in range(5):  # random token soup, byte tokens that split characters included
        ids = [rng.randrange(vocab) for _ in range(200)]
        assert pieces(decode, ids) == decode(ids)
