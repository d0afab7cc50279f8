"""What each benchmarked server answers, beside how fast it answers: every target over HTTP against
float32's greedy answers, and each chatgate runner's quality gate.

The gate (`quality.py`) scores a runner's weights in this process, teacher-forced, so it can be
computed for chatgate's runners only. A peer is judged by what a client sees: its greedy reply to
each of the 50 quality prompts, set against float32's greedy continuation of the same chat prompt,
token by token up to the first difference. One different token changes everything after it, so
this figure is lower than the gate's agreement for the same weights; it is the same measure for
every server, and the France question shows whether an answer a user would notice changed.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import httpx

from chatgate.bench.quality import PARIS_QUESTION, QUALITY_PROMPTS, greedy, quality_report
from chatgate.settings import EngineSettings

# Tokens of each reply compared; requests a target serves at once while it is asked.
ANSWER_TOKENS = 32
ANSWER_CONCURRENCY = 8


def reference_answers(
    settings: EngineSettings, *, tokens: int = ANSWER_TOKENS, prompts: list[str] = QUALITY_PROMPTS
) -> list[list[int]]:
    """float32's greedy continuation of each prompt's chat prompt (the quality prompts unless
    told), cut at end of text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatgate.engines.decoder import FastDecoder
    from chatgate.engines.loading import cached_checkpoint, resolve_chat_model

    path = cached_checkpoint(resolve_chat_model(settings.model_path), settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.eval()
    chats = [list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)) for text in prompts]
    configured = model.generation_config.eos_token_id
    ends = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    out = []
    for continuation in greedy(FastDecoder(model), chats, tokens):
        cut = next((i for i, token in enumerate(continuation) if token in ends), len(continuation))
        out.append(continuation[:cut])
    return out


def agreement(reference: list[int], reply: list[int]) -> float:
    """Share of `reference`'s tokens `reply` reproduces before the first difference (a reply
    that stops early or runs on past the reference's end counts as a difference there)."""
    same = 0
    for mine, theirs in zip(reference, reply, strict=False):
        if mine != theirs:
            break
        same += 1
    longest = max(len(reference), len(reply))
    return same / longest if longest else 1.0


async def _ask(http: httpx.AsyncClient, url: str, model: str, api_key: str, question: str, tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens, "temperature": 0}
    response = await http.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"})
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"] or "")


async def target_answers(http: httpx.AsyncClient, url: str, *, model: str, api_key: str,
                         tokens: int = ANSWER_TOKENS, prompts: list[str] = QUALITY_PROMPTS) -> list[str]:
    """The target's greedy reply to every prompt (the quality prompts unless told),
    `ANSWER_CONCURRENCY` at a time."""
    gate = asyncio.Semaphore(ANSWER_CONCURRENCY)

    async def one(question: str) -> str:
        async with gate:
            return await _ask(http, url, model, api_key, question, tokens)

    return list(await asyncio.gather(*(one(question) for question in prompts)))


def encode_replies(settings: EngineSettings, replies: dict[str, list[str]]) -> dict[str, list[list[int]]]:
    """Each target's replies as the model's token ids (for `agreement`)."""
    from transformers import AutoTokenizer

    from chatgate.engines.loading import cached_checkpoint, resolve_chat_model

    tokenizer = AutoTokenizer.from_pretrained(cached_checkpoint(resolve_chat_model(settings.model_path), settings.cache_dir))
    return {name: [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts] for name, texts in replies.items()}


def score_answers(
    reference: list[list[int]], replies: list[list[int]], texts: list[str], prompts: list[str] = QUALITY_PROMPTS
) -> dict[str, Any]:
    """How close a target's replies (as token ids) come to float32's, and its answer on France
    (which `prompts`, the quality prompts unless told, must hold)."""
    france = texts[prompts.index(PARIS_QUESTION)]
    shares = [agreement(mine, theirs) for mine, theirs in zip(reference, replies, strict=True)]
    return {
        "prompts": len(shares),
        "identical_answers": sum(share == 1.0 for share in shares) / len(shares),
        "agreement_before_first_difference": sum(shares) / len(shares),
        "paris_answer": france,
        "paris": "Paris" in france,
    }


def runner_gates(settings: EngineSettings) -> list[dict[str, Any]]:
    """The quality gate of each chatgate runner this machine has: llama.cpp (when it imports) and torch."""
    runners = ["llama.cpp"] if importlib.util.find_spec("llama_cpp") is not None else []
    return [quality_report(settings.model_copy(update={"engine": runner})) for runner in [*runners, "transformers"]]


def gate_line(gate: dict[str, Any]) -> str:
    """One gate result as a line of the bench's table."""
    verdict = "passes" if gate["passes"] else "fails"
    return (f"gate {gate['runner']:9} {gate['dtype']:9} {100 * gate['greedy_token_agreement']:6.2f}% of float32's "
            f"greedy tokens, France -> {gate['paris_answer']!r}: {verdict}")


def answers_line(name: str, scored: dict[str, Any]) -> str:
    """One target's answers as a line of the bench's table."""
    return (f"answers {name}: {100 * scored['identical_answers']:.0f}% of the {scored['prompts']} replies identical to "
            f"float32's, {100 * scored['agreement_before_first_difference']:.1f}% of its tokens before the first "
            f"difference, France -> {scored['paris_answer'][:40]!r}")

