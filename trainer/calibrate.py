"""Measure this machine's runtime footprint and write it as a runtime profile (``caff calibrate``).

Each repetition is a fresh process (`trainer.probe`) that imports what local training imports and
trains a tiny step (char-gpt-xs, head only, batch 1); its footprint is its peak resident set less
the bytes predicted for its tensors (the step's measured tensor peak and the received tensors it
keeps, `costmodel.process`). The profile's footprint is the maximum over repetitions; the same
with LoRA adapters (which loads peft and transformers) gives ``lora_bytes`` as the difference, and
a step with tens of MiB of tensors gives the allocator's slack per byte of its tensor peak that is
not weights (`costmodel.process.churned_bytes`).
"""

from __future__ import annotations

import datetime
import platform

from costmodel import ZOO, TrainMode, estimate
from costmodel.process import churned_bytes, kept_bytes
from profiles.runtime import RuntimeProfile, RuntimeSource
from trainer.probe import run_probe

PROBE_MODEL = "char-gpt-xs"
PROBE_MODES = {"plain": "head", "lora": "lora:2"}
SLACK_PROBE = ("char-gpt-s", "all", 8)  # a step with tens of MiB of tensors, for the allocator's slack


def _residue(name: str, mode_text: str, batch: int, repetitions: int) -> tuple[list[int], list[int], str]:
    """Per fresh process: (resident bytes besides predicted tensors, measured tensor peak less the
    predicted weights), torch version."""
    spec = ZOO[name]
    mode = TrainMode.parse(mode_text, spec.n_blocks)
    report = estimate(spec, mode, batch, None, "sgd")
    kept, weights = kept_bytes(spec, mode, report), report.peak_bytes - churned_bytes(report)
    job = {"spec": spec.model_dump_json(), "mode": mode_text, "batch": batch, "seq": None, "optimizer": "sgd",
           "steps": 2}
    seen = [run_probe(job) for _ in range(repetitions)]
    residue = [s["process_peak_bytes"] - s["tensor_peak_bytes"] - kept for s in seen]
    return residue, [s["tensor_peak_bytes"] - weights for s in seen], seen[0]["torch"]


def calibrate(name: str, repetitions: int = 5, machine: str | None = None) -> RuntimeProfile:
    """The runtime profile of this machine, measured ``repetitions`` times (the maximum)."""
    if repetitions < 1:
        raise ValueError(f"--repetitions: must be >= 1, got {repetitions}")
    plain, _, torch_version = _residue(PROBE_MODEL, PROBE_MODES["plain"], 1, repetitions)
    with_lora, _, _ = _residue(PROBE_MODEL, PROBE_MODES["lora"], 1, repetitions)
    footprint = max(plain)
    residue, churned = _residue(*SLACK_PROBE, repetitions)[:2]
    overhead = max((r - footprint) / t for r, t in zip(residue, churned))
    machine = machine or f"{platform.machine()} {platform.system()} {platform.release()}"
    source = RuntimeSource(
        machine=machine, torch=torch_version, python=platform.python_version(), repetitions=repetitions,
        date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        method=(f"caff calibrate: {repetitions} fresh processes each import trainer.local and train "
                f"{PROBE_MODEL} ({PROBE_MODES['plain']}, and {PROBE_MODES['lora']} for lora_bytes), batch 1, 2 "
                "steps; peak resident set (VmHWM) less the step's measured tensor peak and the kept received "
                "tensors; the maximum. allocator_overhead: the same for "
                f"{' '.join(map(str, SLACK_PROBE))} (model, mode, batch), what exceeds the footprint per byte of "
                "tensor peak less the weights; the maximum"))
    return RuntimeProfile(name=name, description=f"PyTorch on {machine}, measured by caff calibrate",
                          footprint_bytes=footprint, lora_bytes=max(0, max(with_lora) - footprint),
                          allocator_overhead=round(max(0.0, overhead), 3), source=source)
