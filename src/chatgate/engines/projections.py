"""The matrix products of a decode step, one class per weight format.

A decode step multiplies a few rows by large weights, so its speed is how fast the weights are
read. Each format stores the weights for its fastest few-row product:
- `Dense` (float32): pre-transposed and contiguous, `x @ Wt`. On CPU this is up to 5x faster
  than `F.linear` for 1-16 rows; several projections that read the same input (Q, K, V; gate,
  up) are fused into one matrix so they are one product.
- `Bfloat16`: bfloat16 weights (half the bytes) multiplied with the input rounded to bfloat16,
  accumulated in float32; everything between the products (the residual stream, norms,
  attention, the KV cache) stays float32. On CPU the weights are prepacked for oneDNN's
  bfloat16 kernels (AVX-512 BF16 / AMX where the CPU has them): at 16 rows 2.5x faster than the
  float32 product. The vocabulary projection is a `Shortlist`: bfloat16 finds the best
  candidates, float32 scores them.
- `Int8Dynamic`: int8 weights with one scale per output channel, activations quantized on the
  fly (fbgemm, CPU only): a quarter of the bytes of float32, at some cost in accuracy that
  `chatgate bench --quality` measures.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from chatgate.errors import StartupError

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")

# oneDNN reorders a packed weight for a typical number of input rows; any count still works.
_PACK_ROWS = 16

# The vocabulary projection's bfloat16 candidates that are rescored in float32.
SHORTLIST = 32


class Projection(Protocol):
    """`x [..., in] -> [..., out]`."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Dense:
    """`x @ Wt`, with `Wt` stored `[in, out]` and contiguous."""

    def __init__(self, transposed: torch.Tensor) -> None:
        self.weight_t = transposed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t


class Bfloat16:
    """`x @ Wt` with bfloat16 weights; the result comes back in `x`'s dtype.

    Rounding the weights and the product's input to bfloat16 costs little accuracy; a model kept
    wholly in bfloat16 (its residual stream and norms too) loses much more: on the bench's 50
    prompts 97.7% greedy agreement with float32 against 99.0% here.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        """`weight` is `[out, in]`, as an `nn.Linear` stores it."""
        weight = weight.detach().to(torch.bfloat16).contiguous()
        self._packed: torch.Tensor | None = None
        self._weight_t: torch.Tensor | None = None
        if weight.device.type == "cpu" and _onednn_bfloat16():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
        else:  # other devices (and CPUs without oneDNN bfloat16) multiply as stored
            self._weight_t = weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low = x.to(torch.bfloat16)
        if self._packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(low, self._packed, None, "none", [], "")
        else:
            assert self._weight_t is not None
            out = low @ self._weight_t
        return out.to(x.dtype)


class Shortlist:
    """The vocabulary projection in bfloat16, with its best `SHORTLIST` logits of each row
    computed again in float32.

    The bfloat16 logits are off by a few hundredths, enough to swap two near-equal tokens: with
    a plain bfloat16 projection the default model answers "What is the capital of France?"
    wrongly. The greedy choice, the top logprobs and the tokens that carry nearly all of the
    probability are float32's here; only the tail keeps bfloat16 values, which moves sampled
    probabilities by far less than the rounding of the layers before it. Where a grammar or a
    `logit_bias` rules out the whole shortlist, the choice falls among bfloat16 logits.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        """`weight` is `[vocabulary, hidden]` in float32 (often the tied input embedding, so it
        costs nothing to keep)."""
        self._weight = weight.detach()
        self._low = Bfloat16(self._weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._low(x)
        best = logits.topk(min(SHORTLIST, logits.shape[-1]), dim=-1).indices
        exact = (self._weight[best] @ x.unsqueeze(-1)).squeeze(-1)
        return logits.scatter_(-1, best, exact)


def _onednn_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 products on this CPU: natively with AVX-512 BF16 or AMX,
    emulated (and possibly slower than float32; not measured) on older AVX-512 CPUs."""
    return bool(torch._C._has_mkldnn and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Int8Dynamic:
    """A per-output-channel int8 weight, applied with fbgemm's dynamic-quantized linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.device.type != "cpu":
            raise StartupError("int8 weights run on CPU only (fbgemm); use bfloat16 on other devices")
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
    stacked = torch.cat([linear.weight.detach() for linear in linears])
    if weight_format == "int8":
        return Int8Dynamic(stacked)
    if weight_format == "bfloat16":  # the modules keep their float32 weights (a different dtype)
        return Bfloat16(stacked)
    fused = stacked.t().contiguous()
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight = torch.nn.Parameter(fused[:, start:end].t(), requires_grad=False)
        start = end
    return Dense(fused)


def vocabulary(weight: torch.Tensor, weight_format: str) -> Projection:
    """The output projection: a transposed copy (the weight is often tied to the input
    embedding), or a `Shortlist` in bfloat16.

    It stays float32 with int8 layers: quantizing it too halved the greedy token agreement with
    float32 on the bench's prompts.
    """
    if weight_format == "bfloat16":
        return Shortlist(weight)
    return Dense(weight.detach().t().contiguous())
