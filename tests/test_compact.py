"""Compact frozen weights (``+frozen:bf16``, ``+frozen:int8``): the grammar, the estimate against torch's
counters and the model's own tensors, and training that executes them."""

import random

import pytest
import torch
import torch.nn.functional as F

from costmodel import ZOO, TrainMode, apply_mode, build_model, estimate, measure
from costmodel.compact import CompactLinear
from costmodel.sampling import random_config
from test_costmodel import _compare
from test_flower import flower_task_identity, node_cache, node_context  # noqa: F401 (fixtures)
from trainer.local import local_train


@pytest.mark.parametrize("text, frozen, shown", [
    ("blocks:3+frozen:int8", "int8", "blocks:3+frozen:int8"),
    ("frozen:bf16+lora:4", "bf16", "lora:0=4,1=4,2=4,3=4+frozen:bf16"),
    ("head+frozen:int8", "int8", "head+frozen:int8"),
    ("last:2", None, "blocks:2,3"),
])
def test_frozen_parses_prints_and_round_trips(text, frozen, shown):
    mode = TrainMode.parse(text, 4)
    assert mode.frozen == frozen and str(mode) == shown
    assert TrainMode.parse(str(mode), 4) == mode
    assert hash(mode) != hash(mode.model_copy(update={"frozen": "bf16" if frozen == "int8" else "int8"}))


@pytest.mark.parametrize("text, reason", [
    ("blocks:1+frozen:int4", "frozen weights are held as bf16 or int8, not 'int4'"),
    ("blocks:1+frozen:", "frozen weights are held as bf16 or int8, not ''"),
])
def test_an_unknown_frozen_format_is_refused_in_one_line(text, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        TrainMode.parse(text, 4)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("args, reason", [
    (("char-gpt-xs", "--train", "blocks:1+frozen:int4"), "frozen weights are held as bf16 or int8, not 'int4'"),
    (("char-gpt-xs", "--dtype", "bf16", "--train", "head+frozen:bf16"), "frozen:bf16 changes nothing"),
])
def test_cli_refuses_a_bad_frozen_format_in_one_line(caff, args, reason):
    result = caff("cost", *args, "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and reason in result.stderr


def test_cli_shows_what_int8_frozen_weights_save(caff):
    import json

    result = caff("cost", "char-gpt-xs", "--batch", "8", "--seq", "80", "--train", "blocks:3+frozen:int8", "--json")
    out = json.loads(result.stdout)
    plain = estimate(ZOO["char-gpt-xs"], TrainMode.parse("blocks:3", 4), 8, 80)
    assert out["full_precision_frozen"] == {"param_bytes": plain.totals["param_bytes"], "peak_bytes": plain.peak_bytes}
    assert out["total"]["peak_bytes"] < plain.peak_bytes


def test_transformers_models_refuse_compact_weights():
    from costmodel.hf import apply_mode_hf

    spec = ZOO["char-gpt-xs"]
    with pytest.raises(ValueError, match="caff's own models only"):  # before it touches the model
        apply_mode_hf(torch.nn.Module(), spec, TrainMode.parse("head+frozen:int8", spec.n_blocks))


def test_bf16_frozen_weights_on_a_bf16_model_are_refused():
    spec = ZOO["char-gpt-xs"].model_copy(update={"dtype": "bf16"})
    with pytest.raises(ValueError, match="frozen:bf16 changes nothing"):
        estimate(spec, TrainMode.parse("head+frozen:bf16", spec.n_blocks), 2, 16)


@pytest.mark.parametrize("name, text", [
    ("char-gpt-xs", "head+frozen:int8"),
    ("char-gpt-xs", "blocks:1+frozen:int8"),  # frozen blocks 2, 3 above a trained one: weights under grad
    ("char-gpt-xs", "lora:4+frozen:bf16"),
    ("char-gpt-xs", "blocks:1+lora:3=4+recompute:1,3+frozen:int8"),
    ("minilm-l6", "blocks:2+frozen:int8"),
    ("vit-tiny", "blocks:2+lora:3=4+frozen:bf16"),
])
def test_compact_weights_match_counters_on_zoo_models(name, text):
    """FLOPs equal FlopCounterMode's and saved bytes saved_tensors_hooks', per layer (the dequantized
    weight is not saved: only the int8/bf16 weight and its scales, which are buffers); the peak within
    10% of the measured live bytes; the same FLOPs and saved bytes as fp32 frozen weights, a lower peak."""
    spec = ZOO[name]
    mode = TrainMode.parse(text, spec.n_blocks)
    assert abs(_compare(spec, mode, 4, 32, "adam")) <= 0.10
    compact, plain = estimate(spec, mode, 4, 32, "adam"), estimate(spec, mode.model_copy(update={"frozen": None}),
                                                                   4, 32, "adam")
    for key in ("fwd_flops", "bwd_flops", "activation_bytes"):
        assert compact.totals[key] == plain.totals[key], key
    assert compact.totals["param_bytes"] < plain.totals["param_bytes"] and compact.peak_bytes < plain.peak_bytes


def test_int8_weights_of_a_bf16_model_match_counters():
    """On a bf16 model the scales are bf16 and the weight dequantizes to bf16."""
    spec = ZOO["char-gpt-xs"].model_copy(update={"dtype": "bf16"})
    assert abs(_compare(spec, TrainMode.parse("blocks:1+lora:2=4+frozen:int8", spec.n_blocks), 4, 32, "adam")) <= 0.10


def test_compact_weights_match_counters_on_random_configurations():
    """Random models and modes (costmodel.sampling) with int8 or bf16 frozen weights: FLOPs and saved
    bytes exact, per layer; the peak within 10%."""
    rng = random.Random(7)
    small = lambda spec, batch, seq: batch * spec.tokens_per_sample(seq) * spec.d_model * spec.n_blocks <= 200_000  # noqa: E731
    configs = [c for c in (random_config(rng, frozen=True) for _ in range(16))
               if str(c[1]) != "all" and small(c[0], c[2], c[3])][:5]
    assert len(configs) == 5 and {c[1].frozen for c in configs} == {"int8", "bf16"}
    errors = [abs(_compare(*config)) for config in configs]
    assert max(errors) <= 0.10, errors


@pytest.mark.parametrize("text", ["head+frozen:int8", "lora:4+frozen:bf16", "blocks:2+frozen:int8"])
def test_weight_bytes_equal_the_model_tensors(text):
    """The estimate's weights and buffers are the bytes of the built model's parameters and buffers."""
    spec = ZOO["char-gpt-xs"]
    mode = TrainMode.parse(text, spec.n_blocks)
    model = apply_mode(build_model(spec), mode)
    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    report = estimate(spec, mode, 2, 16)
    assert report.totals["param_bytes"] + report.buffer_bytes == held
    compact = [m for m in model.modules() if isinstance(m, CompactLinear)]
    assert len(compact) == 6 * (spec.n_blocks - len(mode.blocks))


def test_int8_linear_is_within_half_a_step_and_its_input_gradient_is_the_dequantized_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    compact = CompactLinear(linear, "int8")
    scale = linear.weight.abs().amax(dim=1) / 127
    dequantized = compact.weight.float() * compact.scale[:, None]
    assert ((dequantized - linear.weight).abs() <= scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 64, requires_grad=True)
    reference = x.detach().clone().requires_grad_(True)
    out = compact(x)
    torch.testing.assert_close(out, F.linear(reference, dequantized, linear.bias))
    grad = torch.randn_like(out)
    out.backward(grad)
    F.linear(reference, dequantized, linear.bias).backward(grad)
    torch.testing.assert_close(x.grad, reference.grad)


@pytest.mark.parametrize("name, texts", [
    ("char-gpt-xs", ("last:1", "last:1+frozen:bf16", "last:1+frozen:int8")),
    ("minilm-l6", ("head", "head+frozen:bf16", "head+frozen:int8")),
])
def test_measured_peak_falls_with_compact_weights_as_predicted(name, texts):
    """fp32, bf16 and int8 frozen weights: the measured peak falls at each step, and the estimate
    predicts each fall within 5% of the measured one."""
    spec = ZOO[name]
    modes = [TrainMode.parse(text, spec.n_blocks) for text in texts]
    measured = [measure(spec, mode, 8, 32).peak_bytes for mode in modes]
    predicted = [estimate(spec, mode, 8, 32).peak_bytes for mode in modes]
    assert measured[0] > measured[1] > measured[2]
    for index in (1, 2):
        fall, predicted_fall = measured[0] - measured[index], predicted[0] - predicted[index]
        assert abs(predicted_fall / fall - 1) <= 0.05, (texts[index], predicted_fall, fall)


def test_local_training_with_int8_frozen_weights_keeps_the_global_state_and_uploads_the_same_names():
    spec = ZOO["char-gpt-xs"]
    state = build_model(spec, seed=1).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    batches = [(torch.randint(0, spec.vocab_size, (2, 16)), torch.randint(0, spec.vocab_size, (2, 16)))
               for _ in range(2)]
    results = [local_train(state, spec, TrainMode.parse(text, spec.n_blocks), iter(batches), steps=2, lr=0.05)
               for text in ("blocks:2+lora:3=4", "blocks:2+lora:3=4+frozen:int8")]
    assert results[0].update.keys() == results[1].update.keys()
    assert all(v.dtype == torch.float32 for v in results[1].update.values())
    assert all(torch.equal(state[k], before[k]) and state[k].dtype == before[k].dtype for k in state)
    assert results[1].peak_bytes < results[0].peak_bytes and results[1].flops == results[0].flops
    # the trained block's update differs only through the int8 blocks around it: close, not equal
    name = "blocks.2.mlp.fc.weight"
    assert 0 < (results[1].update[name] - results[0].update[name]).abs().max() < 1e-2


def test_caff_train_runs_a_plan_with_int8_frozen_weights_within_its_predicted_peak(tmp_path, three_device_plan):
    """A plan whose devices hold their frozen weights in int8 (its predicted peaks from the estimate, as
    the planner writes them) trains one round through ``caff train``; each device's measured peak is
    within the plan's prediction and 5% of it, its FLOPs equal the plan's."""
    import json

    from caff.cli import main

    spec = ZOO["char-gpt-xs"]
    plan = json.loads(three_device_plan.read_text())
    for device in plan["devices"]:
        if device["status"] == "optimal":
            mode = TrainMode.parse(device["mode"] + "+frozen:int8", spec.n_blocks)
            device["mode"] = str(mode)
            device["peak_bytes"] = estimate(spec, mode, device["budgets"]["batch_size"], plan["seq"],
                                            plan["optimizer"]).peak_bytes
    path = tmp_path / "int8.json"
    path.write_text(json.dumps(plan))
    assert main(["train", "--task", "shakespeare", "--method", "caff", "--plan", str(path), "--rounds", "1",
                 "--clients-per-round", "3", "--no-pretrained", "--eval-samples", "16", "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    trained = [c for c in record["clients"] if c["status"] == "trained"]
    assert trained and all(c["mode"].endswith("+frozen:int8") for c in trained)
    planned = {d["device"]: d for d in plan["devices"]}
    for client in trained:
        assert client["peak_bytes"] <= planned[client["device"]]["peak_bytes"] <= 1.05 * client["peak_bytes"], client
        assert client["flops"] == client["predicted_flops"] == planned[client["device"]]["flops_per_round"], client


@pytest.mark.parametrize("text", ["blocks:3+frozen:int8", "blocks:2+lora:3=4+frozen:int8", "lora:2+frozen:bf16",
                                  "head+frozen:bf16"])
def test_a_device_that_receives_compact_weights_trains_what_it_would_from_fp32(text):
    """The server quantizes (`compact_state`), the device holds what it received: the same update, bit for
    bit, as a device that receives fp32 and quantizes itself; the model's compact weights are the received
    arrays themselves, and no full-size fp32 weight of a compact linear is left in it."""
    from costmodel.compact import compact_linears, compact_state, received_compact
    from costmodel.wire import PER_ARRAY, wire_bytes
    from trainer.local import _model_holding

    spec = ZOO["char-gpt-xs"]
    mode = TrainMode.parse(text, spec.n_blocks)
    state = build_model(spec, seed=1).state_dict()
    sent = compact_state(state, spec, mode)
    linears = compact_linears(spec, mode)
    assert linears and all(state[k] is sent[k] for k in state if k.rsplit(".", 1)[0] not in linears)
    assert {sent[f"{name}.weight"].dtype for name in linears} == {torch.int8 if mode.frozen == "int8" else torch.int16}
    assert all((f"{name}.scale" in sent) == (mode.frozen == "int8") for name in linears)
    # the download shrinks by the data bytes saved, up to the framing of the added scale arrays
    saved = sum(state[f"{n}.weight"].nbytes - sent[f"{n}.weight"].nbytes - sent.get(f"{n}.scale", torch.empty(0)).nbytes
                for n in linears)
    assert saved > 0 and abs(wire_bytes(state) - wire_bytes(sent) - saved) <= PER_ARRAY * len(linears)
    batches = [(torch.randint(0, spec.vocab_size, (2, 16)), torch.randint(0, spec.vocab_size, (2, 16)))
               for _ in range(3)]
    on_device, from_server = (local_train(arrays, spec, mode, iter(batches), steps=3, lr=0.05, seed=7)
                              for arrays in (state, sent))
    assert on_device.update.keys() == from_server.update.keys() and on_device.loss == from_server.loss
    assert all(torch.equal(on_device.update[k], from_server.update[k]) for k in on_device.update)
    assert on_device.peak_bytes == from_server.peak_bytes

    held, compact = received_compact(sent, spec, mode)
    model = apply_mode(_model_holding(held, spec), mode, compact)
    modules = dict(model.named_modules())
    for name in linears:
        module = modules.get(f"{name}.base_layer", modules.get(name))
        assert isinstance(module, CompactLinear)
        assert module.weight.untyped_storage().data_ptr() == sent[f"{name}.weight"].untyped_storage().data_ptr()
    weights = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if n.endswith(".weight")
               and n.replace(".base_layer", "").removesuffix(".weight") in linears]
    assert len(weights) == len(linears) and {t.dtype for _, t in weights} == {
        torch.int8 if mode.frozen == "int8" else torch.bfloat16}


def _compact_plan(three_device_plan, tmp_path, fmt: str):
    """The three-device plan with every device's frozen weights held in ``fmt``."""
    import json

    plan = json.loads(three_device_plan.read_text())
    for device in plan["devices"]:
        if device["status"] == "optimal":
            device["mode"] = str(TrainMode.parse(device["mode"] + f"+frozen:{fmt}", ZOO["char-gpt-xs"].n_blocks))
    path = tmp_path / f"{fmt}.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_a_round_with_compact_weights_sent_compact_gives_the_same_global_model(tmp_path, three_device_plan,
                                                                               monkeypatch, fmt):
    """In process: the global model after a round is the one devices that quantize fp32 themselves give,
    bit for bit; each device downloads fewer bytes, and uploads the same."""
    from safetensors.torch import load_file

    from planner.planfile import read_plan_file
    from trainer.engine import TrainConfig, run

    config = TrainConfig(task="shakespeare", rounds=1, clients_per_round=3, pretrained=False, eval_samples=16, seed=3)
    plan = read_plan_file(_compact_plan(three_device_plan, tmp_path, fmt))
    compact = run(config, plan, tmp_path / "compact")
    monkeypatch.setattr("trainer.engine.compact_state", lambda state, spec, mode: state)  # today's path: fp32 sent
    fp32 = run(config, plan, tmp_path / "fp32")
    first, second = (load_file(str(tmp_path / out / "global-1.safetensors")) for out in ("compact", "fp32"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    trained = [(a, b) for a, b in zip(compact[0]["clients"], fp32[0]["clients"]) if a["status"] == "trained"]
    assert any(TrainMode.parse(a["mode"], 4).blocks != set(range(4)) for a, _ in trained)
    for a, b in trained:
        assert a["upload_bytes"] == b["upload_bytes"] and a["loss"] == b["loss"]
        assert a["download_bytes"] < b["download_bytes"] or TrainMode.parse(a["mode"], 4).blocks == set(range(4))


def test_the_strategy_sends_compact_weights_and_its_round_is_the_in_process_engines(
        tmp_path, three_device_plan, flower_task_identity, node_context):
    """Through the Flower strategy and the ClientApp (Flower's serialization, no transport): each message
    carries the compact linears in int8 with their scales, and the round (records, download bytes
    measured by Flower's serialization, global model) is the in-process engine's."""
    from safetensors.torch import load_file

    from costmodel.compact import compact_linears
    from planner.planfile import read_plan_file
    from test_flower import CONFIG, KnownNodes, _strategy, _strip_timing
    from trainer.engine import run
    from trainer.flower import client_train, unpacked_state

    path, config = _compact_plan(three_device_plan, tmp_path, "int8"), CONFIG.model_copy(update={"rounds": 1})
    strategy = _strategy(tmp_path / "flower", path, config)
    messages = strategy.configure_train(1, None, None, grid=KnownNodes(strategy))
    linears = [compact_linears(ZOO["char-gpt-xs"], TrainMode.parse(dict(m.content["task"])["mode"], 4))
               for m in messages]
    assert any(linears)
    for message, names in zip(messages, linears):
        arrays = unpacked_state(message.content["arrays"])
        assert all(arrays[f"{n}.weight"].dtype == torch.int8 and arrays[f"{n}.scale"].dtype == torch.float32
                   for n in names)
    strategy.aggregate_train(1, [client_train(message, node_context) for message in messages])
    in_process = run(config, read_plan_file(path), tmp_path / "in-process")
    assert _strip_timing(strategy.server.metrics) == _strip_timing(in_process)
    expected = load_file(str(tmp_path / "in-process" / "global-1.safetensors"))
    assert all(torch.equal(strategy.server.state[k], expected[k]) for k in expected)


@pytest.mark.slow  # Flower's simulation engine starts Ray; the strategy test above covers the same path without it
def test_flower_simulation_sends_compact_weights_and_gives_the_in_process_engines_model(tmp_path, three_device_plan,
                                                                                         monkeypatch, caff):
    """A plan with int8 frozen weights on Flower's simulation: the strategy sends them compact (Flower's own
    serialization measures each download, equal to the in-process engine's), and the global model after
    the rounds is the in-process engine's."""
    import json

    from safetensors.torch import load_file

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Ray's workers: the same float sums as this process
    path = _compact_plan(three_device_plan, tmp_path, "int8")
    args = ["train", "--task", "shakespeare", "--method", "caff", "--plan", str(path), "--rounds", "1",
            "--clients-per-round", "3", "--seed", "3", "--no-pretrained", "--eval-samples", "16"]
    assert caff(*args, "--out", str(tmp_path / "local")).returncode == 0
    simulated = caff(*args, "--engine", "flower-sim", "--out", str(tmp_path / "sim"))
    assert simulated.returncode == 0, simulated.stderr
    first, second = (load_file(str(tmp_path / out / "global-1.safetensors")) for out in ("local", "sim"))
    assert first.keys() == second.keys() and all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    clients = [[c for c in json.loads((tmp_path / out / "metrics.jsonl").read_text())["clients"]
                if c["status"] == "trained"] for out in ("local", "sim")]
    assert [c["download_bytes"] for c in clients[0]] == [c["download_bytes"] for c in clients[1]]
    state = build_model(ZOO["char-gpt-xs"]).state_dict()
    from costmodel.wire import wire_bytes
    compacted = [c for c in clients[1] if TrainMode.parse(c["mode"], 4).blocks != set(range(4))]
    assert compacted and all(c["download_bytes"] < wire_bytes(state) for c in compacted)
