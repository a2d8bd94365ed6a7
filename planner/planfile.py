"""The plan file: versioned JSON that ``caff plan`` writes and ``caff validate`` / ``caff train`` read.

One entry per device (what it trains, the predicted costs, its budgets, the binding budgets), the
candidate architectures' summaries and the model specs, with the batch/seq/optimizer the costs
were predicted for, so that a reader can rebuild every estimate. Sizes in bytes, work in FLOPs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from costmodel.estimate import OPTIMIZERS
from costmodel.mode import TrainMode
from costmodel.spec import ModelSpec
from profiles import one_line_validation_error, read_json_object
from profiles.atomic import atomic_write

PLAN_FILE_VERSION = 1
Budget = Literal["memory", "compute", "upload"]


class _Strict(BaseModel):
    """Unknown fields refused; types strict (a count given as ``"80"`` or ``true`` is refused, not converted);
    NaN and infinity refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DeviceBudgets(_Strict):
    """A device's per-round budgets as planned; usable memory is memory * (1 - margin)."""

    memory_bytes: int = Field(gt=0)
    usable_memory_bytes: float = Field(gt=0)
    compute_flops: float = Field(gt=0)
    upload_bytes: int = Field(gt=0)
    local_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _usable_within_memory(self) -> "DeviceBudgets":
        if self.usable_memory_bytes > self.memory_bytes:
            raise ValueError(f"usable_memory_bytes {self.usable_memory_bytes:g} exceeds memory_bytes "
                             f"{self.memory_bytes}")
        return self


class Needs(_Strict):
    """What the smallest plan (head only) needs: process memory before the margin (runtime included),
    FLOPs per round, upload bytes."""

    memory_bytes: float = Field(gt=0)
    compute_flops: int = Field(ge=0)
    upload_bytes: int = Field(ge=0)


class ProcessTerms(_Strict):
    """A plan's predicted process memory, term by term (`costmodel.process`), bytes: the runtime's
    footprint, the step's tensor peak, the allocator's slack, the data shard and the received tensors
    kept; their sum."""

    runtime_bytes: int = Field(ge=0)
    tensor_peak_bytes: int = Field(gt=0)
    allocator_bytes: int = Field(default=0, ge=0, description="0 in plans written before caff predicted it")
    shard_bytes: int = Field(ge=0)
    kept_bytes: int = Field(ge=0)
    total_bytes: int = Field(gt=0)


class DevicePlan(_Strict):
    """One device's plan. ``binding``: for an optimal plan, the budgets that alone stop a better plan
    (relaxing any one of them would allow a better one); for an infeasible device, the budgets the
    head-only plan breaks."""

    device: str
    model: str
    status: Literal["optimal", "infeasible"]
    mode: str | None
    trained_blocks: list[int] = []
    lora_ranks: dict[Annotated[int, Strict(False)], int] = {}  # JSON keys are strings
    peak_bytes: int | None = Field(default=None, gt=0)
    flops_per_round: int | None = Field(default=None, ge=0)
    upload_bytes: int | None = Field(default=None, ge=0)
    budgets: DeviceBudgets
    binding: list[Budget] = []
    needs: Needs | None = None
    solver_seconds: float = Field(ge=0)
    runtime: str | None = Field(default=None, description="the device's runtime profile (plans before it: none)")
    process: ProcessTerms | None = Field(default=None, description="predicted process memory of the plan, "
                                         "or of the head-only plan where infeasible")

    @model_validator(mode="after")
    def _status_fields(self) -> "DevicePlan":
        planned = (self.mode, self.peak_bytes, self.flops_per_round, self.upload_bytes)
        if self.status == "optimal" and (None in planned or self.needs is not None):
            raise ValueError(f"device {self.device!r}: an optimal plan has mode and costs and no needs")
        if self.status == "infeasible" and (planned != (None,) * 4 or self.needs is None):
            raise ValueError(f"device {self.device!r}: an infeasible device has needs and no mode or costs")
        return self


class ArchitectureSummary(_Strict):
    """How one candidate architecture did over the fleet; ``score`` is the mean objective per device
    (0 for an infeasible device), ``coverage[b]`` the share of devices training block b (fully or LoRA)."""

    model: str
    score: float = Field(ge=0)
    mean_trained_blocks: float = Field(ge=0)
    mean_lora_blocks: float = Field(ge=0)
    infeasible_devices: int = Field(ge=0)
    coverage: list[Annotated[float, Field(ge=0, le=1)]]
    meets_min_coverage: bool
    verdict: str


class PlanFile(_Strict):
    """The plan of a fleet: with a winner, one entry per device (names unique, each on the winner);
    without one (no architecture met the minimum coverage), no entries."""

    version: Literal[1] = PLAN_FILE_VERSION
    objective: str
    lora_ranks: list[int]
    recompute: bool = Field(default=False, description="trained blocks could recompute (plans before it: no)")
    frozen: list[Literal["bf16", "int8"]] = Field(default=[], description="compact frozen weights on offer "
                                                  "(plans before it: none)")
    margin: float = Field(ge=0, lt=1)
    min_coverage: float | None = Field(default=None, ge=0, le=1)
    seq: int | None = Field(default=None, ge=1, description="tokens per sample; null: each model's maximum")
    optimizer: Literal[OPTIMIZERS]
    solver: Literal["frontier", "ilp"]
    models: list[ModelSpec]
    architectures: list[ArchitectureSummary]
    winner: str | None
    devices: list[DevicePlan]

    @model_validator(mode="after")
    def _references(self) -> "PlanFile":
        specs = {spec.name: spec for spec in self.models}
        if self.winner is not None and self.winner not in specs:
            raise ValueError(f"winner {self.winner!r} is not among the models")
        if (self.winner is None) != (not self.devices):
            raise ValueError("devices: a plan with a winner has an entry per device, one without has none")
        repeated = [name for name, seen in Counter(entry.device for entry in self.devices).items() if seen > 1]
        if repeated:
            raise ValueError(f"devices: repeated device name {repeated[0]!r}; each device needs its own name")
        modes = {}  # (model, mode text) -> TrainMode: fleets repeat a few modes many times
        for entry in self.devices:
            if entry.model != self.winner:
                raise ValueError(f"device {entry.device!r}: model {entry.model!r} is not the winner {self.winner!r}")
            if entry.mode is not None:
                key = (entry.model, entry.mode)
                mode = modes.get(key) or modes.setdefault(key, TrainMode.parse(entry.mode, specs[entry.model].n_blocks))
                if sorted(mode.blocks) != entry.trained_blocks or mode.lora != entry.lora_ranks:
                    raise ValueError(f"device {entry.device!r}: mode {entry.mode!r} disagrees with "
                                     "trained_blocks/lora_ranks")
        return self

    def spec(self, name: str) -> ModelSpec:
        return next(spec for spec in self.models if spec.name == name)


def write_plan_file(path: str | Path, plan: PlanFile) -> None:
    """Write ``plan`` as JSON, atomically and durably (`profiles.atomic.atomic_write`)."""
    atomic_write(path, plan.model_dump_json(indent=1) + "\n")


def read_plan_file(path: str | Path) -> PlanFile:
    """Read and check a plan file; ValueError with one line naming the file and the bad field."""
    data = read_json_object(path, "plan")
    if data.get("version") != PLAN_FILE_VERSION or isinstance(data.get("version"), bool):
        raise ValueError(f"{path}: plan file version {data.get('version')!r} is not supported "
                         f"(this caff reads version {PLAN_FILE_VERSION})")
    try:
        return PlanFile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: {one_line_validation_error(exc)}") from None
