"""Server aggregation: layer-wise weighted averaging, the one function every engine calls.

Each tensor is averaged over the devices that trained it this round, weighted by their sample
counts; a tensor nobody trained keeps its global value. Updates arrive as changes of the global
tensors (`trainer.local.lora_deltas`), so averaging changes equals averaging the new values for
fully trained tensors, and LoRA clients of different ranks contribute the exact average of
their B A products. An update whose keys, shapes or dtypes do not match the global model, or
that holds NaN or Inf, is rejected whole and logged.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("caff.server")


def check_update(name: str, deltas: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]) -> str | None:
    """Why an update must be rejected, or None."""
    for key, delta in deltas.items():
        if key not in global_state:
            return f"unknown tensor {key!r}"
        expected = global_state[key]
        if delta.shape != expected.shape or delta.dtype != expected.dtype:
            return f"{key}: {tuple(delta.shape)} {delta.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
        if not torch.isfinite(delta).all():
            return f"{key}: holds NaN or Inf"
    return None


def aggregate(global_state: dict[str, torch.Tensor],
              contributions: dict[str, list[tuple[torch.Tensor, float]]]) -> dict[str, torch.Tensor]:
    """New global state: for each tensor, global + sum(w * delta) / sum(w) over its contributors."""
    new_state = dict(global_state)
    for key, pairs in contributions.items():
        total = sum(weight for _, weight in pairs)
        if total > 0:
            change = sum(delta.double() * weight for delta, weight in pairs) / total
            new_state[key] = (global_state[key].double() + change).to(global_state[key].dtype)
    return new_state


def collect(updates: list[tuple[str, dict[str, torch.Tensor], float]],
            global_state: dict[str, torch.Tensor]) -> tuple[dict[str, list[tuple[torch.Tensor, float]]], list[str]]:
    """Group (device, deltas, samples) by tensor, dropping invalid updates; returns (contributions, rejected)."""
    contributions: dict[str, list[tuple[torch.Tensor, float]]] = {}
    rejected = []
    for device, deltas, weight in updates:
        reason = check_update(device, deltas, global_state)
        if reason:
            log.warning("rejected the update of %s: %s", device, reason)
            rejected.append(f"{device}: {reason}")
            continue
        for key, delta in deltas.items():
            contributions.setdefault(key, []).append((delta, weight))
    return contributions, rejected
