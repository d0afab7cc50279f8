"""Small random PEFT LoRA adapters for the default model (and one for another base), built with `peft`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(base: Any, folder: Path, *, seed: int, rank: int = 8, spread: float = 0.08) -> Any:
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


def convert_to_gguf(adapter: Path, base: Path, target: Path) -> Path:
    """Convert a PEFT adapter to a GGUF LoRA file with llama.cpp's own `convert_lora_to_gguf.py`,
    from the llama-cpp-python source distribution (unpacked where `CHATGATE_LLAMA_CPP_SRC`
    points, else downloaded once into the pytest cache folder `cache`)."""
    import subprocess
    import sys

    script = _llama_cpp_source(target.parent) / "convert_lora_to_gguf.py"
    subprocess.run(
        [sys.executable, str(script), "--base", str(base), "--outtype", "f32", "--outfile", str(target), str(adapter)],
        check=True, capture_output=True, timeout=600,
    )
    return target


def _llama_cpp_source(scratch: Path) -> Path:
    import os
    import subprocess
    import sys
    import tarfile

    import llama_cpp

    given = os.environ.get("CHATGATE_LLAMA_CPP_SRC")
    if given:
        return Path(given)
    version = llama_cpp.__version__
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-cpp-python-{version}-src"
    source = folder / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (source / "convert_lora_to_gguf.py").exists():
        return source
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(folder)],
        check=True, capture_output=True, timeout=900,
    )
    with tarfile.open(folder / f"llama_cpp_python-{version}.tar.gz") as archive:
        wanted = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name and (
            m.name.endswith(("convert_lora_to_gguf.py", "convert_hf_to_gguf.py")) or "/conversion/" in m.name or "/gguf-py/" in m.name)]
        archive.extractall(folder, members=wanted, filter="data")
    return source
