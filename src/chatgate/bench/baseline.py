"""The reference point: plain Hugging Face `generate`, greedy, one sequence, no chatgate code."""

from __future__ import annotations

import time
from typing import Any

import torch

from chatgate.bench.load import PROMPTS
from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.settings import EngineSettings


def hf_generate_tokens_per_s(settings: EngineSettings, *, max_tokens: int, runs: int = 2) -> float:
    """Best-of-`runs` tokens/s of `model.generate` on the served checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cached_checkpoint(resolve_chat_model(settings.model_path), settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    best = 0.0
    with torch.inference_mode():
        for _ in range(runs):
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
            produced = out.shape[1] - inputs["input_ids"].shape[1]
            best = max(best, produced / (time.perf_counter() - start))
    return best
