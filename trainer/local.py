"""Local training that executes a plan: the one function every engine calls on a device.

`local_train` builds the model from the global weights, makes it train what the `TrainMode`
says (frozen parameters have ``requires_grad=False``, blocks below the lowest trained one run
under ``torch.no_grad()``, LoRA via peft, the optimizer holds only trained parameters), runs
``steps`` steps and returns the update a device uploads: only what it trained, as trained. LoRA
adapters are sent as their A and B factors, with their scale; the server forms the dense change
B A * scale of each adapted weight (`trainer.server.lora_deltas`).

Measuring never changes what is trained, so a round trains the same floats whether or not it
is measured (a resumed run measures its first round again). FLOPs are counted as
`costmodel.measure.measure_step` counts them (``FlopCounterMode`` under the math attention
kernel, the only one it has a formula for on CPU), but on a copy of the model on the meta
device (shapes only: no memory, no arithmetic) at the first batch's shapes; all steps have the
same shapes, so FLOPs per round are steps x that step's. The peak of live tensor bytes is taken
with `costmodel.measure.LiveBytes` on the second real step (the first with one step), under the
kernels training uses, with the optimizer state allocated, as in the estimate.

A device's random draws (LoRA's A initialisation, dropout masks) come from ``seed``, which the
engines derive from (seed, round, device).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from costmodel import ModelSpec, TrainMode, apply_mode, build_model, make_optimizer
from costmodel.build import LORA_SCALE
from costmodel.compact import received_compact
from costmodel.measure import LiveBytes, state_tensors


@dataclass
class LocalResult:
    """What a device sends back, and what it measured. Bytes, FLOPs, seconds."""

    update: dict[str, torch.Tensor]  # parameter name -> new value or, for LoRA factors, the factor
    n_samples: int
    loss: float
    flops: int
    peak_bytes: int
    seconds: float
    lora_scales: dict[str, float] = field(default_factory=dict)  # adapted weight name -> alpha / r


def _trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors by the name the global (LoRA-free) model uses, or peft's name for factors."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            out[name.replace(".base_layer.", ".")] = param.detach().clone()
    return out


def _lora_scales(model: torch.nn.Module) -> dict[str, float]:
    return {f"{name}.weight": module.scaling["default"] for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "scaling", {})}


def local_train(global_state: dict[str, torch.Tensor], spec: ModelSpec, mode: TrainMode,
                batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, optimizer: str = "sgd",
                lr: float = 0.1, seed: int = 0, device: str = "cpu", measure: bool = True,
                lora_scale: float = LORA_SCALE) -> LocalResult:
    """Train ``mode`` of ``spec`` from ``global_state`` for ``steps`` batches; return the update.
    ``global_state`` may hold the linears ``mode`` keeps compact as the server sends them
    (`costmodel.compact.compact_state`): the model then holds those arrays, never their fp32 form.

    ``measure=False`` skips the measurements (FLOPs and peak are then 0): an engine that has
    measured the same mode at the same shapes already can reuse those figures. ``lora_scale``: each LoRA
    adapter's alpha / rank."""
    started = time.perf_counter()
    first = next(batches)
    flops = step_flops(spec, mode, *first) * steps if measure else 0
    state, compact = received_compact(global_state, spec, mode)
    model = _model_holding(state, spec)
    torch.manual_seed(seed)  # after build_model, which seeds its own initialisation: LoRA's A
    model = apply_mode(model, mode, compact, lora_scale)
    _own_trained(model, global_state)
    model = model.to(device).train()
    opt = make_optimizer(model.parameters(), optimizer, lr=lr)
    peak_step = min(1, steps - 1) if measure else -1
    tracker = LiveBytes()
    losses, n_samples = [], 0
    for step, batch in zip(range(steps), itertools.chain([first], batches)):
        inputs, targets = (t.to(device) for t in batch)
        n_samples += len(inputs)
        with tracker if step == peak_step else contextlib.nullcontext():
            if step == peak_step:
                tracker.track([*state_tensors(model, opt), inputs, targets])
            losses.append(_step(model, opt, inputs, targets))
    peak = tracker.peak if measure else 0
    return LocalResult(update=_trained_state(model), n_samples=n_samples, loss=sum(losses) / len(losses),
                       flops=flops, peak_bytes=peak, seconds=time.perf_counter() - started,
                       lora_scales=_lora_scales(model))


def step_flops(spec: ModelSpec, mode: TrainMode, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """FLOPs of one training step of ``mode`` at these batch shapes (forward and backward),
    counted on the meta device under the math attention kernel."""
    with torch.device("meta"):
        model = apply_mode(build_model(spec), mode).to("meta").train()  # buffers kept on the CPU too
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(inputs.to("meta"), targets.to("meta")).backward()
    return counter.get_total_flops()


def _model_holding(state: dict[str, torch.Tensor], spec: ModelSpec) -> torch.nn.Module:
    """The model of ``spec`` whose parameters are the tensors of ``state`` themselves: built on the meta
    device and loaded with ``assign=True``, so a device holds its weights once, not twice."""
    with torch.device("meta"):
        model = build_model(spec)
    model.load_state_dict(state, assign=True)
    if spec.tied_embeddings:  # assign gives each name its own parameter; tie them again
        model.head.out.weight = model.embed.tok.weight
    return model


def _own_trained(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give trained parameters their own copy: the received tensor stays the old value the update
    is taken against (`trainer.server.lora_deltas`), and a server in this process keeps its global state."""
    received = {t.untyped_storage().data_ptr() for t in state.values()}
    for param in model.parameters():
        if param.requires_grad and param.untyped_storage().data_ptr() in received:
            param.data = param.data.clone()


def _step(model, opt, inputs, targets) -> float:
    loss = model(inputs, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def renumber_blocks(tensors: dict[str, torch.Tensor], numbers: dict[int, int]) -> dict[str, torch.Tensor]:
    """``tensors`` with block i's names moved to block ``numbers[i]``; blocks not in ``numbers``
    are dropped, tensors outside blocks kept. Maps a whole model onto a shallow one and back."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("blocks."):
            _, block, rest = name.split(".", 2)
            if int(block) not in numbers:
                continue
            name = f"blocks.{numbers[int(block)]}.{rest}"
        out[name] = tensor
    return out
