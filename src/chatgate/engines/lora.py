"""LoRA adapters served as models of their own: reading a PEFT adapter and checking it fits.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. For each
adapted linear `W` ([out, in]) it stores `lora_A` ([r, in]) and `lora_B` ([out, r]); the adapted
layer computes `x W^T + scale * (x A^T) B^T` with `scale = lora_alpha / r` (`/ sqrt(r)` with
rsLoRA). The decoder (`decoder.py`) adds that delta to the rows whose sequence uses the adapter,
so sequences of the base model and of several adapters share one batch. Anything this reading
cannot reproduce exactly (DoRA, biases, adapted embeddings or output layer, per-module rank or
alpha patterns) is refused when the adapter loads, naming what and why.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatgate.errors import InvalidRequestError

# The linears of a Llama block a LoRA delta may target, as PEFT names them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
# Adapter names become model names: the characters a model name may hold, and a bound.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class AdapterError(InvalidRequestError):
    """An adapter that cannot be served: a bad path, another base model's shapes, an unsupported
    kind (a 400 naming `lora_path` unless said otherwise; at start-up, the reason it stops)."""

    def __init__(self, message: str, *, param: str = "lora_path") -> None:
        super().__init__(message, param=param, code="invalid_lora_adapter")


@dataclass(frozen=True)
class LoraSpec:
    """`--lora name=PATH`: an adapter and the model name it is served under."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`name=PATH`, as vLLM's `--lora-modules` takes it."""
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise AdapterError(f"--lora {text!r}: expected name=PATH", param="--lora")
        return cls(name=checked_name(name.strip(), param="--lora"), path=Path(path.strip()).expanduser())


def checked_name(name: str, *, param: str = "lora_name") -> str:
    """`name` if it may serve as a model name, else an `AdapterError` naming `param`."""
    if not _NAME.match(name):
        raise AdapterError(
            f"{param} {name[:140]!r} is not a usable model name: 1 to 128 letters, digits or ._:/@+- ,"
            " starting with a letter or digit", param=param,
        )
    return name


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's deltas: per layer, per target linear, `(A^T [in, r], scale * B^T [r, out])`."""

    name: str
    path: Path
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]

    @property
    def nbytes(self) -> int:
        """Memory the deltas hold."""
        return sum(a.nbytes + b.nbytes for layer in self.layers for a, b in layer.values())


def read_peft(name: str, path: Path, model: Any) -> LoraAdapter:
    """Read the PEFT adapter at `path` for `model` (a Hugging Face Llama-family model), checking
    every tensor's shape against the linear it adapts (an adapter for another base fails here)."""
    config = _config(name, path)
    scale = _scale(name, config)
    tensors = _tensors(name, path)
    blocks = model.model.layers
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise AdapterError(f"LoRA adapter {name!r}: tensor {key!r} adapts something other than "
                               f"the attention and MLP linears ({', '.join(TARGETS)}); it cannot be served")
        layer, target, part = int(match[1]), match[2], match[3]
        if target not in TARGETS:
            raise AdapterError(f"LoRA adapter {name!r}: it adapts {target!r}, which is not one of {', '.join(TARGETS)}")
        if layer >= len(blocks):
            raise AdapterError(f"LoRA adapter {name!r} adapts layer {layer}, but the base model has "
                               f"{len(blocks)} layers: it was made for another base model")
        pairs.setdefault((layer, target), {})[part] = tensor
    if not pairs:
        raise AdapterError(f"LoRA adapter {name!r} at {str(path)!r} holds no LoRA weights")
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in blocks]
    for (layer, target), parts in pairs.items():
        linear = _linear(blocks[layer], target)
        a, b = _checked_pair(name, f"layers.{layer}.{target}", parts, linear)
        device = linear.weight.device
        layers[layer][target] = (a.t().contiguous().to(device), (b * scale).t().contiguous().to(device))
    return LoraAdapter(name=name, path=path, layers=layers)


def _config(name: str, path: Path) -> dict[str, Any]:
    file = path / "adapter_config.json"
    if not path.is_dir() or not file.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {str(path)!r} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"LoRA adapter {name!r}: cannot read {str(file)!r}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"LoRA adapter {name!r}: {str(file)!r} is not a JSON object")
    refused = [
        ("peft_type", config.get("peft_type", "LORA") != "LORA", "only LoRA adapters are served"),
        ("use_dora", bool(config.get("use_dora")), "DoRA adapters are not served"),
        ("bias", config.get("bias", "none") != "none", "adapters with trained biases are not served"),
        ("rank_pattern", bool(config.get("rank_pattern")), "per-module ranks are not served"),
        ("alpha_pattern", bool(config.get("alpha_pattern")), "per-module alphas are not served"),
        ("modules_to_save", bool(config.get("modules_to_save")), "fully trained extra modules are not served"),
    ]
    for field, bad, why in refused:
        if bad:
            raise AdapterError(f"LoRA adapter {name!r}: {field}={config.get(field)!r}: {why}")
    return config


def _scale(name: str, config: dict[str, Any]) -> float:
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"LoRA adapter {name!r}: adapter_config.json needs a positive integer r and a finite lora_alpha")
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise AdapterError(f"LoRA adapter {name!r}: {str(path)!r} has no adapter_model.safetensors")
    try:
        return {key: tensor.float() for key, tensor in load_file(str(file)).items()}
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"LoRA adapter {name!r}: cannot read {str(file)!r}: {exc}") from None


def _linear(block: Any, target: str) -> Any:
    return getattr(block.self_attn if target in TARGETS[:4] else block.mlp, target)


def _checked_pair(
    name: str, where: str, parts: dict[str, torch.Tensor], linear: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    if set(parts) != {"A", "B"}:
        raise AdapterError(f"LoRA adapter {name!r}: {where} has lora_{''.join(parts)} but not both lora_A and lora_B")
    a, b = parts["A"], parts["B"]
    out_features, in_features = linear.weight.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"LoRA adapter {name!r}: {where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair")
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise AdapterError(
            f"LoRA adapter {name!r} does not fit the base model: {where} is {in_features} -> {out_features}, "
            f"the adapter's is {a.shape[1]} -> {b.shape[0]} (an adapter for another base model?)"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"LoRA adapter {name!r}: {where} holds NaN or infinite weights")
    return a, b
