"""Per-round budgets of one device, or of many at once, and the test every planned quantity must pass."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from planner.table import MAX_COST, PlanCosts
from profiles.runtime import load_runtime

BUDGETS = ("memory", "compute", "upload")
_FIELD = {"memory": "memory_bytes", "compute": "compute_flops", "upload": "upload_bytes"}


@dataclass(frozen=True)
class Budgets:
    """Per round: memory in bytes (of which ``margin`` stays free), FLOPs, upload bytes; steps per round.

    Memory is the whole training process's (`costmodel.process`): ``fixed_bytes`` (the runtime's
    footprint and the data shard) + the plan's tensor peak + ``tensor_overhead`` (the allocator's slack)
    x the tensor peak less the weights (`costmodel.process.churned_bytes`) + the received tensors it keeps, which
    are the old values of what it trains (`costmodel.process.kept_bytes`), bounded by its upload bytes
    (which add LoRA's factors).
    Fields are numbers for one device or column arrays, shape (devices, 1), for many (`stack`):
    then `over` and `fits` compare every device with every plan. ``math.inf`` lifts a budget.
    """

    memory_bytes: float | np.ndarray
    compute_flops: float | np.ndarray
    upload_bytes: float | np.ndarray
    local_steps: int | np.ndarray = 1
    margin: float = 0.05
    fixed_bytes: int | np.ndarray = 0
    tensor_overhead: float | np.ndarray = 0.0

    def __post_init__(self):
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin: must be in [0, 1), got {self.margin}")

    @classmethod
    def of_device(cls, device, margin: float = 0.05, shard_bytes: int = 0, lora: bool = False) -> "Budgets":
        """The budgets of a `profiles.DeviceSpec` holding ``shard_bytes`` of data; ``lora``: plans may
        use LoRA adapters, so the runtime counts the LoRA library."""
        runtime = runtime_profile(device.runtime)
        return cls(device.memory_bytes, device.compute_flops, device.upload_bytes, device.local_steps, margin,
                   runtime.bytes_for(lora) + shard_bytes, runtime.allocator_overhead)

    @classmethod
    def stack(cls, budgets: list["Budgets"]) -> "Budgets":
        """Many devices' budgets (sharing one margin) as column arrays."""
        column = lambda name: np.array([getattr(b, name) for b in budgets])[:, None]  # noqa: E731
        return cls(column("memory_bytes"), column("compute_flops").astype(float), column("upload_bytes"),
                   column("local_steps"), budgets[0].margin, column("fixed_bytes"), column("tensor_overhead"))

    @property
    def devices(self) -> int:
        """How many devices stacked budgets hold (fields a lifted budget made a number count for all)."""
        return max(len(value) for f in dataclasses.fields(self) if np.ndim(value := getattr(self, f.name)))

    def rows(self, index) -> "Budgets":
        """The budgets of the devices at ``index`` (a slice or indices) of stacked budgets."""
        return dataclasses.replace(self, **{f.name: value[index] for f in dataclasses.fields(self)
                                            if np.ndim(value := getattr(self, f.name))})

    def without(self, budget: str) -> "Budgets":
        """The same budgets with ``budget`` ('memory', 'compute' or 'upload') lifted."""
        return dataclasses.replace(self, **{_FIELD[budget]: math.inf})

    @property
    def usable_memory_bytes(self) -> float | np.ndarray:
        return self.memory_bytes * (1 - self.margin)

    def process_bytes(self, costs: PlanCosts) -> np.ndarray:
        """The planned bound on each plan's process memory: fixed + tensor peak + the allocator's slack on
        its churned part + kept received tensors; `costmodel.process`'s figure, with the kept tensors
        bounded by the upload bytes."""
        return self.fixed_bytes + self._variable_bytes(costs)

    def _variable_bytes(self, costs: PlanCosts) -> np.ndarray:
        """The plan-dependent part of `process_bytes`: tensor peak, the allocator's slack on it less the
        weights (rounded up, as `costmodel.process`) and the kept received tensors (bounded by the upload), in
        integers. Devices of one runtime share one overhead: then per plan, not per device and plan."""
        overhead = np.asarray(self.tensor_overhead)
        if overhead.size and (overhead == overhead.flat[0]).all():
            overhead = overhead.flat[0]
        slack = np.ceil((costs.peak_bytes - costs.weight_bytes) * overhead).astype(np.int64)
        return costs.peak_bytes + slack + costs.upload_bytes

    def over(self, costs: PlanCosts) -> dict[str, np.ndarray]:
        """Per budget, whether each plan exceeds it (compute counts ``local_steps`` steps), compared
        exactly in integers: a plan's cost exceeds a budget iff it exceeds the budget's `_allowance`
        (memory: the process's tensor peak and kept tensors against what the fixed bytes leave)."""
        memory, compute, upload = self.allowances()
        return {"memory": self._variable_bytes(costs) > memory, "compute": costs.step_flops > compute,
                "upload": costs.upload_bytes > upload}

    def allowances(self) -> tuple:
        """Per budget (memory, compute, upload), the largest integer cost that fits it (`_allowance`):
        memory for the tensor peak with its slack and the kept tensors, FLOPs of one step, bytes."""
        return (_allowance(self.usable_memory_bytes - self.fixed_bytes),
                _allowance(self.compute_flops, self.local_steps), _allowance(self.upload_bytes))

    def fits(self, costs: PlanCosts) -> np.ndarray:
        """Whether each plan fits every budget."""
        over = self.over(costs)
        return ~(over["memory"] | over["compute"] | over["upload"])


@functools.lru_cache(maxsize=64)
def runtime_profile(name: str):
    """`load_runtime`, read once per name: a fleet shares a few runtimes among thousands of devices."""
    return load_runtime(name)


def _allowance(limit, per=1):
    """The largest integer q with ``per * q <= limit`` (elementwise for arrays), capped at MAX_COST: an
    integer cost c fits the limit iff c <= q. Exact for any size of limit and per, where multiplying
    int64 costs by local steps (1e12 steps x 7e7 FLOPs) would wrap around: in int64 where limit and per
    are below 2^53 (floats hold such integers exactly), in Python integers elsewhere."""
    def one(x, k) -> int:
        return MAX_COST if not math.isfinite(x) else min(math.floor(x) // int(k), MAX_COST)

    shape = np.broadcast_shapes(np.shape(limit), np.shape(per))
    if not shape:
        return one(limit, per)
    limit, per = (np.broadcast_to(np.asarray(v), shape) for v in (limit, per))
    near = limit.astype(float)  # the same, or nearest, where limit holds Python integers beyond int64
    small = (np.abs(near) < 2.0**53) & (per < 2**53)  # limit is finite there, and exact as a float
    q = np.full(shape, MAX_COST, dtype=np.int64)  # also where the limit is lifted (infinite)
    q[small] = np.minimum(np.floor(near[small]).astype(np.int64) // per[small].astype(np.int64), MAX_COST)
    for index in zip(*np.nonzero(~small & np.isfinite(near))):
        q[index] = one(limit[index], per[index])
    return q
