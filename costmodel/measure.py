"""Measure one training step of a real ``nn.Module``: the same quantities the estimate predicts.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the forward and around the
  backward, per layer (2 per multiply-add). CPU SDPA has no FLOP formula, so the counted
  step runs under ``sdpa_kernel(SDPBackend.MATH)``, which computes the same matmuls.
  For our own models (`measure`) fvcore's ``FlopCountAnalysis`` counts the forward a second,
  independent way (`fvcore_forward_flops`).
- Saved activations: ``saved_tensors_hooks`` in a separate step with the default kernels,
  each storage counted once, parameters and buffers excluded, attributed to the layer
  whose forward saved it.
- Peak: `LiveBytes`, a dispatch-mode tracker of live tensor bytes (parameters, buffers,
  gradients, optimizer state, batch, activations, temporaries; torch's ``MemTracker``
  gives the same figure, ten times slower) over a steady-state step: the
  optimizer state already exists and gradients were set to None; on CUDA also
  ``torch.cuda.max_memory_allocated``.

Layers are given as a name -> list of modules mapping, so the same code measures our
models and ``transformers`` ones (`costmodel.hf.hf_layers`).

Before any real step, `check_fits` estimates its peak and refuses what this machine cannot hold;
`measure` and `costmodel.hf.measure_hf` call it, and so should anything else that runs a step.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from profiles import format_bytes

# share of the memory available that one measured step may take: the rest is for the model's copy,
# the interpreter and the allocator's slack, none of which the estimate's peak holds
FITS_SHARE = 0.8


@dataclass
class Measured:
    """Measured costs of one step. FLOPs; bytes."""

    fwd_flops: int
    bwd_flops: int
    activation_bytes: int
    peak_bytes: int
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    cuda_peak_bytes: int | None = None
    fvcore_fwd_flops: int | None = None

    def total(self) -> dict:
        out = {"fwd_flops": self.fwd_flops, "bwd_flops": self.bwd_flops,
               "activation_bytes": self.activation_bytes, "peak_bytes": self.peak_bytes}
        if self.cuda_peak_bytes is not None:
            out["cuda_peak_bytes"] = self.cuda_peak_bytes
        return out


def _layer_of(layers: dict[str, list[nn.Module]]) -> dict[nn.Module, str]:
    return {module: name for name, modules in layers.items() for module in modules}


@contextlib.contextmanager
def _current_layer(layers: dict[str, list[nn.Module]], state: dict):
    """Keep ``state['layer']`` set to the layer whose forward is running."""
    handles = []
    for module, name in _layer_of(layers).items():
        def enter(_module, _args, name=name):
            state["stack"].append(state.get("layer"))
            state["layer"] = name

        def leave(_module, _args, _out):
            state["layer"] = state["stack"].pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    state.setdefault("stack", [])
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _model_storages(model: nn.Module) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage()._cdata for t in tensors}


def _flop_counts_by_layer(counter: FlopCounterMode, layers: dict[str, list[nn.Module]],
                          model: nn.Module) -> dict[str, int]:
    names = {module: name for name, module in model.named_modules()}
    root = type(model).__name__
    counts = counter.get_flop_counts()
    out = {}
    for layer, modules in layers.items():
        keys = [f"{root}.{names[m]}" if names[m] else root for m in modules]
        out[layer] = sum(sum(counts.get(key, {}).values()) for key in keys)
    return out


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes across what runs inside it, and their peak: every storage an op
    creates counts from its creation until it is freed (a weak reference tells); the
    tensors given to ``track`` (parameters, optimizer state, the batch) count throughout.
    The same figure as torch's MemTracker (a test checks), at a fraction of its cost."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, tensors) -> None:
        for tensor in tensors:
            self._add(tensor.untyped_storage())

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key not in self.live and storage.nbytes():
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage())
        return out


def available_memory_bytes(device: str = "cpu") -> int:
    """Bytes a new allocation can take now: MemAvailable of /proc/meminfo (else free physical pages);
    on CUDA the free device memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(spec, mode, batch: int, seq: int | None, optimizer: str = "sgd", device: str = "cpu",
               budget_bytes: int | None = None) -> int:
    """The estimated peak bytes of one training step (`costmodel.estimate`) of ``spec`` under ``mode``;
    ValueError of one line, naming the figure, when it exceeds FITS_SHARE of the memory ``device`` has
    available now, or ``budget_bytes`` (a device's budget) when given. Call it before building the model."""
    from costmodel.estimate import estimate

    peak = estimate(spec, mode, batch, seq, optimizer).peak_bytes
    step = f"one training step of {spec.name} ({mode}, batch {batch}, seq {spec.tokens_per_sample(seq)})"
    if budget_bytes is not None and peak > budget_bytes:
        raise ValueError(f"{step} needs an estimated {format_bytes(peak)}, over the budget of "
                         f"{format_bytes(budget_bytes)}")
    available = available_memory_bytes(device)
    if peak > FITS_SHARE * available:
        raise ValueError(f"{step} needs an estimated {format_bytes(peak)}; {device} has {format_bytes(available)} "
                         f"available, of which a step may take {FITS_SHARE:.0%}")
    return peak


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in tree_flatten(state)[0]
                if isinstance(t, torch.Tensor)]
    return tensors


def measure_step(model: nn.Module, layers: dict[str, list[nn.Module]], step_loss: Callable[[], torch.Tensor],
                 optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> Measured:
    """Measure a training step of ``model``; ``step_loss`` runs its forward and returns the loss."""
    model.train()

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # step 1: FLOPs (math attention kernel); also allocates the optimizer state
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss = step_loss()
        fwd_total, fwd_layers = counter.get_total_flops(), _flop_counts_by_layer(counter, layers, model)
        loss.backward()
    del loss
    step()
    step_layers = _flop_counts_by_layer(counter, layers, model)
    bwd_layers = {name: step_layers[name] - fwd_layers[name] for name in layers}

    # step 2: saved activations and the peak, default kernels
    excluded = _model_storages(model)
    saved: dict[int, tuple[int, str]] = {}
    state: dict = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded and storage._cdata not in saved:
            saved[storage._cdata] = (storage.nbytes(), state.get("layer") or "other")
        return tensor

    tracker = LiveBytes()
    tracker.track([*state_tensors(model, optimizer), *batch])
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tracker, _current_layer(layers, state):
        with saved_tensors_hooks(pack, lambda t: t):
            loss = step_loss()
        loss.backward()
        del loss
        step()
    peak = tracker.peak
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None

    per_layer = {name: {"fwd_flops": fwd_layers[name], "bwd_flops": bwd_layers[name], "activation_bytes": 0}
                 for name in layers}
    for nbytes, layer in saved.values():
        per_layer.setdefault(layer, {"fwd_flops": 0, "bwd_flops": 0, "activation_bytes": 0})
        per_layer[layer]["activation_bytes"] += nbytes
    return Measured(fwd_flops=fwd_total, bwd_flops=counter.get_total_flops() - fwd_total,
                    activation_bytes=sum(b for b, _ in saved.values()), peak_bytes=peak, layers=per_layer,
                    cuda_peak_bytes=cuda_peak)


def our_layers(model) -> dict[str, list[nn.Module]]:
    """Layer name -> modules of a `TinyTransformer`."""
    layers = {"embed": [model.embed]}
    layers.update({f"block.{i}": [block] for i, block in enumerate(model.blocks)})
    layers.update({"head": [model.head], "loss": [model.loss]})
    return layers


def measure(spec, mode, batch: int = 16, seq: int | None = None, optimizer: str = "sgd",
            device: str = "cpu", seed: int = 0) -> Measured:
    """Build ``spec`` as our own model, apply ``mode`` and measure one step on ``device``."""
    from costmodel.build import apply_mode, build_model, make_batch, make_optimizer

    check_fits(spec, mode, batch, seq, optimizer, device)
    model = apply_mode(build_model(spec, seed), mode).to(device)
    inputs, targets = (t.to(device) for t in make_batch(spec, batch, seq, seed))
    opt = make_optimizer(model.parameters(), optimizer)
    measured = measure_step(model, our_layers(model), lambda: model(inputs, targets), opt, (inputs, targets))
    measured.fvcore_fwd_flops = fvcore_forward_flops(model, (inputs, targets))
    return measured


FVCORE_MATMUL_OPS = ("addmm", "bmm", "conv", "einsum", "linear", "matmul")


def fvcore_forward_flops(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of ``model(*inputs)``'s forward by fvcore's ``FlopCountAnalysis``, 2 per multiply-add: a
    second counter, independent of FlopCounterMode (it traces the model with ``torch.jit.trace`` and
    applies its own per-op formulas). Only its matmul-like ops (FVCORE_MATMUL_OPS) are summed, as
    FlopCounterMode counts; it also counts norms (5 per element), left out here.
    Blind spots: the forward only; ``scaled_dot_product_attention`` counts 0 (an SDPA model's
    attention matmuls are missing), as do elementwise ops, softmax and activations (with a warning,
    silenced here)."""
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad():
        analysis = FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts = analysis.by_operator()
    return 2 * sum(counts.get(op, 0) for op in FVCORE_MATMUL_OPS)
