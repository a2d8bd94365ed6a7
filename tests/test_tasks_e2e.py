"""Every task with every method, end to end through ``caff train``: one round, one step, a tiny
evaluation. The committed checkpoints start Shakespeare and Fashion-MNIST; fortunes runs a small
encoder from random weights (the real MiniLM is tested in test_trainer and test_hf). Then, on the
same data, a run of the task's model with SDPA attention, stopped after round 1 and resumed in a
"new process" (one that has measured nothing yet), is bit-identical to the uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from costmodel import ZOO, ModelSpec, TrainMode, estimate
from planner.fleet import PlanSettings, plan
from planner.planfile import write_plan_file
from profiles import DeviceSpec
from tests.conftest import TENSORS_ONLY
from trainer import engine
from trainer.engine import TASK_SEQ, TrainConfig
from trainer.methods import METHODS
from trainer.tasks import get_task


def _spec(task: str) -> tuple[ModelSpec, bool]:
    """The task's model and whether it starts from a committed checkpoint."""
    if task == "shakespeare":
        return ZOO["char-gpt-xs"], True
    if task == "fashion-mnist":
        return ZOO["vit-tiny"], True
    return ModelSpec(name="tiny-encoder", kind="encoder", n_blocks=2, d_model=32, n_heads=2, d_ff=64,
                     max_seq_len=TASK_SEQ[task], vocab_size=ZOO["minilm-l6"].vocab_size, n_classes=ZOO["minilm-l6"].n_classes,
                     norm="post", attention="sdpa", pad_token_id=0), False


def _plan(path, spec: ModelSpec, seq: int | None, memory: tuple[float, ...]):
    full = estimate(spec, TrainMode.parse("all", spec.n_blocks), 2, seq).peak_bytes
    devices = [DeviceSpec(name=f"d{i}", memory_bytes=int(f * full), compute_flops=1e12, upload_bytes=10**8,
                          local_steps=1, batch_size=2, runtime=TENSORS_ONLY) for i, f in enumerate(memory)]
    write_plan_file(path, plan([spec], devices, PlanSettings(seq=seq, lora_ranks=(2, 4))))
    return path


class _Killed(Exception):
    pass


def _assert_resume_is_bit_identical(task: str, spec: ModelSpec, tmp_path) -> None:
    from planner.planfile import read_plan_file

    plan = read_plan_file(_plan(tmp_path / "sdpa.json", spec.model_copy(update={"attention": "sdpa"}),
                                TASK_SEQ[task], (0.6, 1.5)))
    config = TrainConfig(task=task, method="caff", rounds=2, clients_per_round=2, pretrained=False, eval_samples=8)
    engine._MEASURED.clear()
    whole = engine.run(config, plan, tmp_path / "whole")
    finish = engine.Server.finish

    def finish_then_die(self, round_index, *args):
        finish(self, round_index, *args)
        raise _Killed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.Server, "finish", finish_then_die)
        with pytest.raises(_Killed):
            engine.run(config, plan, tmp_path / "cut")
    engine._MEASURED.clear()  # as in a new process: the resumed round is measured again
    resumed = engine.run(config, plan, tmp_path / "cut", resume=True)
    timing = {"seconds", "client_seconds", "total_seconds", "eval_seconds"}

    def strip(rows):
        return [{k: v for k, v in m.items() if k not in timing} | {"clients": [
            {k: v for k, v in c.items() if k not in timing} for c in m["clients"]]} for m in rows]
    assert strip(resumed) == strip(whole)
    weights = [load_file(str(tmp_path / run / "global-2.safetensors")) for run in ("whole", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("task", ["shakespeare", "fortunes", "fashion-mnist"])
def test_every_method_runs_a_round_of_every_task_and_resumes_bit_identically(caff, tmp_path, task, need_data):
    need_data(get_task(task).client_names)  # skips naming a missing package
    spec, pretrained = _spec(task)
    seq = TASK_SEQ[task]
    for method in METHODS:  # one process, so the task's data load once
        memory = (2.5, 2.5) if method == "smallest" else (0.6, 2.5)  # smallest: every device trains it all; full
        # fine-tuning holds the old value of every weight besides its step (kept arrays, as the planner counts)
        plan_path = _plan(tmp_path / f"{method}.json", spec, seq, memory)
        out = tmp_path / method
        result = caff("train", "--task", task, "--method", method, "--plan", str(plan_path), "--rounds", "1",
                      "--clients-per-round", "2", "--eval-samples", "8", "--out", str(out),
                      *([] if pretrained else ["--no-pretrained"]))
        assert result.returncode == 0, (method, result.stderr)
        [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert row["method"] == method and 0 <= row["test_accuracy"] <= 1 and not row["rejected"]
        trained = [c for c in row["clients"] if c["status"] == "trained"]
        assert trained, (method, row["clients"])
        for client in trained:
            assert client["peak_bytes"] <= client["memory_budget_bytes"], (method, client)
            assert client["flops"] == client["predicted_flops"] > 0, (method, client)
            assert 0 < client["upload_bytes"] <= client["predicted_upload_bytes"], (method, client)  # wire bytes
    _assert_resume_is_bit_identical(task, spec, tmp_path)


@pytest.mark.slow  # about a CPU minute; `.ci/run` runs the README's first command, the demo itself, in full
def test_the_demo_plans_validates_trains_three_methods_and_plots(caff, tmp_path, need_data):
    need_data(get_task("shakespeare").client_names)
    out = tmp_path / "demo"
    result = caff("demo", "--rounds", "1", "--eval-samples", "40", "--central-steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "blocks:2,3" in result.stdout and "OVER BUDGET" not in result.stdout  # the Pi Zeros train a suffix
    for method in ("caff", "lora", "full"):
        row = json.loads((out / method / "metrics.jsonl").read_text().splitlines()[0])
        assert row["method"] == method and row["test_accuracy"] is not None
    assert (out / "demo.png").stat().st_size > 10_000 and "reference: pretrained accuracy" in result.stdout
