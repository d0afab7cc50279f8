"""The matrix products of a decode step, one class per weight format.

A decode step multiplies a few rows by large weights, so its speed is how fast the weights are
read. Each format stores the weights for its fastest few-row product:
- `Dense` (float32, bfloat16): pre-transposed and contiguous, `x @ Wt`. On CPU this is up to 5x
  faster than `F.linear` for 1-16 rows; several projections that read the same input (Q, K, V;
  gate, up) are fused into one matrix so they are one product.
- `Int8Dynamic`: int8 weights with one scale per output channel, activations quantized on the
  fly (fbgemm, CPU only): a quarter of the bytes of float32, at some cost in accuracy that
  `chatgate bench --quality` measures.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


class Projection(Protocol):
    """`x [..., in] -> [..., out]`."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Dense:
    """`x @ Wt`, with `Wt` stored `[in, out]` and contiguous."""

    def __init__(self, transposed: torch.Tensor) -> None:
        self.weight_t = transposed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t


class Int8Dynamic:
    """A per-output-channel int8 weight, applied with fbgemm's dynamic-quantized linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.device.type != "cpu":
            raise ValueError("int8 weights run on CPU only (fbgemm); use bfloat16 on other devices")
        weight = weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # PyTorch flags quantized tensors as legacy; fbgemm still runs them
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(quantized, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        out: torch.Tensor = torch.ops.quantized.linear_dynamic(flat, self._packed)
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def fuse(linears: list[torch.nn.Linear], weight_format: str) -> Projection:
    """One projection computing every linear of `linears` side by side (they share an input).

    In the dense formats the linears' own weights become views into the fused matrix, so the
    Hugging Face modules (still used to score prompts and embed) cost no extra memory.
    """
    if weight_format == "int8":
        return Int8Dynamic(torch.cat([linear.weight.detach() for linear in linears]))
    fused = torch.cat([linear.weight.detach() for linear in linears]).t().contiguous()
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight = torch.nn.Parameter(fused[:, start:end].t(), requires_grad=False)
        start = end
    return Dense(fused)


def vocabulary(weight: torch.Tensor) -> Projection:
    """The output projection, as a transposed copy (it is often tied to the input embedding).

    It stays in the model's dtype even with int8 layers: quantizing it too halved the greedy
    token agreement with float32 on the bench's prompts.
    """
    return Dense(weight.detach().t().contiguous())
