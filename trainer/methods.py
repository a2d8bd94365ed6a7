"""What each method makes a device train, all under the same device budgets.

- ``caff``: the planner's optimal plan for the device (any set of full blocks, LoRA from a menu).
- ``lora``: LoRA on every block, the largest rank of the menu that fits the device.
- ``full``: everything; a device that cannot afford it sits out, as in practice.
- ``head``: the head only.
- ``fedra``: each round a random set of blocks (FedRA's random allocation), as many as the
  device's caff plan trains, redrawn until it fits (a low block costs more memory); the blocks
  train fully here, where FedRA trains LoRA on a shallower model made of only those blocks.
- ``smallest``: the largest candidate architecture that every device can train fully; the
  engine runs that architecture and every device trains it all.

A method returns None for a device that sits out this round.
"""

from __future__ import annotations

import random

from costmodel import ModelSpec, TrainMode, estimate
from planner.planfile import DevicePlan, PlanFile

METHODS = ("caff", "lora", "full", "head", "fedra", "smallest")
LORA_MENU = (1, 2, 4, 8, 16, 32, 64)


def fits(spec: ModelSpec, mode: TrainMode, device: DevicePlan, plan: PlanFile) -> bool:
    """Whether ``mode`` meets the device's memory (less the margin), compute and upload budgets."""
    budgets = device.budgets
    report = estimate(spec, mode, budgets.batch_size, plan.seq, plan.optimizer)
    return (report.peak_bytes <= budgets.usable_memory_bytes
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


def device_mode(method: str, spec: ModelSpec, device: DevicePlan, plan: PlanFile, round_seed: int) -> TrainMode | None:
    """The training mode of ``device`` this round under ``method``, or None when it sits out."""
    n = spec.n_blocks
    if method == "caff":
        return TrainMode.parse(device.mode, n) if device.status == "optimal" and device.model == spec.name else None
    if method in ("full", "smallest"):
        mode = TrainMode.parse("all", n)
    elif method == "head":
        mode = TrainMode.parse("head", n)
    elif method == "lora":
        ranks = sorted(plan.lora_ranks or LORA_MENU, reverse=True)
        return next((m for r in ranks if fits(spec, m := TrainMode.parse(f"lora:{r}", n), device, plan)), None)
    elif method == "fedra":
        capacity = len(device.trained_blocks) if device.status == "optimal" else 0
        rng = random.Random(f"{round_seed}:{device.device}")
        for count in range(capacity, -1, -1):
            for _ in range(8):
                mode = TrainMode(blocks=frozenset(rng.sample(range(n), count)))
                if fits(spec, mode, device, plan):
                    return mode
        return None
    else:
        raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")
    return mode if fits(spec, mode, device, plan) else None
