"""``caff validate``: run each distinct plan of a plan file for real; predicted, measured, budget."""

from __future__ import annotations

import torch

from costmodel import TrainMode, estimate, measure
from costmodel.measure import check_fits
from planner.planfile import PlanFile


def validate_plan(plan: PlanFile, device: str | None = None) -> list[dict]:
    """One row per distinct (model, mode, batch, local steps): predictions, CPU measurement (and CUDA's
    ``max_memory_allocated`` when a GPU is present or asked for), and the tightest memory budget."""
    devices = [check_device(device)] if device is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                                                           else [])
    groups: dict[tuple, list] = {}
    for entry in plan.devices:
        if entry.status == "optimal":
            key = (entry.model, entry.mode, entry.budgets.batch_size, entry.budgets.local_steps)
            groups.setdefault(key, []).append(entry)
    if not groups:
        raise ValueError("the plan has no device with a feasible plan: nothing to validate")
    rows = []
    for (model, text, batch, steps), entries in groups.items():
        spec = plan.spec(model)
        mode = TrainMode.parse(text, spec.n_blocks)
        predicted = estimate(spec, mode, batch, plan.seq, plan.optimizer)
        budget = min(e.budgets.memory_bytes for e in entries)
        for where in devices:
            seen = measure(spec, mode, batch, plan.seq, plan.optimizer, device=where)
            peak = seen.cuda_peak_bytes if where == "cuda" else seen.peak_bytes
            rows.append({
                "model": model, "mode": text + ("" if where == "cpu" else f" [{where}]"), "batch": batch,
                "devices": len(entries), "peak_predicted": predicted.peak_bytes, "peak_measured": peak,
                "memory_budget": budget,
                "flops_predicted": steps * (predicted.totals["fwd_flops"] + predicted.totals["bwd_flops"]),
                "flops_measured": steps * (seen.fwd_flops + seen.bwd_flops),
                "upload": predicted.totals["upload_bytes"], "within_budget": peak <= budget})
    return rows


def check_smallest_steps_fit(plan: PlanFile) -> None:
    """Refuse (ValueError, one line) a plan whose smallest step, head-only at a device's batch, cannot fit
    this machine (`costmodel.measure.check_fits`): no method could run it here (batch 1e9 would otherwise
    try to allocate its data first). Larger steps are each method's to check."""
    for batch in sorted({entry.budgets.batch_size for entry in plan.devices}):
        check_fits(plan.spec(plan.winner), TrainMode(), batch, plan.seq, plan.optimizer)


def check_device(device: str) -> str:
    """``device`` if it names a torch device this process can run on (cpu, cuda, cuda:N); ValueError else."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is not None and kind.type == "cpu" and kind.index in (None, 0):
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind is not None and kind.type == "cuda" and (kind.index or 0) < count:
        return device
    raise ValueError(f"--device {device!r}: this machine runs on cpu" + "".join(f", cuda:{i}" for i in range(count))
                     + ("" if count else " (this torch has no usable CUDA device)"))
