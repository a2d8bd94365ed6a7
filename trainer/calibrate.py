"""Measure this machine's runtime footprint and write it as a runtime profile (``caff calibrate``).

Each repetition is a fresh process (`trainer.probe`) that imports what local training imports and
trains a tiny step (char-gpt-xs, head only, batch 1); its footprint is its peak resident set less
the bytes predicted for its tensors (the step's measured tensor peak and the received tensors it
keeps, `costmodel.process`). The profile's footprint is the maximum over repetitions; the same
with LoRA adapters (which loads peft and transformers) gives ``lora_bytes`` as the difference.
"""

from __future__ import annotations

import datetime
import platform

from costmodel import ZOO, TrainMode, estimate
from costmodel.process import kept_bytes
from profiles.runtime import RuntimeProfile, RuntimeSource
from trainer.probe import run_probe

PROBE_MODEL = "char-gpt-xs"
PROBE_MODES = {"plain": "head", "lora": "lora:2"}


def footprint(mode_text: str, repetitions: int) -> tuple[int, str]:
    """(largest footprint over ``repetitions`` fresh processes training ``mode_text``, torch version)."""
    spec = ZOO[PROBE_MODEL]
    mode = TrainMode.parse(mode_text, spec.n_blocks)
    kept = kept_bytes(spec, mode, estimate(spec, mode, 1, None, "sgd"))
    job = {"spec": spec.model_dump_json(), "mode": mode_text, "batch": 1, "seq": None, "optimizer": "sgd", "steps": 2}
    seen = [run_probe(job) for _ in range(repetitions)]
    return max(s["process_peak_bytes"] - s["tensor_peak_bytes"] - kept for s in seen), seen[0]["torch"]


def calibrate(name: str, repetitions: int = 5, machine: str | None = None) -> RuntimeProfile:
    """The runtime profile of this machine, measured ``repetitions`` times (the maximum)."""
    if repetitions < 1:
        raise ValueError(f"--repetitions: must be >= 1, got {repetitions}")
    plain, torch_version = footprint(PROBE_MODES["plain"], repetitions)
    with_lora, _ = footprint(PROBE_MODES["lora"], repetitions)
    machine = machine or f"{platform.machine()} {platform.system()} {platform.release()}"
    source = RuntimeSource(
        machine=machine, torch=torch_version, python=platform.python_version(), repetitions=repetitions,
        date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        method=(f"caff calibrate: {repetitions} fresh processes each import trainer.local and train "
                f"{PROBE_MODEL} ({PROBE_MODES['plain']}, and {PROBE_MODES['lora']} for lora_bytes), batch 1, 2 "
                "steps; peak resident set (VmHWM) less the step's measured tensor peak and the kept received "
                "tensors; the maximum"))
    return RuntimeProfile(name=name, description=f"PyTorch on {machine}, measured by caff calibrate",
                          footprint_bytes=plain, lora_bytes=max(0, with_lora - plain), source=source)
