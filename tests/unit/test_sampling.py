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
