"""fp16 weights: every weight rounded to float16 precision, the arithmetic in float32 (docs/engine.md, fp16).

Why: at the few rows of a decoding step, MKL's float32 GEMM is slow on this kind of CPU (the LM head's time
grows with the rows: it is not the reading of the weights that costs), while fbgemm's fp16-weight kernel,
which converts the weights to float32 as it multiplies, is faster there (docs/engine.md has the timings);
and the weights take half the memory and cache. On CPU the matmuls become `Fp16Linear`s over fbgemm's packed
fp16 matrices; where fbgemm is missing (not x86, other devices) the rounded weights stay in their float32
modules. Either way every path computes with the same weight values.

Two fbgemm kernels, both over the same fp16 values, chosen per call (docs/engine.md, fp16, has the timings):
`torch.fbgemm_linear_fp16_weight` has far less per-call overhead than the supported route
(`torch.ops.quantized.linear_dynamic_fp16`, what `torch.ao` dynamic fp16 `Linear`s call), which matters at
the few rows of a decoding step; but it runs on one thread, so from `SMALL_ROWS` rows on, with more than one
thread, the supported op is faster. The direct kernel is marked deprecated: where it is missing, the
supported op does every call.
"""
from __future__ import annotations

import warnings

import torch

_DIRECT = hasattr(torch, "fbgemm_linear_fp16_weight") and hasattr(torch, "fbgemm_pack_gemm_matrix_fp16")


SMALL_ROWS = 16   # below this many rows (or on one thread) the direct kernel is faster


def _pack_direct(weight: torch.Tensor, bias: torch.Tensor):
    """The direct kernel's packed matrix, or None where torch has no such kernel."""
    if not _DIRECT:
        return None
    # its deprecation notices (see the module doc) come once per process, at the first pack and the first
    # call: both happen here, where they are silenced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = torch.fbgemm_pack_gemm_matrix_fp16(weight)
        torch.fbgemm_linear_fp16_weight(weight.new_zeros(1, weight.shape[1]), packed, bias)
    return packed


def fbgemm_fp16_available() -> bool:
    """Whether this torch build can run fbgemm's fp16-weight matmul (x86 CPU builds can)."""
    try:
        layer = Fp16Linear(torch.ones(2, 2), torch.zeros(2))
        return bool(torch.equal(layer(torch.ones(1, 2)), torch.full((1, 2), 2.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Fp16Linear(torch.nn.Module):
    """y = x W^T + b with W (out, in) held at float16 in fbgemm's packed layout; float32 in and out. For
    inference only (no gradients); a copy must be packed again from the weights, so it cannot be copied."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float().contiguous()
        bias = bias.detach().float() if bias is not None else weight.new_zeros(self.out_features)
        self.register_buffer("bias", bias.contiguous())
        self.prepacked = torch.ops.quantized.linear_prepack_fp16(weight, self.bias)
        self.packed = _pack_direct(weight, self.bias)
        self.small = SMALL_ROWS * self.in_features   # input elements below which the direct kernel is used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and (x.numel() < self.small or torch.get_num_threads() == 1):
            return torch.fbgemm_linear_fp16_weight(x, self.packed, self.bias)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.prepacked)

    def __deepcopy__(self, memo):
        # the direct kernel's packed matrix is a pointer in a byte tensor: a byte copy would alias freed memory
        raise TypeError("an Fp16Linear cannot be copied; load the model again and round it with weights_fp16")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights float16 (fbgemm)"


def _round_parameters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(torch.float16).to(p.dtype))


def weights_fp16(model):
    """Every weight of `model` rounded to float16 precision, in place; on a CPU with fbgemm the matmuls of a
    GPT-2 (its `Conv1D`s and the LM head) become `Fp16Linear`s. The embeddings (tied to the LM head) stay
    float32 tensors of the rounded values. Returns the model."""
    _round_parameters(model)
    if next(model.parameters()).device.type != "cpu" or not fbgemm_fp16_available():
        return model
    from transformers.pytorch_utils import Conv1D

    def convert(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, Conv1D):           # a Linear with its weight stored (in, out)
                setattr(module, name, Fp16Linear(child.weight.t(), child.bias))
            elif isinstance(child, torch.nn.Linear):
                setattr(module, name, Fp16Linear(child.weight, child.bias))
            else:
                convert(child)

    convert(model)
    return model
