"""The whole training process's memory: runtime profiles, one copy of the weights, process prediction,
and `caff validate` measuring the process (fresh subprocesses, peak RSS from the kernel)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from caff.cli import main
from costmodel import ZOO, ModelSpec, TrainMode, build_model, estimate, make_batch
from costmodel.process import kept_bytes, predict_process
from planner import PlanSettings, plan, write_plan_file
from profiles import DEFAULT_RUNTIME, DeviceSpec, catalogue_devices, load_runtime
from tests.conftest import TENSORS_ONLY
from trainer.local import local_train

# a model whose one copy (~100 MB of parameters) stands far above RSS noise; it trains only its head
BIG = ModelSpec(name="big", kind="gpt", n_blocks=2, d_model=1024, n_heads=8, d_ff=4096, max_seq_len=16, vocab_size=256)

ONE_COPY = """
import itertools, json, sys
from costmodel import ModelSpec, TrainMode, build_model, make_batch, ZOO
from trainer.local import local_train
from trainer.probe import peak_rss_bytes
def train(spec):
    received = build_model(spec).state_dict()
    local_train(received, spec, TrainMode(), itertools.repeat(make_batch(spec, 1, 8)), 2, "sgd", measure=False)
train(ZOO["char-gpt-xs"])  # pays the first step's fixed costs (lazy libraries, thread pools)
spec = ModelSpec.model_validate_json(sys.argv[1])
before = peak_rss_bytes()
received = build_model(spec).state_dict()
received_peak = peak_rss_bytes()
local_train(received, spec, TrainMode(), itertools.repeat(make_batch(spec, 1, 8)), 2, "sgd", measure=False)
print(json.dumps({"before": before, "received": received_peak, "trained": peak_rss_bytes()}))
"""


def test_a_training_client_holds_the_received_weights_once():
    done = subprocess.run([sys.executable, "-c", ONE_COPY, BIG.model_dump_json()], capture_output=True, text=True,
                          check=True)
    seen = json.loads(done.stdout.splitlines()[-1])
    weights = estimate(BIG, TrainMode(), 1, 8).totals["param_bytes"]
    assert weights > 90e6
    assert seen["received"] - seen["before"] == pytest.approx(weights, rel=0.1)
    # training adds its head's copy and a batch-1 step, not a second copy of the weights
    assert seen["trained"] - seen["received"] < weights / 4


def test_only_trained_tensors_get_their_own_copy():
    spec = ZOO["char-gpt-xs"]
    received = build_model(spec).state_dict()
    before = {name: tensor.clone() for name, tensor in received.items()}
    mode = TrainMode.parse("last:1", spec.n_blocks)
    result = local_train(received, spec, mode, iter([make_batch(spec, 2, 16)] * 2), 2, "sgd", lr=0.5, measure=False)
    assert all(torch.equal(received[name], before[name]) for name in received)  # the old values stay
    trained = set(result.update)
    assert {name for name in received if name.startswith("blocks.3.")} <= trained
    assert not any(name.startswith("blocks.0.") for name in trained)
    copied = sum(t.numel() * t.element_size() for name, t in received.items() if name in trained)
    assert copied == kept_bytes(spec, mode, estimate(spec, mode, 2, 16))


def test_a_device_names_its_runtime_and_gets_the_shipped_one_by_default(tmp_path):
    fields = dict(name="board", memory_bytes="512 MiB", compute_flops="1 TFLOP", upload_bytes="10 MB")
    assert DeviceSpec(**fields).runtime == DEFAULT_RUNTIME
    assert DeviceSpec(**fields, runtime=TENSORS_ONLY).runtime == TENSORS_ONLY
    with pytest.raises(ValueError, match="unknown runtime 'jvm'"):
        DeviceSpec(**fields, runtime="jvm")
    shipped = load_runtime(DEFAULT_RUNTIME)
    assert shipped.source.torch and shipped.source.repetitions >= 3 and 100 * 2**20 < shipped.footprint_bytes
    assert all(load_runtime(device.runtime) for device in catalogue_devices().values())
    assert not any(name.startswith("esp32") for name in catalogue_devices())  # no PyTorch runtime fits 6 MiB


def test_infeasible_memory_names_the_least_budget_with_the_runtime():
    spec = ZOO["char-gpt-xs"]
    device = DeviceSpec(name="small", memory_bytes="200 MiB", compute_flops=1e15, upload_bytes=10**9, batch_size=4)
    entry = plan([spec], [device], PlanSettings(seq=80)).devices[0]
    assert (entry.status, entry.binding) == ("infeasible", ["memory"])
    head = predict_process(spec, TrainMode(), 4, 80, "sgd", load_runtime(DEFAULT_RUNTIME))
    assert entry.process.total_bytes == head.total_bytes > load_runtime(DEFAULT_RUNTIME).footprint_bytes
    # the planner bounds the kept tensors by the upload's wire bytes (640 bytes of framing per array), and
    # charges the allocator's slack on the whole tensor peak (`planner.budget`), weights too: a bound
    weights = estimate(spec, TrainMode(), 4, 80).totals["param_bytes"]
    slack_on_weights = load_runtime(DEFAULT_RUNTIME).allocator_overhead * weights
    assert head.total_bytes / 0.95 <= entry.needs.memory_bytes <= (head.total_bytes + slack_on_weights + 10_000) / 0.95
    enough = device.model_copy(update={"memory_bytes": int(entry.needs.memory_bytes) + 1})
    assert plan([spec], [enough], PlanSettings(seq=80)).devices[0].status == "optimal"


def test_the_lora_library_counts_only_for_plans_that_use_lora():
    spec, runtime = ZOO["char-gpt-xs"], load_runtime(DEFAULT_RUNTIME)
    everything = predict_process(spec, TrainMode.parse("last:4", spec.n_blocks), 4, 80, "sgd", runtime)
    assert runtime.lora_bytes > 0
    # memory for full fine-tuning without the LoRA library, not for the library itself
    device = DeviceSpec(name="tight", memory_bytes=int(everything.total_bytes / 0.95) + 2**20, compute_flops=1e15,
                        upload_bytes=10**9, batch_size=4)
    entry = plan([spec], [device], PlanSettings(seq=80, lora_ranks=(2, 4, 8))).devices[0]
    assert (entry.status, entry.mode, entry.process.runtime_bytes) == ("optimal", "blocks:0,1,2,3",
                                                                      runtime.footprint_bytes)
    # where only LoRA fits the upload, the plan uses it and its process counts the library
    thin = device.model_copy(update={"memory_bytes": 2**30, "upload_bytes": 60_000})
    entry = plan([spec], [thin], PlanSettings(seq=80, lora_ranks=(2, 4, 8))).devices[0]
    mode = TrainMode.parse(entry.mode, spec.n_blocks)
    assert mode.lora and entry.process.runtime_bytes == runtime.footprint_bytes + runtime.lora_bytes
    assert entry.process.total_bytes == predict_process(spec, mode, 4, 80, "sgd", runtime).total_bytes


def test_baselines_count_the_whole_process_as_caff_does():
    from profiles import load_fleet
    from trainer.methods import device_mode

    spec, runtime = ZOO["char-gpt-xs"], load_runtime(DEFAULT_RUNTIME)
    planned = plan([spec], load_fleet("edge-mix").expand(40, seed=0), PlanSettings(seq=80, batch=16,
                                                                                   lora_ranks=(2, 4, 8, 16)))
    seen = set()
    for device in planned.devices:
        for method in ("full", "lora"):
            mode = device_mode(method, spec, device, planned)
            candidate = mode or TrainMode.parse("all" if method == "full" else "lora:2", spec.n_blocks)
            process = predict_process(spec, candidate, 16, 80, "sgd", runtime).total_bytes
            assert (mode is not None) == (process <= device.budgets.usable_memory_bytes), (device.device, method)
            seen.add((device.device.split("#")[0], method, mode is not None))
    # the Pi Zeros' 384 MiB hold the runtime and a suffix (caff), not full fine-tuning nor the LoRA library
    assert {("rpi-zero-2w", "full", False), ("rpi-zero-2w", "lora", False), ("rpi4-2gb", "full", True),
            ("rpi4-2gb", "lora", True)} <= seen


def test_plan_and_cost_show_each_term(capsys):
    assert main(["cost", "char-gpt-s", "--train", "last:2", "--batch", "4", "--shard-bytes", "2MiB", "--json"]) == 0
    process = json.loads(capsys.readouterr().out)["process"]
    assert process["shard_bytes"] == 2 * 2**20 and process["runtime"] == DEFAULT_RUNTIME
    assert process["total_bytes"] == sum(process[k] for k in ("runtime_bytes", "tensor_peak_bytes",
                                                              "allocator_bytes", "shard_bytes", "kept_bytes"))
    assert main(["cost", "char-gpt-s", "--shard-bytes", "lots"]) == 2
    assert "--shard-bytes" in capsys.readouterr().err


def test_validate_exits_1_when_the_tensors_fit_but_the_process_does_not(tmp_path, capsys):
    """A device budgeted for tensors alone (runtime fixture without footprint): the plan is optimal,
    its measured tensor peak fits, the measured process (a fresh one, the runtime and all) does not."""
    spec = ZOO["char-gpt-xs"]
    full = estimate(spec, TrainMode.parse("all", spec.n_blocks), 2, 32).peak_bytes
    device = DeviceSpec(name="tensors", memory_bytes=2 * full, compute_flops=1e15, upload_bytes=10**9, batch_size=2,
                        runtime=TENSORS_ONLY)
    path = tmp_path / "plan.json"
    write_plan_file(path, plan([spec], [device], PlanSettings(seq=32)))
    assert main(["validate", str(path), "--device", "cpu", "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)
    assert row["peak_measured"] <= row["peak_predicted"] * 1.05 <= row["memory_budget"] < row["process_measured"]
    assert not row["within_budget"]
    assert row["process_measured"] > load_runtime(DEFAULT_RUNTIME).footprint_bytes * 0.8


def test_int8_frozen_weights_lower_the_measured_process_by_the_predicted_amount():
    """minilm-l6, whose frozen weights dominate at short sequences (head only, batch 8 x 64), each plan in
    a fresh process that receives what the server sends (`trainer.probe`): with int8 frozen weights the
    measured process peak falls by about the predicted 30 MiB (the device holds each frozen weight once,
    compact: no fp32 copy; it rose by 15 MiB when devices received fp32), and each process prediction is
    within 10% of its measured peak. Fresh processes of one plan differ by a few MiB here (measured
    falls of 22 to 33 MiB from one process each), so each plan's peak is the lower of two fresh processes
    and the fall is held within 25%; `bench/compact_process.py` takes medians."""
    from trainer.probe import run_probe

    spec, runtime = ZOO["minilm-l6"], load_runtime(DEFAULT_RUNTIME)
    rows = []
    for text in ("head", "head+frozen:int8"):
        mode = TrainMode.parse(text, spec.n_blocks)
        predicted = predict_process(spec, mode, 8, 64, "sgd", runtime)
        peaks = []
        for _ in range(2):
            seen = run_probe({"spec": spec.model_dump_json(), "mode": text, "batch": 8, "seq": 64,
                              "optimizer": "sgd", "steps": 2})
            assert seen["tensor_peak_bytes"] == predicted.tensor_peak_bytes
            assert abs(predicted.total_bytes / seen["process_peak_bytes"] - 1) <= 0.10, (text, predicted, seen)
            peaks.append(seen["process_peak_bytes"])
        rows.append((predicted.total_bytes, min(peaks)))
    (fp32, fp32_seen), (int8, int8_seen) = rows
    assert fp32 - int8 > 25 * 2**20
    assert abs((fp32_seen - int8_seen) / (fp32 - int8) - 1) <= 0.25, (rows, fp32 - int8, fp32_seen - int8_seen)
