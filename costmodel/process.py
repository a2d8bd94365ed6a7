"""Predicted memory of a device's whole training process, term by term (bytes).

    process = runtime footprint + the step's tensor peak
              + allocator overhead x (the tensor peak less the weights) + data shard + received arrays kept

- runtime: the runtime profile's fixed footprint (`profiles.RuntimeProfile`), with what loading
  the LoRA library adds when the mode has adapters;
- tensor peak: `costmodel.estimate`'s peak of live tensor bytes (weights once, gradients,
  optimizer state, batch, activations, temporaries);
- allocator slack: the runtime profile's measured overhead per byte of the tensor peak that is not
  weights (memory the allocator keeps resident after tensors are freed: activations, gradients and
  temporaries come and go each step, the weights are allocated once and stay);
- data shard: the bytes of the device's own training data, resident while it trains;
- received arrays kept: local training trains a copy of each fully trained tensor and keeps the
  received one as the old value its update is taken against (new - old); frozen tensors and
  LoRA's base weights are the received tensors themselves, LoRA factors are new. With
  ``frozen:bf16|int8`` the server sends the compact linears compact (`costmodel.compact.compact_state`)
  and the model holds the received compact arrays themselves: they are weights of the tensor peak,
  and nothing of them is kept besides, so a compact frozen weight lowers the process as it lowers
  the tensor peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from costmodel.estimate import CostReport, estimate, layer_state, normalize_mode
from costmodel.mode import TrainMode
from costmodel.spec import ModelSpec
from profiles.runtime import RuntimeProfile


@dataclass(frozen=True)
class ProcessMemory:
    """The terms of a training process's predicted peak memory, bytes."""

    runtime_bytes: int
    tensor_peak_bytes: int
    allocator_bytes: int
    shard_bytes: int
    kept_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.runtime_bytes + self.tensor_peak_bytes + self.allocator_bytes + self.shard_bytes + self.kept_bytes

    def to_json(self) -> dict:
        return asdict(self) | {"total_bytes": self.total_bytes}


def kept_bytes(spec: ModelSpec, mode: TrainMode, report: CostReport) -> int:
    """Bytes of received tensors kept besides the model: the old values of the fully trained tensors
    of ``report`` (an estimate of ``mode``); LoRA factors are not received, and compact frozen
    weights arrive compact and are the model's own."""
    mode = normalize_mode(spec, mode)  # tied embeddings train with the head
    return sum(cost.trained_param_bytes for cost in report.layers if layer_state(mode, cost.name) in ("full", True))


def tensor_bytes(*tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (views and windows share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def predict_process(spec: ModelSpec, mode: TrainMode, batch: int, seq: int | None, optimizer: str,
                    runtime: RuntimeProfile, shard_bytes: int = 0) -> ProcessMemory:
    """The predicted peak memory of a process that trains ``mode`` of ``spec`` holding ``shard_bytes``."""
    report = estimate(spec, mode, batch, seq, optimizer)
    return process_memory(runtime, mode, report, shard_bytes, kept_bytes(spec, mode, report))


def churned_bytes(report: CostReport) -> int:
    """The bytes of ``report``'s tensor peak that are not weights: what the allocator's slack scales."""
    return report.peak_bytes - report.totals["param_bytes"]


def process_memory(runtime: RuntimeProfile, mode: TrainMode, report: CostReport, shard_bytes: int,
                   kept: int) -> ProcessMemory:
    """The terms of a process that trains ``mode`` with the tensors of ``report`` (an estimate of it),
    this shard and these kept bytes."""
    return ProcessMemory(runtime.bytes_for(bool(mode.lora)), report.peak_bytes,
                         math.ceil(runtime.allocator_overhead * churned_bytes(report)), shard_bytes, kept)

