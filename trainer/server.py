"""Server aggregation: layer-wise weighted averaging, the one function every engine calls.

Each tensor is averaged over the devices that trained it this round, weighted by their sample
counts; a tensor nobody trained keeps its global value. A device replies with what it trained,
as trained: new values of fully trained tensors, and the A and B factors of its LoRA adapters
with their scale (the record's ``lora_scale``). The server turns a reply into changes of the
global tensors (`lora_deltas`: new - old, and B A * scale for each adapted weight), so averaging
changes equals averaging the new values for fully trained tensors, and LoRA clients of different
ranks contribute the exact average of their B A products. A reply whose keys, shapes or dtypes
do not match the global model, whose factors come unpaired or without a scale, or that holds NaN
or Inf, is rejected whole and logged.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("caff.server")


LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"  # peft's names, base layer's prefix


def _factors(name: str) -> str | None:
    """The adapted weight's name if ``name`` is a LoRA factor, else None."""
    for suffix in (LORA_A, LORA_B):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None


def check_update(update: dict[str, torch.Tensor], lora_scale: float | None,
                 global_state: dict[str, torch.Tensor]) -> str | None:
    """Why a reply must be rejected, or None."""
    for key, value in update.items():
        if not torch.isfinite(value).all():
            return f"{key}: holds NaN or Inf"
        weight = _factors(key)
        if weight is None:
            if key not in global_state:
                return f"unknown tensor {key!r}"
            expected = global_state[key]
            if value.shape != expected.shape or value.dtype != expected.dtype:
                return f"{key}: {tuple(value.shape)} {value.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
            continue
        if weight not in global_state:
            return f"LoRA factor {key!r} of an unknown weight"
        base = weight[: -len(".weight")]
        down, up = update.get(base + LORA_A), update.get(base + LORA_B)
        if down is None or up is None:
            return f"{key}: a LoRA factor without its pair"
        out_features, in_features = global_state[weight].shape
        if (down.dim() != 2 or up.dim() != 2 or down.shape[1] != in_features or up.shape[0] != out_features
                or up.shape[1] != down.shape[0] or {down.dtype, up.dtype} != {global_state[weight].dtype}):
            return f"{base}: LoRA factors {tuple(down.shape)} and {tuple(up.shape)} do not fit {weight}"
        if not (isinstance(lora_scale, (int, float)) and math.isfinite(lora_scale)):
            return "LoRA factors without a finite scale"
    return None


def lora_deltas(update: dict[str, torch.Tensor], lora_scale: float | None,
                global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A (checked) reply as changes of global tensors: new - old, and B A * scale for LoRA factors."""
    deltas = {}
    for name, value in update.items():
        weight = _factors(name)
        if weight is None:
            deltas[name] = value - global_state[name]
        elif name.endswith(LORA_A):
            deltas[weight] = (update[weight[: -len(".weight")] + LORA_B] @ value) * lora_scale
    return deltas


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


def collect(updates: list[tuple[str, dict[str, torch.Tensor], float | None, float]],
            global_state: dict[str, torch.Tensor]) -> tuple[dict[str, list[tuple[torch.Tensor, float]]], list[str]]:
    """Group (device, reply, LoRA scale, samples) by tensor as changes, dropping invalid replies;
    returns (contributions, rejected)."""
    contributions: dict[str, list[tuple[torch.Tensor, float]]] = {}
    rejected = []
    for device, update, lora_scale, weight in updates:
        reason = check_update(update, lora_scale, global_state)
        if reason:
            log.warning("rejected the update of %s: %s", device, reason)
            rejected.append(f"{device}: {reason}")
            continue
        for key, delta in lora_deltas(update, lora_scale, global_state).items():
            contributions.setdefault(key, []).append((delta, weight))
    return contributions, rejected
