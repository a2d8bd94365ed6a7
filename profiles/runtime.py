"""Runtime profiles: the fixed memory a device's training process needs besides the step's tensors.

A runtime's footprint is everything that is not a tensor of the step: the interpreter, the
libraries and their code, the allocator's slack. ``caff calibrate`` measures it as a training
client's peak resident set (VmHWM) minus the tensor bytes it held, and writes a profile; a
device names one (`DeviceSpec.runtime`), or gets `DEFAULT_RUNTIME`. ``lora_bytes`` is what
loading the LoRA library (peft, and the transformers it imports) adds when a plan uses adapters.
``allocator_overhead`` scales the step's tensor peak less its weights (what comes and goes each
step): glibc's malloc keeps freed chunks resident, so a step's peak resident set exceeds its live
tensors.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from profiles.jsonfile import read_json_object
from profiles.units import parse_bytes

DEFAULT_RUNTIME = "pytorch-cpu-x86_64"


class RuntimeSource(BaseModel):
    """Where a footprint comes from: the machine, how it was measured, the versions and when."""

    model_config = ConfigDict(extra="forbid")

    machine: str = Field(min_length=1, description="hardware and OS it was measured on")
    method: str = Field(min_length=1, description="how it was measured")
    torch: str = Field(min_length=1, description="torch version")
    python: str = Field(min_length=1, description="Python version")
    date: str = Field(min_length=1, description="UTC date of the measurement")
    repetitions: int = Field(ge=1, description="fresh processes measured; the footprint is their maximum")


class RuntimeProfile(BaseModel):
    """A runtime's fixed footprint in bytes (peak resident set less the step's tensor bytes)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    footprint_bytes: int = Field(ge=0, description="peak resident bytes besides tensors, without LoRA")
    lora_bytes: int = Field(ge=0, description="what loading the LoRA library adds, bytes")
    allocator_overhead: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                                      description="resident bytes the allocator keeps per byte of the step's "
                                                  "tensor peak less its weights (freed chunks it has not "
                                                  "returned); 0 in "
                                                  "profiles calibrated before caff measured it")
    source: RuntimeSource

    @field_validator("footprint_bytes", "lora_bytes", mode="before")
    @classmethod
    def _parse_bytes(cls, value: Any) -> int:
        return parse_bytes(value)

    def bytes_for(self, uses_lora: bool) -> int:
        """The footprint of a process that trains with LoRA adapters or without."""
        return self.footprint_bytes + (self.lora_bytes if uses_lora else 0)


def load_runtime(name_or_path: str | Path) -> RuntimeProfile:
    """A shipped runtime by name, or the runtime profile in a .json file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".json") or "/" in text:
        data, where = read_json_object(text, "runtime"), text
    else:
        shipped = _shipped_runtimes()
        if text not in shipped:
            raise ValueError(f"unknown runtime '{text}'; known: {', '.join(shipped)}, or a profile .json file")
        data, where = shipped[text], f"catalogue runtimes/{text}.json"
    try:
        return (RuntimeProfile.model_validate_json if isinstance(data, str) else RuntimeProfile.model_validate)(data)
    except ValidationError as exc:
        from profiles.specs import one_line_validation_error

        raise ValueError(f"{where}: {one_line_validation_error(exc)}") from None


def catalogue_runtimes() -> dict[str, RuntimeProfile]:
    """Every shipped runtime profile, by name."""
    return {name: load_runtime(name) for name in _shipped_runtimes()}


@lru_cache(maxsize=None)
def _shipped_runtimes() -> dict[str, str]:
    folder = resources.files("profiles") / "catalogue" / "runtimes"
    return {f.name.removesuffix(".json"): f.read_text(encoding="utf-8")
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".json")}
