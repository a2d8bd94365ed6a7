"""Local training, aggregation and the engine against independent references."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from costmodel import ZOO, TrainMode, apply_mode, build_model, estimate
from costmodel.wire import wire_bytes
from trainer.engine import TrainConfig, run
from trainer.local import local_train
from trainer.methods import METHODS
from trainer.server import aggregate, collect, lora_deltas

SPEC = ZOO["char-gpt-xs"]
TIMING = {"seconds", "client_seconds", "total_seconds", "eval_seconds"}


def _batches(batch=2, seq=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, SPEC.vocab_size, (batch, seq + 1), generator=generator)
        yield ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def test_layerwise_weighted_average_matches_a_hand_computed_reference():
    """Replies carry new values and LoRA factors (with their scale); the server averages changes."""
    state = {"a": torch.zeros(2), "b": torch.ones(2), "c": torch.full((2,), 5.0), "w.weight": torch.ones(3, 2)}
    down, up = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [-1.0]])  # rank 1: A (1, 2), B (3, 1)
    lora = {"w.lora_A.default.weight": down, "w.lora_B.default.weight": up}
    updates = [("d1", {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 3.0])}, None, 1),
               ("d2", {"a": torch.tensor([4.0, 8.0]), **lora}, 2.0, 3),
               ("bad-shape", {"a": torch.zeros(3)}, None, 100),
               ("bad-nan", {"b": torch.tensor([float("nan"), 0.0])}, None, 100),
               ("bad-key", {"z": torch.zeros(2)}, None, 100),
               ("bad-unpaired", {"w.lora_A.default.weight": down}, 2.0, 100),
               ("bad-rank", {"w.lora_A.default.weight": down, "w.lora_B.default.weight": torch.ones(3, 2)}, 2.0, 100),
               ("bad-no-scale", lora, None, 100)]
    contributions, rejected = collect(updates, state)
    new = aggregate(state, contributions)
    assert torch.equal(new["a"], torch.tensor([(1 * 1 + 4 * 3) / 4, (2 * 1 + 8 * 3) / 4]))
    assert torch.equal(new["b"], torch.tensor([3.0, 3.0]))  # only d1 trained b
    assert torch.equal(new["c"], state["c"])  # nobody trained c
    assert torch.equal(new["w.weight"], 1 + 2.0 * torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, -2.0]]))
    assert [r.split(":")[0] for r in rejected] == ["bad-shape", "bad-nan", "bad-key", "bad-unpaired", "bad-rank",
                                                    "bad-no-scale"]


def test_local_training_uploads_only_what_it_trained_and_measures_what_was_predicted():
    state = build_model(SPEC).state_dict()
    mode = TrainMode.parse("blocks:2+lora:3=4", SPEC.n_blocks)
    result = local_train(state, SPEC, mode, _batches(), steps=3, lr=0.05)
    assert {k.split(".")[1] for k in result.update if k.startswith("blocks.")} == {"2", "3"}
    assert not any(k.startswith(("embed", "blocks.0", "blocks.1")) for k in result.update)
    assert not any("blocks.3" in k and "lora_" not in k for k in result.update)  # LoRA block: factors only
    predicted = estimate(SPEC, mode, 2, 16)
    assert result.flops == 3 * (predicted.totals["fwd_flops"] + predicted.totals["bwd_flops"])
    raw = sum(t.numel() * t.element_size() for t in result.update.values())
    assert raw < wire_bytes(result.update) <= predicted.totals["upload_bytes"]
    assert abs(result.peak_bytes / predicted.peak_bytes - 1) < 0.05


@pytest.mark.parametrize("scale", [2.0, 8.0])
def test_lora_deltas_equal_peft_merged_weights_minus_base(scale):
    """With alpha = scale x rank, peft's merged weight minus the base is scale x B A, the factors as trained."""
    state = build_model(SPEC).state_dict()
    mode = TrainMode.parse("lora:4", SPEC.n_blocks)
    result = local_train(state, SPEC, mode, _batches(), steps=2, lr=0.5, lora_scale=scale)
    assert set(result.lora_scales.values()) == {scale}
    deltas = lora_deltas(result.update, scale, state)
    model = apply_mode(build_model(SPEC), mode, lora_scale=scale)
    model.load_state_dict({**state, **{k: v for k, v in result.update.items()}}, strict=False)
    own = dict(model.named_parameters())
    for name, param in own.items():  # load the trained factors under peft's names
        if "lora_" in name:
            param.data.copy_(result.update[name])
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    weight = "blocks.1.attn.q.weight"
    assert torch.allclose(merged[weight] - state[weight], deltas[weight], atol=1e-6)
    by_hand = scale * result.update["blocks.1.attn.q.lora_B.default.weight"] @ result.update[
        "blocks.1.attn.q.lora_A.default.weight"]
    assert torch.allclose(deltas[weight], by_hand, atol=1e-6) and deltas[weight].abs().sum() > 0


@pytest.mark.parametrize("method", [m for m in METHODS if m != "smallest"])
def test_every_client_of_every_method_stays_within_its_memory_budget(tmp_path, three_device_plan, method):
    from planner.planfile import read_plan_file

    config = TrainConfig(task="shakespeare", method=method, rounds=1, clients_per_round=3, pretrained=False,
                         eval_samples=16, lora_scale=4.0)
    metrics = run(config, read_plan_file(three_device_plan), tmp_path / "run")
    trained = [c for c in metrics[0]["clients"] if c["status"] == "trained"]
    assert trained or method == "full"
    for client in trained:
        assert client.get("lora_scale") == (4.0 if "lora" in client["mode"] else None), client
        assert client["peak_bytes"] <= client["memory_budget_bytes"], client
        assert client["flops"] == client["predicted_flops"], client
        assert client["upload_bytes"] <= client["predicted_upload_bytes"], client  # wire bytes against the plan


def _strip(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} | {"clients": [
        {k: v for k, v in c.items() if k not in TIMING} for c in m["clients"]]} for m in metrics]


def test_a_killed_run_resumes_to_identical_metrics(tmp_path, three_device_plan):
    plan_path = three_device_plan
    args = ["train", "--task", "shakespeare", "--method", "caff", "--plan", str(plan_path), "--rounds", "4",
            "--clients-per-round", "2", "--seed", "3", "--no-pretrained", "--eval-samples", "64"]
    from caff.cli import main

    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "caff.cli", *args, "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # as this process: same float sums
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            state = killed / "state.json"
            if state.exists() and json.loads(state.read_text())["round"] >= 2:
                break
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.loads((killed / "state.json").read_text())["round"] < 4, "the run ended before it was killed"
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    resumed = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert _strip(resumed) == _strip(whole)


def test_fedra_devices_run_a_shallow_model_of_their_held_blocks(tmp_path, three_device_plan):
    from planner.planfile import read_plan_file
    from trainer.engine import Server, received_arrays, train_client

    config = TrainConfig(task="shakespeare", method="fedra", rounds=1, clients_per_round=3, pretrained=False,
                         eval_samples=16)
    server = Server(config, read_plan_file(three_device_plan), tmp_path / "run")
    tasks, _ = server.tasks(1)
    assert tasks and all(0 < len(t["held_blocks"]) for t in tasks)
    assert any(len(t["held_blocks"]) < SPEC.n_blocks for t in tasks), "some device must hold fewer blocks"
    for task in tasks:
        record, deltas = train_client(task, received_arrays(task, server.state))
        held = set(task["held_blocks"])
        touched = {int(k.split(".")[1]) for k in deltas if k.startswith("blocks.")}
        assert touched == held, (touched, held)
        assert any(k.startswith("head.") for k in deltas)
        # a shallow model: FLOPs of a len(held)-block model, fewer than LoRA over every block
        shallow = estimate(SPEC.model_copy(update={"n_blocks": len(held)}), TrainMode.parse("lora:8", len(held)),
                           2, 80)
        deep = estimate(SPEC, TrainMode.parse("lora:8", SPEC.n_blocks), 2, 80)
        per_step = shallow.totals["fwd_flops"] + shallow.totals["bwd_flops"]
        assert record["flops"] == task["steps"] * per_step
        assert len(held) == SPEC.n_blocks or per_step < deep.totals["fwd_flops"] + deep.totals["bwd_flops"]
        assert record["peak_bytes"] <= record["memory_budget_bytes"]


def test_the_real_minilm_starting_point_does_not_depend_on_the_global_rng():
    from trainer.engine import initial_state
    from trainer.tasks.fortunes import minilm_dir

    try:
        minilm_dir()
    except ValueError as missing:
        pytest.skip(str(missing))
    spec = ZOO["minilm-l6"].model_copy(update={"n_classes": 7})
    torch.manual_seed(1)
    first = initial_state("fortunes", spec, pretrained=True)
    torch.manual_seed(2)
    second = initial_state("fortunes", spec, pretrained=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_local_training_measures_the_peak_caff_validate_measures_under_the_real_attention_kernel():
    """FLOPs are counted under the math kernel, the peak under the kernel training uses (SDPA here)."""
    from costmodel import make_batch, measure

    spec = ZOO["minilm-l6"].model_copy(update={"n_blocks": 2, "d_model": 64, "n_heads": 4, "d_ff": 128,
                                               "vocab_size": 100})
    assert spec.attention == "sdpa"
    mode = TrainMode.parse("blocks:1", spec.n_blocks)

    def batches():
        while True:
            yield make_batch(spec, 4, 32)
    result = local_train(build_model(spec).state_dict(), spec, mode, batches(), 3, "sgd", 0.01)
    validated = measure(spec, mode, 4, 32, "sgd")
    assert result.peak_bytes == validated.peak_bytes
    assert result.flops == 3 * (validated.fwd_flops + validated.bwd_flops)
