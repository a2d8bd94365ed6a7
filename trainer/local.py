"""Local training that executes a plan: the one function every engine calls on a device.

`local_train` builds the model from the global weights, makes it train what the `TrainMode`
says (frozen parameters have ``requires_grad=False``, blocks below the lowest trained one run
under ``torch.no_grad()``, LoRA via peft, the optimizer holds only trained parameters), runs
``steps`` steps and returns the update a device uploads: only what it trained, as trained. LoRA
adapters are sent as their A and B factors, with their scale; the server forms the dense change
B A * scale of each adapted weight (`trainer.server.lora_deltas`).

Two steps are measured, as `costmodel.measure.measure_step` measures (and `caff validate`
reports): the first step's FLOPs with ``FlopCounterMode`` under the math attention kernel (the
only one it has a formula for on CPU), and the second step's peak of live tensor bytes with
`costmodel.measure.LiveBytes` under the kernels training really uses, with the optimizer state
allocated, as in the estimate. All steps have the same shapes, so FLOPs per round are steps x
the first step's FLOPs. With one step, both are taken on it, under the math kernel.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from costmodel import ModelSpec, TrainMode, apply_mode, build_model, make_optimizer
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
                lr: float = 0.1, seed: int = 0, device: str = "cpu", measure: bool = True) -> LocalResult:
    """Train ``mode`` of ``spec`` from ``global_state`` for ``steps`` batches; return the update.

    ``measure=False`` skips the measurements (FLOPs and peak are then 0): an engine that has
    measured the same mode at the same shapes already can reuse those figures."""
    started = time.perf_counter()
    torch.manual_seed(seed)  # LoRA's A initialisation
    model = build_model(spec)
    model.load_state_dict(global_state)
    model = apply_mode(model, mode).to(device).train()
    opt = make_optimizer(model.parameters(), optimizer, lr=lr)
    counted_step, peak_step = (0, min(1, steps - 1)) if measure else (-1, -1)
    counter, tracker = FlopCounterMode(display=False), LiveBytes()
    losses, n_samples = [], 0
    for step in range(steps):
        inputs, targets = (t.to(device) for t in next(batches))
        n_samples += len(inputs)
        with contextlib.ExitStack() as measuring:
            if step == counted_step:
                measuring.enter_context(sdpa_kernel(SDPBackend.MATH))
                measuring.enter_context(counter)
            if step == peak_step:
                tracker.track([*state_tensors(model, opt), inputs, targets])
                measuring.enter_context(tracker)
            losses.append(_step(model, opt, inputs, targets))
    flops, peak = (counter.get_total_flops() * steps, tracker.peak) if measure else (0, 0)
    return LocalResult(update=_trained_state(model), n_samples=n_samples, loss=sum(losses) / len(losses),
                       flops=flops, peak_bytes=peak, seconds=time.perf_counter() - started,
                       lora_scales=_lora_scales(model))


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
