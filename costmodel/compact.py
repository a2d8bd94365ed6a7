"""Compact frozen linears (``+frozen:bf16``, ``+frozen:int8``): a linear no step trains holds its
weight in bf16, or in int8 with one scale per output channel (symmetric, scale = max |w| / 127),
and dequantizes it to the model's dtype inside each forward, as CoCoFL does with its frozen layers.

The dequantized weight is a transient: `_DequantLinear` saves the compact weight and its scales
(buffers, not activations) for backward and dequantizes again there when its input needs a
gradient, so a compact linear keeps no weight-sized tensor between forward and backward. Its
cost (`costmodel.tape.Tape.compact_linear`) is the plain linear's matmul FLOPs, plus the
dequantized weight live while the matmul runs, in forward and in backward. Dequantizing is
elementwise (a cast for bf16; int8 times scale, one multiply per weight for int8), which
FlopCounterMode counts as 0 and the cost model as elementwise FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``: one new tensor (int8 times its per-row scale is promoted in one op)."""
    if scale is None:
        return weight.to(dtype)
    return torch.mul(weight, scale[:, None])


class _DequantLinear(torch.autograd.Function):
    """``F.linear`` with a compact weight that needs no gradient; backward dequantizes again."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        ctx.dtype = x.dtype
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad.matmul(dequantize(weight, scale, ctx.dtype)), None, None, None


class CompactLinear(nn.Module):
    """A frozen linear whose weight is held as ``fmt`` ('bf16' or 'int8', with a scale per output
    channel); scales and bias in the model's dtype. Everything is a buffer: nothing here trains."""

    def __init__(self, linear: nn.Linear, fmt: str):
        super().__init__()
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        weight = linear.weight.detach()
        if fmt == "bf16":
            self.register_buffer("weight", weight.to(torch.bfloat16))
            self.scale = None
        else:
            wide = weight.float()  # quantize in fp32 also for a bf16 model; the scale is kept in its dtype
            amax = wide.abs().amax(dim=1)
            scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
            self.register_buffer("weight", (wide / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
            self.register_buffer("scale", scale.to(weight.dtype))
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self.weight, self.scale, self.bias)
        # nothing to save: plain ops, which tracers (fvcore's jit trace) see into
        return F.linear(x, dequantize(self.weight, self.scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def compact_frozen_linears(block: nn.Module, names: tuple[str, ...], fmt: str) -> None:
    """Replace the linears ``names`` of ``block`` by compact ones; for a peft LoRA linear, its frozen base."""
    for name in names:
        module = block.get_submodule(name)
        if hasattr(module, "base_layer"):
            module.base_layer = CompactLinear(module.base_layer, fmt)
        else:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, CompactLinear(module, fmt))
