"""The fast decoder keeps the default model's greedy answers: same tokens as Hugging Face's forward."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatgate.bench.quality import greedy
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
