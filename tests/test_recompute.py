"""Recomputed blocks (``+recompute:i,j``): the estimate against torch's counters, and training that
executes them (non-reentrant checkpoint) with the same update at a lower peak."""

import random

import pytest
import torch

from costmodel import ZOO, TrainMode, build_model, estimate, measure
from costmodel.build import make_batch
from costmodel.sampling import random_config
from test_costmodel import _compare
from trainer.local import local_train


@pytest.mark.parametrize("text, recompute", [
    ("blocks:2,3+recompute:2,3", {2, 3}),
    ("recompute:1+lora:4", {1}),
    ("all+recompute:0,3", {0, 3}),
    ("blocks:3+lora:0=4+recompute:0,3", {0, 3}),
])
def test_recompute_parses_and_round_trips(text, recompute):
    mode = TrainMode.parse(text, 4)
    assert set(mode.recompute) == recompute
    assert TrainMode.parse(str(mode), 4) == mode and "recompute:" in str(mode)
    assert hash(mode) != hash(mode.model_copy(update={"recompute": frozenset()}))


@pytest.mark.parametrize("text, reason", [
    ("blocks:2+recompute:1", "block 1 is recomputed but not trained"),
    ("head+recompute:0", "block 0 is recomputed but not trained"),
    ("blocks:1+recompute:4", "block 4 out of range"),
    ("blocks:1+recompute:x", "bad number"),
])
def test_recompute_of_an_untrained_block_is_refused_in_one_line(text, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        TrainMode.parse(text, 4)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("name, text", [
    ("char-gpt-xs", "blocks:2,3+recompute:2"),
    ("char-gpt-xs", "lora:4+recompute:1,2"),
    ("minilm-l6", "blocks:4,5+recompute:4,5"),
    ("minilm-l6", "lora:8+recompute:0,5"),
    ("vit-tiny", "blocks:2+lora:3=4+recompute:2,3"),
])
def test_recompute_matches_counters_on_zoo_models(name, text):
    """FLOPs (the re-run forward counted in backward) and saved bytes (the block's input only) equal
    FlopCounterMode's and saved_tensors_hooks', per layer; the peak is within 10% of the measured one;
    recomputing costs FLOPs and saves memory against the same mode without it."""
    spec = ZOO[name]
    mode = TrainMode.parse(text, spec.n_blocks)
    assert abs(_compare(spec, mode, 4, 32, "adam")) <= 0.10
    plain = mode.model_copy(update={"recompute": frozenset()})
    with_, without = estimate(spec, mode, 4, 32, "adam"), estimate(spec, plain, 4, 32, "adam")
    assert with_.totals["recompute_flops"] > 0 and with_.totals["bwd_flops"] > without.totals["bwd_flops"]
    assert with_.totals["activation_bytes"] < without.totals["activation_bytes"]


def test_recompute_matches_counters_on_random_configurations():
    """Random models and modes (costmodel.sampling) with recompute on random trained blocks: FLOPs and
    saved bytes exact, per layer; the peak within 10% (the bound the fidelity tests use for all)."""
    rng = random.Random(13)
    small = lambda spec, batch, seq: batch * spec.tokens_per_sample(seq) * spec.d_model * spec.n_blocks <= 200_000  # noqa: E731
    configs = [c for c in (random_config(rng, recompute=True) for _ in range(12))
               if c[1].recompute and small(c[0], c[2], c[3])][:5]
    assert len(configs) == 5 and {c[0].kind for c in configs} == {"gpt", "encoder", "vit"}
    assert any(c[1].lora.keys() & c[1].recompute for c in configs) and any(c[1].blocks & c[1].recompute for c in configs)
    errors = [abs(_compare(*config)) for config in configs]
    assert max(errors) <= 0.10, errors


def test_recompute_stops_at_the_last_saving_op():
    """Pre-norm, no dropout: the last op that saves is the MLP's output linear, which saves only its
    input and weight, so checkpoint stops before running it; post-norm ends in a LayerNorm, which
    saves its statistics after computing them, so the whole forward is re-run."""
    gpt, minilm = ZOO["char-gpt-xs"], ZOO["minilm-l6"]
    pre = estimate(gpt, TrainMode.parse("blocks:3+recompute:3", gpt.n_blocks), 4, 32).layers[4]
    rows = 4 * 32
    assert pre.recompute_flops == pre.fwd_flops - 2 * rows * gpt.d_ff * gpt.d_model
    post = estimate(minilm, TrainMode.parse("blocks:5+recompute:5", minilm.n_blocks), 4, 32).layers[6]
    assert post.recompute_flops == post.fwd_flops


def _train(spec, text, batches):
    state = build_model(spec, seed=1).state_dict()
    return local_train(state, spec, TrainMode.parse(text, spec.n_blocks), iter(batches), steps=len(batches),
                       optimizer="adam", lr=0.01, seed=5)


@pytest.mark.parametrize("name, text", [
    ("char-gpt-xs", "blocks:1,2,3"),
    ("char-gpt-xs", "lora:8"),
    pytest.param("minilm-l6", "lora:8", marks=pytest.mark.slow),
])
def test_local_training_with_recompute_gives_the_same_update_at_a_lower_peak(name, text):
    """(Where activations bind: with few trained blocks of MiniLM the optimizer step's peak binds, and
    recomputation does not lower it; the estimate says so too.)"""
    spec = ZOO[name].model_copy(update={"dropout": 0.1})  # dropout: checkpoint must replay the same masks
    batches = [make_batch(spec, 4, 32, seed) for seed in range(2)]
    trained = sorted(TrainMode.parse(text, spec.n_blocks).blocks | set(TrainMode.parse(text, spec.n_blocks).lora))
    plain = _train(spec, text, batches)
    recomputed = _train(spec, f"{text}+recompute:{','.join(map(str, trained))}", batches)
    assert plain.update.keys() == recomputed.update.keys()
    for key, value in plain.update.items():
        torch.testing.assert_close(recomputed.update[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert recomputed.peak_bytes < plain.peak_bytes
    assert recomputed.flops > plain.flops  # counted on the meta device, re-run forward included


def test_measured_peak_falls_with_recompute_as_predicted():
    """char-gpt-xs training its last three blocks: the measured peak falls by recomputing them, and the
    estimate predicts the fall within 10% of the measured one."""
    spec = ZOO["char-gpt-xs"]
    plain, recomputed = (TrainMode.parse(t, spec.n_blocks) for t in ("last:3", "last:3+recompute:1,2,3"))
    measured = [measure(spec, mode, 8, 64).peak_bytes for mode in (plain, recomputed)]
    predicted = [estimate(spec, mode, 8, 64).peak_bytes for mode in (plain, recomputed)]
    assert measured[1] < measured[0]
    assert abs((predicted[0] - predicted[1]) / (measured[0] - measured[1]) - 1) <= 0.10


def test_cli_refuses_recompute_of_an_untrained_block(caff):
    result = caff("cost", "char-gpt-xs", "--train", "blocks:1+recompute:2", "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "block 2 is recomputed but not trained" in result.stderr
