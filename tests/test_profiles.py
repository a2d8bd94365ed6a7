"""Tests for profiles: unit parsing, device and fleet validation, the shipped catalogue, fleet expansion."""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from profiles import (
    DeviceClass,
    DeviceSpec,
    FleetSpec,
    catalogue_devices,
    catalogue_fleets,
    format_bytes,
    format_flops,
    load_device,
    load_fleet,
    one_line_validation_error,
    parse_bytes,
    parse_flops,
    parse_flops_rate,
    parse_rate_bits,
    parse_seconds,
)

KNOWN_DEVICES = {
    "rpi-zero-2w",
    "rpi4-2gb",
    "rpi5-4gb",
    "jetson-nano-4gb",
    "android-low",
    "android-mid",
    "android-high",
    "iphone-se",
}


def small_device(name: str = "board", **overrides) -> dict:
    """Fields of a valid device, as a user would write them."""
    return {"name": name, "memory_bytes": "64 MiB", "compute_flops": "10 GFLOP", "upload_bytes": "1 MB"} | overrides


# --- units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("8 MB", 8_000_000),
        ("1.5GB", 1_500_000_000),
        ("2048", 2048),
        ("4KiB", 4096),
        ("4Ki", 4096),
        ("3 GiB", 3 * 2**30),
        ("  7 B ", 7),
        ("1e3 kB", 1_000_000),
        (2048, 2048),
        (1.5e3, 1500),
        (0, 0),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (parse_flops, "1.5GFLOP", 1.5e9),
        (parse_flops, "2 TFLOP", 2e12),
        (parse_flops, "300MFLOPs", 3e8),
        (parse_flops, "12", 12.0),
        (parse_flops, 4.5e6, 4.5e6),
        (parse_flops_rate, "10 GFLOP/s", 1e10),
        (parse_flops_rate, "1.2TFLOPS", 1.2e12),
        (parse_flops_rate, "100 MFLOP/s", 1e8),
        (parse_rate_bits, "2Mbit/s", 250_000.0),
        (parse_rate_bits, "500 kbit/s", 62_500.0),
        (parse_rate_bits, "1 MB/s", 1_000_000.0),
        (parse_rate_bits, "10Mbps", 1_250_000.0),
        (parse_rate_bits, "1 MiB/s", float(2**20)),
        (parse_rate_bits, "300", 300.0),
        (parse_seconds, "30s", 30.0),
        (parse_seconds, "2 min", 120.0),
        (parse_seconds, "1h", 3600.0),
        (parse_seconds, "250 ms", 0.25),
        (parse_seconds, 90, 90.0),
    ],
)
def test_parse_quantities(parse, text, expected):
    assert parse(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("parse", "bad", "accepted_unit"),
    [
        (parse_bytes, "12 parsecs", "MiB"),
        (parse_bytes, "-5MB", "MiB"),
        (parse_bytes, "", "MiB"),
        (parse_bytes, "   ", "MiB"),
        (parse_bytes, "nan", "MiB"),
        (parse_bytes, "inf GB", "MiB"),
        (parse_bytes, float("nan"), "MiB"),
        (parse_bytes, float("inf"), "MiB"),
        (parse_bytes, -1, "MiB"),
        (parse_bytes, True, "MiB"),
        (parse_bytes, None, "MiB"),
        (parse_bytes, "5 Mbit", "MiB"),
        (parse_bytes, "1e400", "MiB"),
        (parse_flops, "1.5 GFLOP/s", "GFLOP"),
        (parse_flops, "3 GB", "GFLOP"),
        (parse_flops_rate, "2 TFLOP", "GFLOP/s"),
        (parse_rate_bits, "2 Mbit", "Mbit/s"),
        (parse_rate_bits, "-1 kB/s", "Mbit/s"),
        (parse_seconds, "3 fortnights", "min"),
        (parse_seconds, float("-inf"), "min"),
    ],
)
def test_parsers_reject_bad_input_on_one_line(parse, bad, accepted_unit):
    with pytest.raises(ValueError) as caught:
        parse(bad)
    message = str(caught.value)
    assert "\n" not in message
    assert repr(bad) in message
    assert accepted_unit in message


def test_format_bytes_and_flops():
    assert format_bytes(512 * 2**20) == "512.0 MiB"
    assert format_bytes(100) == "100 B"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(5 * 2**40) == "5.0 TiB"
    assert format_flops(1.5e9) == "1.50 GFLOP"
    assert format_flops(2.4e12) == "2.40 TFLOP"
    assert format_flops(12) == "12.00 FLOP"
    assert format_flops(3e15) == "3.00 PFLOP"


@given(st.integers(min_value=0, max_value=2**50))
def test_formatted_bytes_parse_back_within_rounding(n):
    assert parse_bytes(format_bytes(n)) == pytest.approx(n, rel=0.05, abs=1)


@given(st.floats(min_value=0, max_value=1e17, allow_nan=False))
def test_formatted_flops_parse_back_within_rounding(x):
    assert parse_flops(format_flops(x)) == pytest.approx(x, rel=0.01, abs=0.01)


# --- DeviceSpec -------------------------------------------------------------------------------------


def test_device_accepts_human_units():
    device = DeviceSpec(**small_device())
    assert device.memory_bytes == 64 * 2**20
    assert device.compute_flops == 1e10
    assert device.upload_bytes == 1_000_000
    assert (device.local_steps, device.batch_size) == (1, 16)


def test_device_budgets_from_rates_and_round_length():
    device = DeviceSpec(
        name="phone",
        memory_bytes="256MiB",
        flops_per_second="3 GFLOP/s",
        seconds_per_round="2 min",
        upload_bandwidth="2Mbit/s",
    )
    assert device.compute_flops == pytest.approx(3e9 * 120)
    assert device.upload_bytes == 250_000 * 120
    assert isinstance(device.upload_bytes, int)


def test_device_round_trips_through_json():
    fields = small_device(flops_per_second="1 GFLOP/s", seconds_per_round=10)
    del fields["compute_flops"]
    device = DeviceSpec(**fields)
    assert DeviceSpec.model_validate_json(device.model_dump_json()) == device


def test_device_budget_given_both_ways_must_agree():
    agreeing = small_device(compute_flops="60 GFLOP", flops_per_second="1 GFLOP/s", seconds_per_round="1 min")
    assert DeviceSpec(**agreeing).compute_flops == 6e10
    disagreeing = agreeing | {"compute_flops": "61 GFLOP"}
    with pytest.raises(ValidationError, match="compute_flops.*disagrees"):
        DeviceSpec(**disagreeing)


def field_error(fields: dict) -> str:
    """The one-line error for DeviceSpec(**fields)."""
    with pytest.raises(ValidationError) as caught:
        DeviceSpec(**fields)
    return one_line_validation_error(caught.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"memory_bytes": "-5MB"}, "memory_bytes"),
        ({"memory_bytes": float("nan")}, "memory_bytes"),
        ({"memory_bytes": 0}, "memory_bytes"),
        ({"compute_flops": float("inf")}, "compute_flops"),
        ({"compute_flops": "-1 GFLOP"}, "compute_flops"),
        ({"compute_flops": None}, "compute_flops"),
        ({"upload_bytes": "12 furlongs"}, "upload_bytes"),
        ({"upload_bytes": None}, "upload_bytes"),
        ({"flops_per_second": "fast", "seconds_per_round": 60}, "flops_per_second"),
        ({"flops_per_second": "1 GFLOP/s"}, "seconds_per_round"),
        ({"seconds_per_round": "-3 s"}, "seconds_per_round"),
        ({"local_steps": 0}, "local_steps"),
        ({"batch_size": -4}, "batch_size"),
        ({"name": "  "}, "name"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_device_errors_name_the_field(overrides, named):
    message = field_error(small_device(**overrides))
    assert named in message
    assert "\n" not in message


@pytest.mark.parametrize("missing", ["memory_bytes", "compute_flops", "upload_bytes"])
def test_device_needs_every_budget(missing):
    fields = small_device()
    del fields[missing]
    assert missing in field_error(fields)


# --- catalogue --------------------------------------------------------------------------------------


def test_catalogue_devices_load_and_validate():
    devices = catalogue_devices()
    assert set(devices) >= KNOWN_DEVICES
    for name, device in devices.items():
        assert device.name == name
        assert load_device(name) == device
        assert len(device.description) > 200, f"{name} should explain where its figures come from"
        assert all(math.isfinite(v) and v > 0 for v in (device.memory_bytes, device.compute_flops, device.upload_bytes))


def test_catalogue_budgets_span_an_order_of_magnitude():
    devices = catalogue_devices().values()
    # every device runs PyTorch (hundreds of MiB of runtime): no microcontrollers at the low end
    for budget, min_ratio in (("memory_bytes", 10), ("compute_flops", 20), ("upload_bytes", 10)):
        values = [getattr(d, budget) for d in devices]
        assert max(values) / min(values) >= min_ratio, budget


def test_catalogue_fleets_load_and_validate():
    fleets = catalogue_fleets()
    assert {"homogeneous-rpi4", "heterogeneous-mix", "iot-edge"} <= set(fleets)
    for name, fleet in fleets.items():
        assert fleet.name == name
        assert load_fleet(name) == fleet
        assert fleet.description
        devices = fleet.expand(n=20) if fleet.uses_shares else fleet.expand()
        assert devices and all(isinstance(d, DeviceSpec) for d in devices)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError) as caught:
        load_device("rpi9000")
    message = str(caught.value)
    assert message.startswith("unknown device 'rpi9000'; known: ")
    assert all(name in message for name in KNOWN_DEVICES)
    with pytest.raises(ValueError, match="unknown fleet 'armada'; known: .*homogeneous-rpi4"):
        load_fleet("armada")


def test_fleet_class_with_unknown_device_names_its_location():
    with pytest.raises(ValidationError) as caught:
        FleetSpec(name="f", classes=[{"device": "rpi4-2gb", "count": 1}, {"device": "toaster", "count": 2}])
    message = one_line_validation_error(caught.value)
    assert message.startswith("classes[1].device: unknown device 'toaster'; known: ")


# --- files ------------------------------------------------------------------------------------------


def test_load_device_and_fleet_from_json_files(tmp_path):
    device_file = tmp_path / "sensor.json"
    device_file.write_text(json.dumps(small_device("sensor")))
    assert load_device(device_file).name == "sensor"
    assert load_device(str(device_file)).memory_bytes == 64 * 2**20

    fleet_file = tmp_path / "fleet.json"
    fleet = {
        "name": "lab",
        "classes": [{"device": small_device("sensor"), "count": 2}, {"device": "rpi5-4gb", "count": 1}],
    }
    fleet_file.write_text(json.dumps(fleet))
    assert [d.name for d in load_fleet(fleet_file).expand()] == ["sensor#1", "sensor#2", "rpi5-4gb#1"]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('{"name": "x", "memory_bytes": "1 MiB", "compute_flops": "1 GFLOP", "upload_bytes": "1 kB", "ram": 3}', "ram"),
        ('{"name": "x", "memory_bytes": "-1 MiB", "compute_flops": "1 GFLOP", "upload_bytes": "1 kB"}', "memory_bytes"),
        ('{"name": "x", "memory_bytes": "1 MiB", "compute_flops": "1 GFLOP"', "JSON"),
    ],
)
def test_malformed_device_file_names_file_and_field(tmp_path, content, named):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        load_device(path)
    message = str(caught.value)
    assert str(path) in message and named in message
    assert "\n" not in message


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_fleet(tmp_path / "absent.json")


# --- fleets -----------------------------------------------------------------------------------------


def test_expand_by_count_repeats_and_numbers_devices():
    devices = load_fleet("homogeneous-rpi4").expand()
    assert len(devices) == 100
    assert devices[2].name == "rpi4-2gb#3"
    assert len({d.name for d in devices}) == 100
    assert {d.memory_bytes for d in devices} == {load_device("rpi4-2gb").memory_bytes}
    assert len(load_fleet("iot-edge").expand(n=50)) == 50
    with pytest.raises(ValueError, match="100 devices"):
        load_fleet("homogeneous-rpi4").expand(n=7)


def test_expand_by_share_is_seeded():
    fleet = load_fleet("heterogeneous-mix")
    first = [d.name for d in fleet.expand(n=200, seed=3)]
    assert first == [d.name for d in fleet.expand(n=200, seed=3)]
    assert first != [d.name for d in fleet.expand(n=200, seed=4)]
    assert len(set(first)) == 200


def test_expand_by_share_respects_shares():
    fleet = load_fleet("heterogeneous-mix")
    n = 10_000
    drawn = Counter(d.name.split("#")[0] for d in fleet.expand(n=n, seed=0))
    for device_class in fleet.classes:
        observed = drawn[device_class.device.name] / n
        # 4 standard deviations of a binomial proportion: fails by chance about once in 15000 runs.
        tolerance = 4 * math.sqrt(device_class.share * (1 - device_class.share) / n)
        assert observed == pytest.approx(device_class.share, abs=tolerance), device_class.device.name


def test_expand_by_share_needs_n():
    with pytest.raises(ValueError, match="pass n"):
        load_fleet("heterogeneous-mix").expand()


def test_explicit_device_list_fleet():
    fleet = FleetSpec(name="pair", devices=[small_device("a"), small_device("b", memory_bytes="1 GiB")])
    devices = fleet.expand()
    assert [d.name for d in devices] == ["a", "b"]
    assert devices[1].memory_bytes == 2**30
    assert fleet.expand(n=2) == devices


@pytest.mark.parametrize(
    ("fleet", "fragment"),
    [
        ({"name": "f"}, "exactly one of classes or devices"),
        ({"name": "f", "devices": []}, "devices"),
        ({"name": "f", "classes": []}, "classes"),
        ({"name": "f", "devices": [small_device("a"), small_device("a")]}, "repeated device names a"),
        ({"name": "f", "classes": [{"device": "rpi4-2gb", "count": 2, "share": 0.5}]}, "exactly one of count or share"),
        ({"name": "f", "classes": [{"device": "rpi4-2gb"}]}, "exactly one of count or share"),
        (
            {"name": "f", "classes": [{"device": "rpi4-2gb", "count": 2}, {"device": "rpi5-4gb", "share": 1.0}]},
            "not a mix",
        ),
        (
            {"name": "f", "classes": [{"device": "rpi4-2gb", "share": 0.5}, {"device": "rpi5-4gb", "share": 0.4}]},
            "sum to 0.9",
        ),
        ({"name": "f", "classes": [{"device": "rpi4-2gb", "share": 1.5}]}, "share"),
        ({"name": "f", "classes": [{"device": "rpi4-2gb", "count": 0}]}, "count"),
        ({"name": "f", "devices": [small_device("a")], "owner": "me"}, "owner"),
    ],
)
def test_invalid_fleets_are_rejected(fleet, fragment):
    with pytest.raises(ValidationError) as caught:
        FleetSpec(**fleet)
    assert fragment in one_line_validation_error(caught.value)


def test_device_class_accepts_a_spec_or_a_catalogue_name():
    by_name = DeviceClass(device="android-low", share=0.5)
    by_spec = DeviceClass(device=load_device("android-low"), share=0.5)
    assert by_name == by_spec


def test_one_line_validation_error_counts_further_errors():
    with pytest.raises(ValidationError) as caught:
        DeviceSpec(**small_device(memory_bytes="-1", batch_size=0, local_steps=0))
    message = one_line_validation_error(caught.value)
    assert message.startswith("memory_bytes: ")
    assert message.endswith("(and 2 more errors)")


def test_profiles_imports_no_other_project_package():
    code = (
        "import sys, profiles; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'costmodel', 'planner', 'trainer', 'caff'}))"
    )
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
