"""Device and fleet specifications: each device's per-round budgets for memory, compute and upload.

Every quantity may be written for people ("512MiB", "10 GFLOP/s", "2Mbit/s", "60 s"); validation
turns it into a plain number: bytes, FLOPs, bytes/s or seconds.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from profiles.jsonfile import read_json_object
from profiles.runtime import DEFAULT_RUNTIME, load_runtime
from profiles.units import parse_bytes, parse_flops, parse_flops_rate, parse_rate_bits, parse_seconds

_Model = TypeVar("_Model", bound=BaseModel)

MAX_FLEET_DEVICES = 100_000  # a plan file holds an entry per device; beyond this it would take GBs


class DeviceSpec(BaseModel):
    """One device's per-round budgets.

    compute_flops may instead be given as flops_per_second and seconds_per_round, and upload_bytes
    as upload_bandwidth and seconds_per_round; after validation both are always set.  When a
    budget is given both ways the two must agree.  Counts are strict integers (``"3"`` and ``true``
    are refused); quantities may be numbers or strings with units.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    description: str = Field(default="", description="where the figures come from")
    memory_bytes: int = Field(gt=0, description="memory the whole training process may use, bytes")
    runtime: str = Field(default=DEFAULT_RUNTIME, description="runtime profile: a shipped name or a .json file")
    compute_flops: float = Field(gt=0, description="FLOPs the device can spend per round")
    upload_bytes: int = Field(gt=0, description="bytes the device can upload per round")
    flops_per_second: float | None = Field(default=None, gt=0, description="sustained FLOP/s")
    seconds_per_round: float | None = Field(default=None, gt=0, description="round length, seconds")
    upload_bandwidth: float | None = Field(default=None, gt=0, description="uplink, bytes/s")
    local_steps: int = Field(default=1, ge=1, description="optimizer steps per round")
    batch_size: int = Field(default=16, ge=1, description="examples per step")

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("must not be blank")
        return name

    @field_validator("runtime")
    @classmethod
    def _runtime_known(cls, runtime: str) -> str:
        load_runtime(runtime)
        return runtime

    @field_validator("memory_bytes", "upload_bytes", mode="before")
    @classmethod
    def _parse_byte_budget(cls, value: Any) -> int:
        return parse_bytes(value)

    @field_validator("compute_flops", mode="before")
    @classmethod
    def _parse_compute_budget(cls, value: Any) -> float:
        return parse_flops(value)

    @field_validator("flops_per_second", mode="before")
    @classmethod
    def _parse_flops_rate(cls, value: Any) -> float | None:
        return None if value is None else parse_flops_rate(value)

    @field_validator("seconds_per_round", mode="before")
    @classmethod
    def _parse_round_length(cls, value: Any) -> float | None:
        return None if value is None else parse_seconds(value)

    @field_validator("upload_bandwidth", mode="before")
    @classmethod
    def _parse_bandwidth(cls, value: Any) -> float | None:
        return None if value is None else parse_rate_bits(value)

    @model_validator(mode="before")
    @classmethod
    def _resolve_budgets(cls, data: Any) -> Any:
        """Fill compute_flops and upload_bytes from rate * seconds_per_round where given that way."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        seconds = _parse_entry(data, "seconds_per_round", parse_seconds)
        data["compute_flops"] = _resolve_budget(
            data, "compute_flops", parse_flops, "flops_per_second", parse_flops_rate, seconds
        )
        data["upload_bytes"] = _resolve_budget(
            data, "upload_bytes", parse_bytes, "upload_bandwidth", parse_rate_bits, seconds
        )
        return data


def _parse_entry(data: dict[str, Any], key: str, parse: Callable[[Any], float]) -> float | None:
    """data[key] parsed (and stored back parsed), None when absent or null; errors name the key."""
    if data.get(key) is None:
        return None
    try:
        data[key] = parse(data[key])
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from exc
    return data[key]


def _resolve_budget(
    data: dict[str, Any],
    budget: str,
    parse_budget: Callable[[Any], float],
    rate_key: str,
    parse_rate: Callable[[Any], float],
    seconds: float | None,
) -> Any:
    """The budget as given directly, or rate * seconds_per_round; both ways must agree if both given."""
    if budget in data and data[budget] is None:
        raise ValueError(f"{budget}: null is not allowed; every device needs this budget")
    rate = _parse_entry(data, rate_key, parse_rate)
    if rate is None:
        if budget not in data:
            raise ValueError(f"{budget} missing: give {budget}, or {rate_key} and seconds_per_round")
        return data[budget]
    if seconds is None:
        raise ValueError(f"{rate_key} needs seconds_per_round to give {budget}")
    derived = rate * seconds
    if budget not in data:
        return derived
    given = _parse_entry(data, budget, parse_budget)
    if not math.isclose(given, derived, rel_tol=1e-9, abs_tol=1.0):
        raise ValueError(f"{budget}={given:g} disagrees with {rate_key} * seconds_per_round = {derived:g}")
    return given


class DeviceClass(BaseModel):
    """Identical devices in a fleet: a fixed count of them, or a share of the devices drawn."""

    model_config = ConfigDict(extra="forbid", strict=True)

    device: DeviceSpec = Field(description="a device spec, or the name of a catalogue device")
    count: int | None = Field(default=None, ge=1)
    share: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)

    @field_validator("device", mode="before")
    @classmethod
    def _look_up_catalogue_name(cls, value: Any) -> Any:
        return _catalogue_device(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _count_or_share(self) -> DeviceClass:
        if (self.count is None) == (self.share is None):
            raise ValueError(f"device class '{self.device.name}': give exactly one of count or share")
        return self


class FleetSpec(BaseModel):
    """A fleet: device classes (all by count or all by share), or an explicit list of devices; at most
    MAX_FLEET_DEVICES devices."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    description: str = ""
    classes: list[DeviceClass] | None = Field(default=None, min_length=1)
    devices: list[DeviceSpec] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check_composition(self) -> FleetSpec:
        if (self.classes is None) == (self.devices is None):
            raise ValueError("give exactly one of classes or devices")
        if self.devices is not None:
            repeated = [name for name, seen in Counter(d.name for d in self.devices).items() if seen > 1]
            if repeated:
                raise ValueError(f"devices: repeated device names {', '.join(repeated)}")
            check_fleet_size(len(self.devices))
        elif self.uses_shares:
            if any(c.share is None for c in self.classes):
                raise ValueError("classes: give every class a count, or every class a share, not a mix")
            total = sum(c.share for c in self.classes)
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(f"classes: shares sum to {total:g}; they must sum to 1")
        else:
            check_fleet_size(sum(c.count for c in self.classes))
        return self

    @property
    def uses_shares(self) -> bool:
        """True when the fleet's classes are given by share, so expand() needs n."""
        return self.classes is not None and any(c.share is not None for c in self.classes)

    def expand(self, n: int | None = None, seed: int = 0) -> list[DeviceSpec]:
        """The fleet's devices, one spec each.

        Classes by count give each device `count` times; classes by share give n devices drawn
        with random.Random(seed).  Devices from classes are named "<device>#<k>", k = 1, 2, ...
        An explicit device list is returned as is.  n is required with shares; otherwise it may
        be given only if it equals the fleet's size.
        """
        if self.uses_shares:
            if n is None or n < 1:
                raise ValueError(f"fleet '{self.name}' is given by shares: pass n >= 1 devices to draw")
            check_fleet_size(n)
            rng = random.Random(seed)
            drawn = rng.choices([c.device for c in self.classes], weights=[c.share for c in self.classes], k=n)
            return _numbered(drawn)
        if self.devices is not None:
            devices = [d.model_copy() for d in self.devices]
        else:
            devices = _numbered([c.device for c in self.classes for _ in range(c.count)])
        if n is not None and n != len(devices):
            raise ValueError(f"fleet '{self.name}' has {len(devices)} devices, not n={n}")
        return devices


def check_fleet_size(n: int) -> None:
    """Refuse fleets of more than MAX_FLEET_DEVICES devices (each gets its own plan file entry)."""
    if n > MAX_FLEET_DEVICES:
        raise ValueError(f"a fleet of {n:,} devices: caff plans at most {MAX_FLEET_DEVICES:,} devices")


def _numbered(devices: list[DeviceSpec]) -> list[DeviceSpec]:
    """Copies of devices renamed "<name>#<k>", counting k from 1 separately for each name."""
    seen: Counter[str] = Counter()
    numbered = []
    for device in devices:
        seen[device.name] += 1
        numbered.append(device.model_copy(update={"name": f"{device.name}#{seen[device.name]}"}))
    return numbered


def one_line_validation_error(exc: ValidationError) -> str:
    """The first error in exc as one line, "field.path: message", noting how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    line = f"{location.lstrip('.')}: {message}" if location else message
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return " ".join(line.split())


def load_device(name_or_path: str | Path) -> DeviceSpec:
    """A catalogue device by name, or the device in a .json file."""
    if _is_path(name_or_path):
        return _load_file(Path(name_or_path), DeviceSpec)
    return _catalogue_device(str(name_or_path))


def load_fleet(name_or_path: str | Path) -> FleetSpec:
    """A catalogue fleet by name, or the fleet in a .json file."""
    if _is_path(name_or_path):
        return _load_file(Path(name_or_path), FleetSpec)
    return _catalogue_entry("fleets", str(name_or_path), FleetSpec)


def catalogue_devices() -> dict[str, DeviceSpec]:
    """Every shipped device, by name."""
    return {name: _catalogue_device(name) for name in _catalogue_texts("devices")}


def catalogue_fleets() -> dict[str, FleetSpec]:
    """Every shipped fleet, by name."""
    return {name: _catalogue_entry("fleets", name, FleetSpec) for name in _catalogue_texts("fleets")}


def _is_path(name_or_path: str | Path) -> bool:
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or text.endswith(".json") or "/" in text or "\\" in text


def _load_file(path: Path, model: type[_Model]) -> _Model:
    data = read_json_object(path, "device" if model is DeviceSpec else "fleet")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: {one_line_validation_error(exc)}") from exc


def _catalogue_device(name: str) -> DeviceSpec:
    return _catalogue_entry("devices", name, DeviceSpec)


def _catalogue_entry(kind: str, name: str, model: type[_Model]) -> _Model:
    """Validate the shipped entry `name` of kind "devices" or "fleets"."""
    texts = _catalogue_texts(kind)
    if name not in texts:
        raise ValueError(f"unknown {kind.removesuffix('s')} '{name}'; known: {', '.join(texts)}")
    try:
        entry = model.model_validate_json(texts[name])
    except ValidationError as exc:
        raise ValueError(f"catalogue {kind}/{name}.json: {one_line_validation_error(exc)}") from exc
    if entry.name != name:
        raise ValueError(f"catalogue {kind}/{name}.json names itself '{entry.name}'")
    return entry


@lru_cache(maxsize=None)
def _catalogue_texts(kind: str) -> dict[str, str]:
    """JSON text of each shipped entry of kind "devices" or "fleets", keyed by file stem, sorted."""
    folder = resources.files("profiles") / "catalogue" / kind
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return {f.name.removesuffix(".json"): f.read_text(encoding="utf-8") for f in files}
