"""Turning next-token logits into a token under one request's sampling parameters."""

from __future__ import annotations

import os

import torch

from chatgate.engines.base import SamplingParams, TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    """A private random generator: the same seed gives the same tokens whatever else runs."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """Logit bias, repetition (HF style) and presence / frequency (OpenAI style) penalties."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
        valid = ids < logits.shape[-1]
        bias = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
        logits[ids[valid]] += bias[valid]
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def scored(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in a row of log-probabilities, with the `top` most likely alternatives."""
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=alternatives)


def token_logprob(processed: torch.Tensor, params: SamplingParams, token: int) -> TokenLogprob:
    """The log-probability of `token` under the request's processed distribution (penalties,
    logit bias and temperature applied; greedy requests use temperature 1), with the top
    `params.logprobs` alternatives."""
    scale = 1.0 if params.greedy else params.temperature
    return scored(torch.log_softmax(processed / scale, dim=-1), token, params.logprobs or 0)


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
    token = _choose(processed, params, generator)
    return token, token_logprob(processed, params, token) if params.logprobs is not None else None


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = logits / params.temperature
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
