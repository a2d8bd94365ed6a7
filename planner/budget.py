"""A device's per-round budgets and the test every planned quantity must pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.table import PlanCosts

BUDGETS = ("memory", "compute", "upload")


@dataclass(frozen=True)
class Budgets:
    """Per round: memory in bytes (of which ``margin`` stays free), FLOPs, upload bytes; steps per round."""

    memory_bytes: int
    compute_flops: float
    upload_bytes: int
    local_steps: int = 1
    margin: float = 0.05

    def __post_init__(self):
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin: must be in [0, 1), got {self.margin}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps: must be >= 1, got {self.local_steps}")

    @classmethod
    def of_device(cls, device, margin: float = 0.05) -> "Budgets":
        """The budgets of a `profiles.DeviceSpec`."""
        return cls(device.memory_bytes, device.compute_flops, device.upload_bytes, device.local_steps, margin)

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * (1 - self.margin)

    def over(self, costs: PlanCosts) -> dict[str, np.ndarray]:
        """Per budget, whether each plan exceeds it (compute counts ``local_steps`` steps)."""
        return {"memory": costs.peak_bytes > self.usable_memory_bytes,
                "compute": self.local_steps * costs.step_flops > self.compute_flops,
                "upload": costs.upload_bytes > self.upload_bytes}

    def fits(self, costs: PlanCosts) -> np.ndarray:
        """Whether each plan fits every budget."""
        over = self.over(costs)
        return ~(over["memory"] | over["compute"] | over["upload"])
