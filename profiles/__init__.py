"""Device and fleet profiles: per-round memory, compute and upload budgets, and a shipped catalogue."""

from profiles.jsonfile import read_json, read_json_object
from profiles.specs import (
    MAX_FLEET_DEVICES,
    DeviceClass,
    DeviceSpec,
    FleetSpec,
    catalogue_devices,
    catalogue_fleets,
    load_device,
    load_fleet,
    one_line_validation_error,
)
from profiles.runtime import DEFAULT_RUNTIME, RuntimeProfile, catalogue_runtimes, load_runtime
from profiles.units import (
    format_bytes,
    format_flops,
    parse_bytes,
    parse_flops,
    parse_flops_rate,
    parse_rate_bits,
    parse_seconds,
)

__all__ = [
    "DEFAULT_RUNTIME",
    "MAX_FLEET_DEVICES",
    "RuntimeProfile",
    "catalogue_runtimes",
    "load_runtime",
    "DeviceClass",
    "DeviceSpec",
    "FleetSpec",
    "catalogue_devices",
    "catalogue_fleets",
    "format_bytes",
    "format_flops",
    "load_device",
    "load_fleet",
    "one_line_validation_error",
    "parse_bytes",
    "parse_flops",
    "parse_flops_rate",
    "parse_rate_bits",
    "parse_seconds",
    "read_json",
    "read_json_object",
]
