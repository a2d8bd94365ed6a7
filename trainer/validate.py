"""``caff validate``: run each distinct plan of a plan file for real; predicted, measured, budget.

Each distinct plan runs in a fresh process through `trainer.local.local_train`, as a training
client runs it (`trainer.probe`), holding its data shard's bytes: the step's tensor peak and the
process's peak resident set are measured there and compared with `costmodel.process`'s
prediction and the device's memory budget (the whole process's). With a GPU, the step is also
measured on it (``max_memory_allocated``, tensors only).
"""

from __future__ import annotations

import torch

from costmodel import TrainMode, estimate, measure
from costmodel.measure import check_fits
from costmodel.process import predict_process
from planner.planfile import PlanFile
from profiles.runtime import DEFAULT_RUNTIME, load_runtime
from trainer.probe import run_probe

PROBE_STEPS = 2  # local training measures the tensor peak on the second step (optimizer state allocated)


def validate_plan(plan: PlanFile, device: str | None = None) -> list[dict]:
    """One row per distinct (model, mode, batch, local steps, runtime, shard): predicted and measured
    tensor peak and process peak, FLOPs per round, and the least memory budget among its devices."""
    where = [check_device(device)] if device is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                                                          else [])
    groups: dict[tuple, list] = {}
    for entry in plan.devices:
        if entry.status == "optimal":
            shard = entry.process.shard_bytes if entry.process else 0
            key = (entry.model, entry.mode, entry.budgets.batch_size, entry.budgets.local_steps,
                   entry.runtime or DEFAULT_RUNTIME, shard)
            groups.setdefault(key, []).append(entry)
    if not groups:
        raise ValueError("the plan has no device with a feasible plan: nothing to validate")
    rows = []
    for (model, text, batch, steps, runtime, shard), entries in groups.items():
        spec = plan.spec(model)
        mode = TrainMode.parse(text, spec.n_blocks)
        predicted = predict_process(spec, mode, batch, plan.seq, plan.optimizer, load_runtime(runtime), shard)
        report = estimate(spec, mode, batch, plan.seq, plan.optimizer)
        budget = min(e.budgets.memory_bytes for e in entries)
        row = {"model": model, "mode": text, "batch": batch, "devices": len(entries), "runtime": runtime,
               "memory_budget": budget, "upload": report.totals["upload_bytes"],
               "flops_predicted": steps * (report.totals["fwd_flops"] + report.totals["bwd_flops"]),
               "peak_predicted": predicted.tensor_peak_bytes, "process_predicted": predicted.total_bytes,
               "process_terms": predicted.to_json()}
        check_fits(spec, mode, batch, plan.seq, plan.optimizer)  # refuse before allocating what this machine lacks
        if "cpu" in where:
            seen = run_probe({"spec": spec.model_dump_json(), "mode": text, "batch": batch, "seq": plan.seq,
                              "optimizer": plan.optimizer, "steps": PROBE_STEPS, "shard_bytes": shard})
            rows.append(row | {"peak_measured": seen["tensor_peak_bytes"],
                               "process_measured": seen["process_peak_bytes"],
                               "ru_maxrss": seen["ru_maxrss_bytes"], "uss": seen["uss_bytes"],
                               "flops_measured": steps * seen["step_flops"],
                               "within_budget": max(seen["tensor_peak_bytes"], seen["process_peak_bytes"]) <= budget})
        for gpu in (w for w in where if w != "cpu"):
            seen = measure(spec, mode, batch, plan.seq, plan.optimizer, device=gpu)
            rows.append(row | {"mode": f"{text} [{gpu}]", "peak_measured": seen.cuda_peak_bytes,
                               "process_measured": None, "ru_maxrss": None, "uss": None,
                               "flops_measured": steps * (seen.fwd_flops + seen.bwd_flops),
                               "within_budget": seen.cuda_peak_bytes <= budget})
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
