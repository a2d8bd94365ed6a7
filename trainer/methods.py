"""What each method makes a device train, all under the same device budgets.

- ``caff``: the planner's optimal plan for the device (any set of full blocks, LoRA from a menu).
- ``lora``: LoRA on every block, the largest rank of the menu that fits the device; with the memory
  tools the plan offers caff (``recompute``, compact ``frozen`` weights), the same tools for LoRA:
  at each rank, plain first, then frozen weights compact (more precise format first), then every
  block recomputed (more FLOPs), then both (caff's order: fewer FLOPs, then more precise weights).
- ``full``: everything; a device that cannot afford it sits out, as in practice.
- ``head``: the head only.
- ``fedra``: FedRA (Su et al.): each round a device holds a random set of blocks, drawn
  uniformly without replacement, as many as it can afford (its capacity), and runs a genuinely
  shallower model made of only those blocks in order, with the embeddings and the head; it
  trains LoRA of rank 8 on them and the head. Unlike FedRA, the server averages each layer's
  dense change B A (weighted by samples, like every method here), not A and B apart.
- ``smallest``: the largest candidate architecture that every device can train fully; the
  engine runs that architecture and every device trains it all.

`device_task` returns the mode and the blocks the device's model holds (None: all of them, in
place), or None for a device that sits out this round.
"""

from __future__ import annotations

import random

from costmodel import ModelSpec, TrainMode, estimate
from costmodel.process import kept_bytes, process_memory
from planner.budget import runtime_profile
from planner.planfile import DevicePlan, PlanFile
from planner.table import BITS

METHODS = ("caff", "lora", "full", "head", "fedra", "smallest")
LORA_MENU = (1, 2, 4, 8, 16, 32, 64)
FEDRA_RANK = 8


def shallow_spec(spec: ModelSpec, n_held: int) -> ModelSpec:
    """The spec of the model a FedRA device runs: ``n_held`` of the blocks, embeddings and head."""
    return spec.model_copy(update={"n_blocks": n_held})


def fits(spec: ModelSpec, mode: TrainMode, device: DevicePlan, plan: PlanFile) -> bool:
    """Whether ``mode`` meets the device's memory (less the margin), compute and upload budgets. Memory
    is the whole training process's (`costmodel.process`: the device's runtime, the LoRA library
    where ``mode`` uses it, its data shard, the step's tensors), as the planner counts it for caff;
    plans made before runtimes were counted compare the step's tensors only."""
    budgets = device.budgets
    report = estimate(spec, mode, budgets.batch_size, plan.seq, plan.optimizer)
    memory = report.peak_bytes
    if device.runtime is not None:
        shard = device.process.shard_bytes if device.process else 0
        memory = process_memory(runtime_profile(device.runtime), mode, report, shard,
                                kept_bytes(spec, mode, report)).total_bytes
    return (memory <= budgets.usable_memory_bytes
            and budgets.local_steps * (report.totals["fwd_flops"] + report.totals["bwd_flops"]) <= budgets.compute_flops
            and report.totals["upload_bytes"] <= budgets.upload_bytes)


def smallest_common_architecture(plan: PlanFile) -> ModelSpec | None:
    """The largest candidate (by parameters) that every device can train fully, or None."""
    def size(spec):
        return estimate(spec, TrainMode.parse("all", spec.n_blocks), 1, 1).totals["param_bytes"]
    for spec in sorted(plan.models, key=size, reverse=True):
        mode = TrainMode.parse("all", spec.n_blocks)
        if all(fits(spec, mode, device, plan) for device in plan.devices):
            return spec
    return None


def device_task(method: str, spec: ModelSpec, device: DevicePlan, plan: PlanFile,
                round_seed: int) -> tuple[TrainMode, tuple[int, ...] | None] | None:
    """What ``device`` trains this round under ``method``: (mode, held blocks or None), or None to sit out."""
    n = spec.n_blocks
    if method == "fedra":
        lora = f"lora:{FEDRA_RANK}"
        capacity = max((k for k in range(1, n + 1) if fits(shallow_spec(spec, k), TrainMode.parse(lora, k), device,
                                                             plan)), default=0)
        if capacity == 0:
            return None
        held = tuple(sorted(random.Random(f"{round_seed}:{device.device}").sample(range(n), capacity)))
        return TrainMode.parse(lora, capacity), held
    mode = device_mode(method, spec, device, plan)
    return None if mode is None else (mode, None)


def device_mode(method: str, spec: ModelSpec, device: DevicePlan, plan: PlanFile) -> TrainMode | None:
    """The training mode of ``device`` in the whole model under ``method``, or None when it sits out."""
    n = spec.n_blocks
    if method == "caff":
        return TrainMode.parse(device.mode, n) if device.status == "optimal" and device.model == spec.name else None
    if method in ("full", "smallest"):
        mode = TrainMode.parse("all", n)
    elif method == "head":
        mode = TrainMode.parse("head", n)
    elif method == "lora":
        ranks = sorted(plan.lora_ranks or LORA_MENU, reverse=True)
        recompute = ["", f"+recompute:{','.join(map(str, range(n)))}"][:1 + plan.recompute]
        frozen = ["", *(f"+frozen:{f}" for f in sorted(plan.frozen, key=BITS.get, reverse=True))]
        modes = (TrainMode.parse(f"lora:{r}{t}{f}", n) for r in ranks for t in recompute for f in frozen)
        return next((m for m in modes if fits(spec, m, device, plan)), None)
    else:
        raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")
    return mode if fits(spec, mode, device, plan) else None
