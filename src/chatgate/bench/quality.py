"""What smaller weights cost in answers: a weight format's next-token choices against float32's.

For each of 50 fixed chat prompts, float32 continues greedily for a few dozen tokens. The
candidate format then reads the same prompt and continuation in one pass (teacher forcing), so
every position is compared on the same prefix:
- greedy token agreement: how often the candidate's most likely next token is float32's;
- mean |Δ logprob|: how far apart the two log-probabilities of float32's chosen token are.
A format can agree on 99% of tokens and still change an answer once it picks differently, so
the report also counts prompts whose whole greedy continuation is unchanged.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch

from chatgate.engines.decoder import FastDecoder
from chatgate.engines.kvcache import BatchKV
from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.engines.transformers import engine_threads
from chatgate.settings import EngineSettings

_COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "Italy", "Kenya", "Norway", "Peru", "India"]
_TOPICS = ["photosynthesis", "gravity", "inflation", "vaccines", "tides", "rainbows", "volcanoes",
           "the internet", "democracy", "recycling"]
_THINGS = ["the sea", "autumn leaves", "a city at night", "an old clock", "the moon", "a garden",
           "winter mornings", "a mountain", "rain", "a library"]
_ACTIVITIES = ["learning a language", "sleeping well", "saving money", "running a marathon",
               "cooking rice", "studying for exams", "writing clearly", "keeping plants alive",
               "public speaking", "travelling cheaply"]
_QUESTIONS = ["What is 12 times 7?", "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
              "How many legs does a spider have?", "What colour is the sky on a clear day?",
              "Name the largest planet in the solar system.", "What is the opposite of hot?",
              "How many days are in a leap year?", "What language is spoken in Spain?",
              "What do bees make?"]

# The gate a format must pass to be a default: this share of float32's greedy tokens, and Paris.
GATE = 0.99
PARIS_QUESTION = "What is the capital of France?"

QUALITY_PROMPTS: list[str] = list(
    itertools.chain(
        (f"What is the capital of {country}?" for country in _COUNTRIES),
        (f"Explain {topic} in two sentences." for topic in _TOPICS),
        (f"Write a short poem about {thing}." for thing in _THINGS),
        (f"Give three tips for {activity}." for activity in _ACTIVITIES),
        _QUESTIONS,
    )
)


@torch.inference_mode()
def forward_logprobs(decoder: Any, ids: list[int], keep: int) -> torch.Tensor:
    """Log-probabilities after each of the last `keep` positions of `ids`, in a fresh cache."""
    kv = BatchKV(int(decoder.config.num_hidden_layers))
    kv.pads = [0]
    logits = decoder(
        input_ids=torch.tensor([ids], device=decoder.device),
        attention_mask=kv.attention_mask(len(ids)).to(decoder.device),
        position_ids=kv.positions(len(ids)).to(decoder.device),
        past_key_values=kv.cache,
        logits_to_keep=keep,
    ).logits[0]
    return torch.log_softmax(logits.float().cpu(), dim=-1)


@torch.inference_mode()
def greedy(decoder: Any, prompts: list[list[int]], tokens: int, *, pad: int = 0) -> list[list[int]]:
    """`tokens` greedy tokens for each prompt, all prompts decoded together in one batch."""
    kv = BatchKV(int(decoder.config.num_hidden_layers))
    width = max(len(p) for p in prompts)
    kv.pads = [width - len(p) for p in prompts]
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(tokens):
        steps = ids.shape[1]
        logits = decoder(
            input_ids=ids.to(decoder.device),
            attention_mask=kv.attention_mask(steps).to(decoder.device),
            position_ids=kv.positions(steps).to(decoder.device),
            past_key_values=kv.cache,
            logits_to_keep=1,
        ).logits[:, -1]
        ids = logits.argmax(-1).cpu()[:, None]
        for row, token in enumerate(ids[:, 0].tolist()):
            out[row].append(int(token))
    return out


# Scores `ids` and returns the log-probabilities after each of its last `keep` positions.
Scorer = Callable[[list[int], int], torch.Tensor]


def compare(reference: Any, candidate: Scorer | Any, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """Agreement and log-probability distance of `candidate` (a `Scorer`, or a decoder like
    `reference`) with `reference` on greedy continuations."""
    if hasattr(candidate, "config"):
        candidate = functools.partial(forward_logprobs, candidate)
    continuations = greedy(reference, prompts, tokens)
    agree = total = unchanged = 0
    delta = 0.0
    for prompt, continuation in zip(prompts, continuations, strict=True):
        ids = prompt + continuation
        target = torch.tensor(continuation)
        mine = forward_logprobs(reference, ids[:-1], len(continuation))
        theirs = candidate(ids[:-1], len(continuation))
        matches = theirs.argmax(-1) == target
        agree += int(matches.sum())
        unchanged += int(bool(matches.all()))
        total += len(continuation)
        picked = torch.arange(len(continuation))
        delta += float((mine[picked, target] - theirs[picked, target]).abs().sum())
    return {
        "greedy_token_agreement": agree / total,
        "mean_abs_delta_logprob": delta / total,
        "prompts_unchanged": unchanged / len(prompts),
    }


def greedy_text(candidate: Scorer, tokenizer: Any, question: str, tokens: int = 16) -> str:
    """The candidate's greedy answer to `question` (recomputed from scratch each token: short answers only)."""
    ids = _chat_ids(tokenizer, question)
    out: list[int] = []
    for _ in range(tokens):
        token = int(candidate(ids + out, 1)[-1].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
    return str(tokenizer.decode(out, skip_special_tokens=True))


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False))


def runner_for(settings: EngineSettings) -> str:
    """The runner `settings` serve the chat model on: llama.cpp or torch."""
    if settings.engine == "llama.cpp":
        return "llama.cpp"
    if settings.engine == "auto" and resolve_chat_model(settings.model_path).gguf_file is not None:
        return "llama.cpp" if importlib.util.find_spec("llama_cpp") is not None else "torch"
    return "torch"


def _llama_scorer(settings: EngineSettings) -> Scorer:
    from chatgate.engines.llamacpp import cached_gguf, decode_threads
    from chatgate.engines.runners.llamacpp import GgufModel, LlamaCppRunner

    threads = decode_threads(settings.num_threads)
    path = cached_gguf(resolve_chat_model(settings.model_path), settings.cache_dir, settings.weights("bfloat16"), threads=threads)
    runner = LlamaCppRunner(GgufModel.load(path), kv_tokens=256, sequences=1, threads=threads)
    return lambda ids, keep: torch.log_softmax(runner.prompt_logits(ids)[-keep:].float(), dim=-1)


def quality_report(settings: EngineSettings, *, tokens: int = 32) -> dict[str, Any]:
    """The served weights (`settings`' runner and `--dtype`) against float32 on `QUALITY_PROMPTS`,
    `tokens` greedy tokens each, and the candidate's answer to the France question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runner = runner_for(settings)
    dtype = settings.weights("bfloat16" if runner == "llama.cpp" else "float32")
    if runner == "llama.cpp" and not resolve_chat_model(settings.model_path).packaged:
        dtype = "as stored in the file"  # llama.cpp serves a GGUF file of your own unconverted
    print(f"quality: {runner} {dtype} against float32 on {len(QUALITY_PROMPTS)} prompts", file=sys.stderr, flush=True)
    torch.set_num_threads(engine_threads(settings.num_threads))
    path = cached_checkpoint(resolve_chat_model(settings.model_path), settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.to(settings.device).eval()
    if runner == "llama.cpp":
        candidate = _llama_scorer(settings)
    else:
        shadow = copy.deepcopy(model)  # the float32 format rewrites the modules' weights as views
        candidate = functools.partial(forward_logprobs, FastDecoder(shadow, weight_format=dtype))
    reference = FastDecoder(model)
    prompts = [_chat_ids(tokenizer, text) for text in QUALITY_PROMPTS]
    result: dict[str, Any] = {"runner": runner, "dtype": dtype, "prompts": len(prompts), "tokens_per_prompt": tokens}
    result.update(compare(reference, candidate, prompts, tokens))
    answer = greedy_text(candidate, tokenizer, PARIS_QUESTION)
    result.update(paris_answer=answer, paris="Paris" in answer)
    result["passes"] = result["greedy_token_agreement"] >= GATE and result["paris"]
    return result
