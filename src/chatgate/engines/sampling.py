"""Turning next-token logits into a token under one request's sampling parameters.

Every value the API schema admits must sample without an error: penalties and biases at the
float limits can overflow logits to infinity or NaN, so logits are kept finite (NaN counts as
forbidden), and a row where everything is forbidden falls back to the model's own choice.
"""

from __future__ import annotations

import math
import os

import torch

from chatgate.engines.base import SamplingParams, TokenLogprob


# The log-probability reported for a token the processed distribution rules out (as OpenAI
# does); JSON has no -Infinity.
MIN_LOGPROB = -9999.0
_SEED_RANGE = 2**64


def make_generator(seed: int | None) -> torch.Generator:
    """A private random generator: the same seed gives the same tokens whatever else runs."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    elif not -(2**63) <= seed < _SEED_RANGE:
        seed %= _SEED_RANGE  # torch takes 64 bits; a wider seed still picks a fixed stream
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def finite(logits: torch.Tensor) -> torch.Tensor:
    """`logits` with NaN as -inf (forbidden) and +inf as the largest float."""
    return torch.nan_to_num(logits, nan=-math.inf, posinf=torch.finfo(logits.dtype).max, neginf=-math.inf)


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """Logit bias, repetition (HF style) and presence / frequency (OpenAI style) penalties."""
    vocab = logits.shape[-1]
    bias = [(token, value) for token, value in params.logit_bias.items() if 0 <= token < vocab]
    if bias:
        ids = torch.tensor([token for token, _ in bias], dtype=torch.long)
        logits[ids] += torch.tensor([value for _, value in bias], dtype=logits.dtype)
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        seen = seen[(seen >= 0) & (seen < vocab)]
        values = logits[seen]
        logits[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab]
        seen = counts.nonzero().squeeze(-1)  # unseen tokens are left alone (inf * 0 is NaN)
        logits[seen] -= params.frequency_penalty * counts[seen].to(logits.dtype) + params.presence_penalty
    return finite(logits)


def scored(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in a row of log-probabilities, with the `top` most likely alternatives."""
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = [(int(i), _reportable(float(v))) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return TokenLogprob(token_id=token, logprob=_reportable(float(logprobs[token])), top=alternatives)


def _reportable(logprob: float) -> float:
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB


def token_logprob(processed: torch.Tensor, params: SamplingParams, token: int) -> TokenLogprob:
    """The log-probability of `token` under the request's processed distribution (penalties,
    logit bias and temperature applied; greedy requests use temperature 1), with the top
    `params.logprobs` alternatives."""
    scale = 1.0 if params.greedy else params.temperature
    return scored(torch.log_softmax(finite(processed / scale), dim=-1), token, params.logprobs or 0)


def sample_with_logprob(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    prompt_ids: list[int],
    output_ids: list[int],
    generator: torch.Generator,
) -> tuple[int, TokenLogprob | None]:
    """Pick the next token, and its log-probability when the request asks for them."""
    processed = apply_penalties(logits.float().clone(), params, prompt_ids, output_ids)
    if bool(torch.isneginf(processed).all()):  # everything forbidden: take the model's choice
        processed = finite(logits.float().clone())
    token = _choose(processed, params, generator)
    return token, token_logprob(processed, params, token) if params.logprobs is not None else None


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = finite(logits / params.temperature)
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator).item())
