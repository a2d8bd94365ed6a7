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

The server sends these weights compact (`compact_state`): the arrays of a compact linear are its
own buffers (``weight``, int8 or bf16, and for int8 ``scale``; ``bias`` as before), so a device
builds each `CompactLinear` from what it received (`received_compact`) and never holds the
full-precision weight. numpy, and so Flower's ``ArrayRecord``, has no bfloat16: a bf16 weight
crosses as its bits in int16 and is viewed back as bf16 (no copy). Quantizing on the server is
quantizing on the device: the same function of the same fp32 tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from costmodel.mode import TrainMode
from costmodel.modules import lora_targets
from costmodel.spec import ModelSpec

INT8_MAX = 127
WIRE_DTYPE = {"bf16": torch.int16, "int8": torch.int8}  # how a compact weight crosses the wire


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


def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(compact weight, scale per output channel or None) of a full-precision ``weight``: bf16, or
    int8 symmetric (scale = max |w| / 127, quantized in fp32 also for a bf16 model, the scale kept in
    the weight's dtype)."""
    weight = weight.detach()
    if fmt == "bf16":
        return weight.to(torch.bfloat16), None
    wide = weight.float()
    amax = wide.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return (wide / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale.to(weight.dtype)


class CompactLinear(nn.Module):
    """A frozen linear whose weight is held as ``fmt`` ('bf16' or 'int8', with a scale per output
    channel); scales and bias in the model's dtype. Everything is a buffer: nothing here trains.
    ``received``: the (weight, scale) the server sent compact (`quantize`'s form), held as they are;
    else the linear's weight is quantized here."""

    def __init__(self, linear: nn.Linear, fmt: str,
                 received: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        weight, scale = received or quantize(linear.weight, fmt)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self.weight, self.scale, self.bias)
        # nothing to save: plain ops, which tracers (fvcore's jit trace) see into
        return F.linear(x, dequantize(self.weight, self.scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def compact_frozen_linears(block: nn.Module, names: tuple[str, ...], fmt: str,
                           received: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
    """Replace the linears ``names`` of ``block`` by compact ones; for a peft LoRA linear, its frozen base.
    ``received``: name -> (weight, scale) of the linears the server sent compact (`received_compact`)."""
    received = received or {}
    for name in names:
        module = block.get_submodule(name)
        if hasattr(module, "base_layer"):
            module.base_layer = CompactLinear(module.base_layer, fmt, received.get(name))
        else:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, CompactLinear(module, fmt, received.get(name)))


def compact_linears(spec: ModelSpec, mode: TrainMode) -> tuple[str, ...]:
    """The linears ``mode`` holds compact, by module name: every attention and MLP linear of each block
    it does not train fully (none without ``frozen``)."""
    if not mode.frozen:
        return ()
    return tuple(f"blocks.{b}.{t}" for b in range(spec.n_blocks) if b not in mode.blocks for t in lora_targets(spec))


def compact_state(state: dict[str, torch.Tensor], spec: ModelSpec, mode: TrainMode) -> dict[str, torch.Tensor]:
    """The arrays the server sends a device that trains ``mode`` from the full-precision ``state``: each
    compact linear's weight quantized (bf16 as its int16 bits) and, for int8, its ``scale``; the rest
    as they are. ``state`` itself when ``mode`` compacts nothing."""
    linears = compact_linears(spec, mode)
    if not linears:
        return state
    sent = dict(state)
    for name in linears:
        weight, scale = quantize(state[f"{name}.weight"], mode.frozen)
        sent[f"{name}.weight"] = weight.view(WIRE_DTYPE[mode.frozen])
        if scale is not None:
            sent[f"{name}.scale"] = scale
    return sent


def received_compact(state: dict[str, torch.Tensor], spec: ModelSpec, mode: TrainMode
                     ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """(the model's state, the compact linears' (weight, scale) by module name) from received arrays.

    A linear that arrived compact (`compact_state`) has a stand-in weight in the model's state: a
    full-size view of one zero in the model's dtype (no memory; peft reads its shape, device and
    dtype when it wraps the linear) until `costmodel.build.apply_mode` replaces it; one that arrived
    in full precision is quantized on the device, as before."""
    state, compact = dict(state), {}
    for name in compact_linears(spec, mode):
        weight = state[f"{name}.weight"]
        if weight.dtype != WIRE_DTYPE[mode.frozen]:
            continue
        scale = state.pop(f"{name}.scale", None)
        dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
        compact[name] = (weight.view(torch.bfloat16) if mode.frozen == "bf16" else weight, scale)
        state[f"{name}.weight"] = torch.zeros((), dtype=dtype).expand(weight.shape)
    return state, compact
