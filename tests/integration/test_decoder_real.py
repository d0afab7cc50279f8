"""The fast decoder keeps the default model's greedy answers: same tokens as Hugging Face's forward."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatgate.bench.quality import compare, greedy
from chatgate.engines.decoder import FastDecoder
from chatgate.engines.loading import cached_checkpoint, resolve_chat_model
from chatgate.settings import default_cache_dir

pytestmark = pytest.mark.model

PROMPTS = [
    "What is the capital of France?",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Give three tips for sleeping well.",
    "Explain photosynthesis in two sentences.",
    "How many legs does a spider have?",
]


def test_greedy_tokens_match_hugging_face_alone_and_batched() -> None:
    path = cached_checkpoint(resolve_chat_model("default"), default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = reference.eval()
    fast = FastDecoder(copy.deepcopy(reference))
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
        for p in PROMPTS
    ]
    expected = [greedy(reference, [prompt], 24)[0] for prompt in prompts]
    assert "Paris" in tokenizer.decode(expected[0])
    assert greedy(fast, prompts, 24) == expected
    assert [greedy(fast, [prompt], 24)[0] for prompt in prompts[:2]] == expected[:2]


def test_bfloat16_weights_keep_the_default_models_answers() -> None:
    """Rounding only the products to bfloat16 (with float32 rescoring of the vocabulary's best
    candidates) keeps "Paris", which a model wholly in bfloat16 gets wrong."""
    path = cached_checkpoint(resolve_chat_model("default"), default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = FastDecoder(copy.deepcopy(model.eval()))
    candidate = FastDecoder(model, weight_format="bfloat16")
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
        for p in PROMPTS
    ]
    answer = tokenizer.decode(greedy(candidate, prompts[:1], 12)[0])
    assert "Paris" in answer, answer
    drift = compare(reference, candidate, prompts, 24)
    assert drift["greedy_token_agreement"] >= 0.97, drift
