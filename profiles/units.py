"""Strict parsing of human-written quantities (bytes, FLOPs, rates, durations) into plain numbers.

SI prefixes (k, M, G, T, P) are powers of 1000; IEC prefixes (Ki, Mi, Gi, Ti) are powers of 1024.
Every parser accepts a non-negative int/float or a string "<number><unit>" (space optional) and
raises ValueError with a one-line message naming the bad text and the accepted units otherwise.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

_SI_PREFIXES = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_IEC_PREFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_ALL_PREFIXES = {"": 1, **_SI_PREFIXES, **_IEC_PREFIXES}
_DECIMAL_PREFIXES = {"": 1, **_SI_PREFIXES}

_NUMBER_AND_UNIT = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(.*?)\s*")

_BYTE_UNITS: dict[str, Decimal] = {
    spelling: Decimal(multiplier)
    for prefix, multiplier in _ALL_PREFIXES.items()
    for spelling in (prefix, prefix + "B")
}
_BYTES_ACCEPTED = "B, kB, MB, GB, TB, PB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024); the B is optional"

_FLOP_UNITS: dict[str, Decimal] = {"": Decimal(1)} | {
    prefix + suffix: Decimal(multiplier)
    for prefix, multiplier in _DECIMAL_PREFIXES.items()
    for suffix in ("FLOP", "FLOPs", "flop", "flops")
}
_FLOP_ACCEPTED = "FLOP, kFLOP, MFLOP, GFLOP, TFLOP, PFLOP (also written FLOPs)"

_FLOP_RATE_UNITS: dict[str, Decimal] = {"": Decimal(1)} | {
    prefix + suffix: Decimal(multiplier)
    for prefix, multiplier in _DECIMAL_PREFIXES.items()
    for suffix in ("FLOP/s", "FLOPs/s", "FLOPS", "flop/s", "flops/s")
}
_FLOP_RATE_ACCEPTED = "FLOP/s, kFLOP/s, MFLOP/s, GFLOP/s, TFLOP/s, PFLOP/s (also written FLOPS)"

_BYTE_RATE_UNITS: dict[str, Decimal] = {"": Decimal(1)} | {
    prefix + suffix: Decimal(multiplier) / per_byte
    for prefix, multiplier in _ALL_PREFIXES.items()
    for suffix, per_byte in (("B/s", 1), ("bit/s", 8), ("bits/s", 8), ("b/s", 8), ("bps", 8))
}
_BYTE_RATE_ACCEPTED = (
    "bit/s, kbit/s, Mbit/s, Gbit/s (also bps, kbps, Mbps, Gbps), B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s; "
    "a plain number is bytes/s"
)

_SECOND_UNITS: dict[str, Decimal] = {"": Decimal(1), "ms": Decimal("0.001")} | {
    spelling: Decimal(seconds)
    for seconds, spellings in (
        (1, ("s", "sec", "secs", "second", "seconds")),
        (60, ("min", "mins", "minute", "minutes")),
        (3600, ("h", "hr", "hrs", "hour", "hours")),
    )
    for spelling in spellings
}
_SECONDS_ACCEPTED = "ms, s, min, h (also sec, minutes, hours); a plain number is seconds"


def _parse(value: object, quantity: str, units: dict[str, Decimal], accepted: str) -> Decimal:
    """Parse value into a finite, non-negative Decimal in the base unit of `units`."""

    def reject(reason: str) -> ValueError:
        return ValueError(f"invalid {quantity} {value!r}: {reason}; accepted units: {accepted}")

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise reject(f"expected a number or a string, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise reject("NaN and infinity are not allowed")
    if isinstance(value, (int, float)):
        number, multiplier = Decimal(value), Decimal(1)
    else:
        match = _NUMBER_AND_UNIT.fullmatch(value)
        if match is None:
            raise reject("expected a number followed by an optional unit")
        number_text, unit = match.groups()
        if unit not in units:
            raise reject(f"unknown unit {unit!r}")
        number, multiplier = Decimal(number_text), units[unit]
    if number < 0:
        raise reject("must not be negative")
    result = number * multiplier
    if not math.isfinite(float(result)):
        raise reject("too large")
    return result


def parse_bytes(value: object) -> int:
    """Bytes, e.g. "512MiB", "8 MB", "1.5GB", "2048"; fractional results round to the nearest byte."""
    return round(_parse(value, "byte size", _BYTE_UNITS, _BYTES_ACCEPTED))


def parse_flops(value: object) -> float:
    """FLOP count, e.g. "1.5GFLOP", "2 TFLOP", "300MFLOPs", 1e9."""
    return float(_parse(value, "FLOP count", _FLOP_UNITS, _FLOP_ACCEPTED))


def parse_flops_rate(value: object) -> float:
    """FLOP/s, e.g. "10 GFLOP/s", "1.2TFLOPS", 5e9."""
    return float(_parse(value, "FLOP rate", _FLOP_RATE_UNITS, _FLOP_RATE_ACCEPTED))


def parse_rate_bits(value: object) -> float:
    """Bandwidth in bytes/s, e.g. "2Mbit/s" (250000.0), "500 kbit/s", "1 MB/s", "10Mbps"."""
    return float(_parse(value, "bandwidth", _BYTE_RATE_UNITS, _BYTE_RATE_ACCEPTED))


def parse_seconds(value: object) -> float:
    """Duration in seconds, e.g. "30s", "2 min", "1h", 90."""
    return float(_parse(value, "duration", _SECOND_UNITS, _SECONDS_ACCEPTED))


def format_bytes(n: float) -> str:
    """Bytes for people, in IEC units: 536870912 -> "512.0 MiB", 100 -> "100 B"."""
    if n < 1024:
        return f"{n:.0f} B"
    for prefix in ("Ki", "Mi", "Gi"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {prefix}B"
    return f"{n / 1024:.1f} TiB"


def format_flops(x: float) -> str:
    """FLOPs for people, in SI units: 1.5e9 -> "1.50 GFLOP"."""
    for prefix in ("", "k", "M", "G", "T"):
        if x < 1000:
            return f"{x:.2f} {prefix}FLOP"
        x /= 1000
    return f"{x:.2f} PFLOP"
