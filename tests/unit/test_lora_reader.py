"""Reading PEFT adapters: what is refused, naming the adapter and the reason, before anything is served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from chatgate.engines.lora import AdapterError, LoraSpec, checked_name, read_peft


@pytest.fixture(scope="module")
def tiny() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def adapter(folder: Path, config: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4} | (config or {})))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    default = {f"{prefix}.lora_A.weight": torch.randn(2, 32), f"{prefix}.lora_B.weight": torch.randn(32, 2)}
    save_file(tensors if tensors is not None else default, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_fitting_adapter_reads_with_its_scale(tiny: Any, tmp_path: Path) -> None:
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(2, 32), f"{prefix}.lora_B.weight": torch.randn(32, 2)}
    read = read_peft("a", adapter(tmp_path / "a", tensors=tensors), tiny)
    a, b = read.layers[0]["q_proj"]
    assert a.shape == (32, 2) and b.shape == (2, 32) and read.layers[1] == {}
    raw = read_peft("b", adapter(tmp_path / "b", {"lora_alpha": 2}, tensors), tiny).layers[0]["q_proj"][1]
    assert torch.allclose(b, raw * 2)  # alpha / r: 2 against 1


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "biases"),
        ({"modules_to_save": ["lm_head"]}, "modules"),
        ({"rank_pattern": {"q_proj": 4}}, "per-module ranks"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"r": 0}, "positive integer r"),
        ({"lora_alpha": "x"}, "finite lora_alpha"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tiny: Any, tmp_path: Path, config: dict[str, Any], words: str) -> None:
    with pytest.raises(AdapterError) as refused:
        read_peft("odd", adapter(tmp_path / "odd", config), tiny)
    assert "'odd'" in refused.value.message and words in refused.value.message
    assert refused.value.status == 400 and refused.value.param == "lora_path"


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 48),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2)}, "another base model"),
        ({"base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.randn(2, 32),
          "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight": torch.randn(64, 2)}, "has 2 layers"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32)}, "not both"),
        ({"base_model.model.lm_head.lora_A.weight": torch.randn(2, 32)}, "other than the attention"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((2, 32), float("nan")),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2)}, "NaN"),
        ({}, "holds no LoRA weights"),
    ],
)
def test_tensors_that_do_not_fit_are_refused_by_name(tiny: Any, tmp_path: Path, tensors: dict[str, torch.Tensor], words: str) -> None:
    with pytest.raises(AdapterError) as refused:
        read_peft("odd", adapter(tmp_path / "odd", tensors=tensors), tiny)
    assert words in refused.value.message


def test_paths_and_names(tiny: Any, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        read_peft("x", tmp_path / "missing", tiny)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read"):
        read_peft("x", broken, tiny)
    assert LoraSpec.parse("tuned=~/a").name == "tuned"
    for bad in ("tuned", "=path", "bad name=path"):
        with pytest.raises(AdapterError):
            LoraSpec.parse(bad)
    with pytest.raises(AdapterError):
        checked_name("x" * 129)


def test_lora_on_an_engine_without_adapters_stops_the_start() -> None:
    import asyncio

    from chatgate.settings import EngineSettings
    from chatgate.worker.backend import open_backend

    async def start() -> None:
        async with open_backend(EngineSettings(engine="fake", lora=["a=/x"])):
            pass

    with pytest.raises(ValueError, match="--lora needs the transformers or llama.cpp engine"):
        asyncio.run(start())


def test_the_decoder_adds_each_rows_own_adapter(tiny: Any, tmp_path: Path) -> None:
    """Rows of an adapter get the merged weights' logits; base rows, and rows naming an adapter
    removed meanwhile (their request has ended), get the base model's."""
    import copy

    from chatgate.bench.quality import greedy
    from chatgate.engines.decoder import FastDecoder

    torch.manual_seed(1)
    prefix = "base_model.model.model.layers.{}.{}.lora_{}.weight"
    shapes = {("self_attn", "q_proj"): (32, 32), ("self_attn", "v_proj"): (32, 16), ("mlp", "down_proj"): (64, 32)}
    tensors = {}
    for (block, target), (fan_in, fan_out) in shapes.items():
        tensors[prefix.format(1, f"{block}.{target}", "A")] = torch.randn(2, fan_in)
        tensors[prefix.format(1, f"{block}.{target}", "B")] = torch.randn(fan_out, 2)
    read = read_peft("a", adapter(tmp_path / "a", tensors=tensors), tiny)
    merged = copy.deepcopy(tiny)
    with torch.no_grad():
        for (block, target), _ in shapes.items():
            linear = getattr(getattr(merged.model.layers[1], block), target)
            a = tensors[prefix.format(1, f"{block}.{target}", "A")]
            b = tensors[prefix.format(1, f"{block}.{target}", "B")]
            linear.weight += 2.0 * b @ a  # alpha 4 / r 2
    base_decoder = FastDecoder(copy.deepcopy(tiny))
    merged_decoder = FastDecoder(merged)
    served = FastDecoder(copy.deepcopy(tiny))
    served.add_adapter(read)

    class Rows:
        def __init__(self, lora: list[str | None]) -> None:
            self.lora, self.config, self.device = lora, served.config, served.device

        def __call__(self, **kw: Any) -> Any:
            return served(**kw, lora=self.lora)

    prompts = [[1, 5, 9, 3], [2, 7], [4, 4, 8]]
    with torch.inference_mode():
        expected = [greedy(merged_decoder, [prompts[0]], 6)[0], greedy(base_decoder, [prompts[1]], 6)[0]]
        assert greedy(Rows(["a", None, "a"]), prompts, 6)[:2] == expected
        served.remove_adapter("a")
        assert greedy(Rows(["a", None, None]), prompts[:2], 6) == [greedy(base_decoder, [prompts[0]], 6)[0], expected[1]]
    assert expected[0] != greedy(base_decoder, [prompts[0]], 6)[0]
