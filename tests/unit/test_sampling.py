"""Sampling one token under a request's parameters."""

from __future__ import annotations

from typing import Any

import torch

from chatgate.engines.base import SamplingParams
from chatgate.engines.sampling import make_generator, sample_with_logprob


def draw(logits: torch.Tensor, seed: int, n: int = 20, **params: Any) -> list[int]:
    """`n` draws under `params` (`SamplingParams` fields)."""
    generator = make_generator(seed)
    p = SamplingParams(max_tokens=1, **params)
    return [sample_with_logprob(logits, p, prompt_ids=[], output_ids=[], generator=generator)[0] for _ in range(n)]


LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy_takes_argmax() -> None:
    assert set(draw(LOGITS, 0, temperature=0.0)) == {1}


def test_same_seed_same_tokens() -> None:
    assert draw(LOGITS, 7, temperature=1.0) == draw(LOGITS, 7, temperature=1.0)
    assert draw(LOGITS, 7, temperature=1.0, n=50) != draw(LOGITS, 8, temperature=1.0, n=50)


def test_top_k_limits_choices() -> None:
    assert set(draw(LOGITS, 1, n=200, temperature=2.0, top_k=2)) <= {1, 2}


def test_top_p_limits_choices() -> None:
    assert set(draw(LOGITS, 1, n=200, temperature=1.0, top_p=0.5)) == {1}


def test_logit_bias_can_force_a_token() -> None:
    assert set(draw(LOGITS, 0, temperature=0.0, logit_bias={4: 100.0})) == {4}


def test_repetition_penalty_discourages_seen_tokens() -> None:
    p = SamplingParams(max_tokens=1, temperature=0.0, repetition_penalty=10.0)
    token = sample_with_logprob(LOGITS, p, prompt_ids=[1], output_ids=[], generator=make_generator(0))[0]
    assert token == 2


def test_frequency_penalty_counts_occurrences() -> None:
    p = SamplingParams(max_tokens=1, temperature=0.0, frequency_penalty=1.0)
    token = sample_with_logprob(LOGITS, p, prompt_ids=[], output_ids=[1, 1], generator=make_generator(0))[0]
    assert token == 2


def test_top_p_zero_keeps_the_most_likely_token() -> None:
    assert set(draw(LOGITS, 3, temperature=1.0, top_p=0.0)) == {1}


def test_extreme_but_valid_parameters_still_sample() -> None:
    for params in ({"temperature": 2e-5}, {"min_p": 1.0}, {"repetition_penalty": 0.01}, {"top_k": 10_000}):
        tokens = draw(LOGITS, 3, temperature=params.pop("temperature", 1.0), **params)
        assert all(0 <= t < len(LOGITS) for t in tokens)


HUGE = 1.7976931348623157e308  # the largest float the JSON schema lets through
EXTREMES: list[dict[str, object]] = [
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": HUGE},
    {"logit_bias": {1: HUGE, 2: HUGE, 0: -HUGE}},
    {"logit_bias": {i: -HUGE for i in range(len(LOGITS))}},  # everything forbidden
    {"logit_bias": {2**70: 5.0, -3: 100.0, 4: 1e-300}},  # ids outside the vocabulary are ignored
    {"frequency_penalty": HUGE, "presence_penalty": -HUGE},
    {"frequency_penalty": -HUGE, "presence_penalty": HUGE},
    {"top_p": 1e-300, "min_p": 1.0, "top_k": 1},
]


def test_parameters_at_the_float_limits_never_crash() -> None:
    for extreme in EXTREMES:
        for temperature in (0.0, 1e-5 * 1.01, 1.0, 2.0):
            params = SamplingParams(max_tokens=1, temperature=temperature, logprobs=3, **extreme)  # type: ignore[arg-type]
            for seed in (0, 2**64, 2**200, -(2**100)):
                token, logprob = sample_with_logprob(
                    LOGITS, params, prompt_ids=[1, 3], output_ids=[1, 1, 4], generator=make_generator(seed)
                )
                assert 0 <= token < len(LOGITS), extreme
                assert logprob is not None and -9999.0 <= logprob.logprob <= 0.0, (extreme, logprob)
                assert all(-9999.0 <= value <= 0.0 for _, value in logprob.top), (extreme, logprob)


def test_a_forbidding_bias_still_forbids_and_a_huge_one_still_forces() -> None:
    assert set(draw(LOGITS, 1, logit_bias={1: -HUGE, 2: -HUGE})) <= {0, 3, 4}
    assert set(draw(LOGITS, 1, logit_bias={4: HUGE})) == {4}


def test_seeds_beyond_64_bits_give_fixed_streams() -> None:
    assert draw(LOGITS, 2**64 + 5) == draw(LOGITS, 2**64 + 5)
    assert draw(LOGITS, 2**64 + 5) == draw(LOGITS, 5)  # the seed is taken modulo 2**64
    assert draw(LOGITS, 7) == draw(LOGITS, 7)
