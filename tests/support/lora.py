"""Small random PEFT LoRA adapters for the default model (and one for another base), built with `peft`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(base: Any, folder: Path, *, seed: int, rank: int = 8, spread: float = 0.3) -> Any:
    """Save a random LoRA adapter for `base` (left untouched) in `folder`; return the merged
    model (the base with the adapter's deltas added to its weights, by `peft`)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # small enough to keep the model fluent, large enough to change its answers
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, spread / rank**0.5)
    model.save_pretrained(str(folder))
    return model.merge_and_unload().eval()


def other_base_adapter(folder: Path) -> None:
    """Save a LoRA adapter made for a small random Llama of other shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    get_peft_model(tiny, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).save_pretrained(str(folder))
