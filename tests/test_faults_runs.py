"""Faults in runs, checkpoints and run directories: each ends in one clear line (or an honest
result), never a traceback, a silently wrong run or lost data. Every case here failed on 42b5009.

Classes: plans against checkpoints and run settings; resume with another plan or configuration;
checkpoint integrity; results without a state; durability and a full disk; measuring that changes
training; LoRA's seed; learning rates whose updates are all rejected.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from costmodel import ZOO, TrainMode, build_model, estimate
from planner.fleet import PlanSettings, plan
from planner.planfile import read_plan_file, write_plan_file
from profiles import DeviceSpec
from tests.conftest import TENSORS_ONLY
from trainer.engine import TrainConfig
from trainer.local import local_train

SPEC = ZOO["char-gpt-xs"]
CONFIG = TrainConfig(task="shakespeare", method="caff", rounds=3, clients_per_round=2, seed=3, pretrained=False,
                     eval_samples=8)
ARGS = ["train", "--task", "shakespeare", "--method", "caff", "--rounds", "3", "--clients-per-round", "2",
        "--seed", "3", "--no-pretrained", "--eval-samples", "8"]


def _plan(path, spec=SPEC, seq=80, memory=(0.6, 1.2), compute=1e12, steps=2):
    """A plan of ``spec`` for devices with ``memory`` x full fine-tuning's peak (batch 2)."""
    full = estimate(spec, TrainMode.parse("all", spec.n_blocks), 2, seq).peak_bytes
    devices = [DeviceSpec(name=f"d{i}", memory_bytes=int(f * full), compute_flops=compute, upload_bytes=10**8,
                          local_steps=steps, batch_size=2, runtime=TENSORS_ONLY) for i, f in enumerate(memory)]
    write_plan_file(path, plan([spec], devices, PlanSettings(seq=seq, lora_ranks=(2, 4))))
    return path


def _refused(result, *fragments, code=2):
    assert result.returncode == code, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    assert result.stderr.startswith("caff: error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """(run directory, plan): the 3-round run of CONFIG, stopped right after it committed round 2."""
    from trainer import engine

    root = tmp_path_factory.mktemp("interrupted")
    plan_path = _plan(root / "plan.json")
    finish = engine.Server.finish

    def finish_then_die(self, round_index, *args):
        row = finish(self, round_index, *args)
        if round_index == 2:
            raise _Killed
        return row
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.Server, "finish", finish_then_die)
        with pytest.raises(_Killed):
            engine.run(CONFIG, read_plan_file(plan_path), root / "run")
    return root / "run", plan_path


def _copy(interrupted, tmp_path):
    run, plan_path = interrupted
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", plan_path


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_intact_interrupted_run_resumes_to_its_last_round(caff, interrupted, tmp_path):
    run, plan_path = _copy(interrupted, tmp_path)
    result = caff(*ARGS, "--plan", str(plan_path), "--out", str(run), "--resume")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in run.glob("global-*")) == ["global-3.safetensors"]


# ------------------------------------------------------------------ checkpoint integrity

def _state(run):
    return json.loads((run / "state.json").read_text())


def _set_state(run, **fields):
    (run / "state.json").write_text(json.dumps(_state(run) | fields))


def _truncate(run):
    path = run / "global-2.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(run):
    path = run / "global-2.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _drop_last_metrics_row(run):
    path = run / "metrics.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def _rewrite_weights(run, change):
    """Rewrite the weights and their integrity record consistently: the tensors alone are wrong."""
    path = run / "global-2.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))
    record = _state(run)["weights"]
    if isinstance(record, dict):
        data = path.read_bytes()
        _set_state(run, weights=record | {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})


CORRUPTIONS = {
    "truncated weights": (_truncate, "global-2.safetensors", "truncated"),
    "flipped byte in the weights": (_flip_byte, "global-2.safetensors", "SHA-256"),
    "missing weights": (lambda run: (run / "global-2.safetensors").unlink(), "global-2.safetensors", "missing"),
    "state.json {}": (lambda run: (run / "state.json").write_text("{}"), "state.json", "not a caff run state"),
    "state.json a list": (lambda run: (run / "state.json").write_text("[2]"), "state.json", "not a caff run state"),
    "state.json not JSON": (lambda run: (run / "state.json").write_text("round 2"), "state.json", "not JSON"),
    "round a string": (lambda run: _set_state(run, round="2"), "state.json", "round"),
    "round 9 of 3": (lambda run: _set_state(run, round=9), "state.json", "round 9 of a 3-round run"),
    "round -1": (lambda run: _set_state(run, round=-1), "state.json", "round"),
    "metrics shorter than the state": (_drop_last_metrics_row, "metrics.jsonl", "truncated"),
    "a wrong-shaped tensor": (lambda run: _rewrite_weights(run, lambda s: s.update(
        {"head.norm.bias": torch.zeros(3)})), "global-2.safetensors", "head.norm.bias"),
    "a missing tensor": (lambda run: _rewrite_weights(run, lambda s: s.pop("head.norm.bias")),
                         "global-2.safetensors", "missing head.norm.bias"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupted_checkpoint_is_refused_in_one_line_naming_what_is_wrong(caff, interrupted, tmp_path,
                                                                            corruption):
    run, plan_path = _copy(interrupted, tmp_path)
    corrupt, file, fragment = CORRUPTIONS[corruption]
    corrupt(run)
    before = _snapshot(run)
    _refused(caff(*ARGS, "--plan", str(plan_path), "--out", str(run), "--resume"), file, fragment)
    assert _snapshot(run) == before  # nothing touched


# ------------------------------------------------------------------ resume with other settings

def test_resume_with_another_plan_is_refused(caff, interrupted, tmp_path):
    run, _ = _copy(interrupted, tmp_path)
    other = _plan(tmp_path / "other.json", memory=(0.5, 1.5))
    _refused(caff(*ARGS, "--plan", str(other), "--out", str(run), "--resume"), "different plan or fleet")


def test_a_plan_made_again_from_the_same_fleet_has_the_same_hash_and_another_fleet_another(tmp_path):
    """``--resume --fleet F`` plans again: only the solver's timings differ, and the hash leaves them out."""
    from trainer.rundir import plan_digest

    first, again, other = (read_plan_file(_plan(tmp_path / f"{i}.json", memory=memory))
                           for i, memory in enumerate([(0.6, 1.2), (0.6, 1.2), (0.6, 1.3)]))
    again = again.model_copy(update={"devices": [d.model_copy(update={"solver_seconds": d.solver_seconds + 1})
                                                 for d in again.devices]})
    assert plan_digest(first) == plan_digest(again) != plan_digest(other)


def test_resume_with_another_configuration_names_the_difference_and_how_to_start_afresh(caff, interrupted,
                                                                                        tmp_path):
    run, plan_path = _copy(interrupted, tmp_path)
    args = [a if a != "3" else "4" for a in ARGS]  # --rounds 4 (and --seed 4)
    _refused(caff(*args, "--plan", str(plan_path), "--out", str(run), "--resume"),
             "rounds 4 here, 3 there", "another --out")


def test_demo_rerun_with_other_rounds_says_how_to_start_fresh(caff, interrupted, tmp_path):
    run, _ = interrupted
    shutil.copytree(run, tmp_path / "demo" / "caff")
    _refused(caff("demo", "--rounds", "2", "--out", str(tmp_path / "demo")), "rounds 2 here", "another --out")


# ------------------------------------------------------------------ results without a state

def test_results_without_a_state_are_never_overwritten(caff, interrupted, tmp_path):
    run, plan_path = _copy(interrupted, tmp_path)
    (run / "state.json").unlink()
    before = _snapshot(run)
    _refused(caff(*ARGS, "--plan", str(plan_path), "--out", str(run)), "no state.json", "another --out")
    assert _snapshot(run) == before


# ------------------------------------------------------------------ plans against checkpoints and settings

@pytest.mark.parametrize("change, fragment", [({"activation": "relu"}, "activation='gelu' (wanted 'relu')"),
                                              ({"d_ff": 128}, "d_ff=256 (wanted 128)")])
def test_a_plan_whose_model_differs_from_the_pretrained_checkpoint_is_refused(caff, tmp_path, change, fragment):
    plan_path = _plan(tmp_path / "plan.json", spec=SPEC.model_copy(update=change))
    args = [a for a in ARGS if a != "--no-pretrained"]
    _refused(caff(*args, "--plan", str(plan_path), "--out", str(tmp_path / "run")), fragment)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_plan_made_for_another_sequence_length_is_refused(caff, tmp_path):
    plan_path = _plan(tmp_path / "plan.json", seq=16)
    _refused(caff(*ARGS, "--plan", str(plan_path), "--out", str(tmp_path / "run")), "16 tokens", "--seq 80")


def test_local_steps_beyond_a_devices_compute_budget_are_refused(caff, tmp_path):
    per_step = estimate(SPEC, TrainMode.parse("all", SPEC.n_blocks), 2, 80).totals
    plan_path = _plan(tmp_path / "plan.json", compute=4 * (per_step["fwd_flops"] + per_step["bwd_flops"]))
    _refused(caff(*ARGS, "--plan", str(plan_path), "--local-steps", "200", "--out", str(tmp_path / "run")),
             "--local-steps 200", "re-plan")


def test_a_run_in_which_a_device_exceeds_its_memory_budget_exits_non_zero(caff, tmp_path):
    plan_path = _plan(tmp_path / "plan.json")
    data = json.loads(plan_path.read_text())
    data["devices"][0]["budgets"]["memory_bytes"] = 1000  # the plan claims a budget its mode cannot meet
    plan_path.write_text(json.dumps(data))
    result = caff(*ARGS[:-2], "--rounds", "1", "--plan", str(plan_path), "--out", str(tmp_path / "run"))
    assert result.returncode in (1, 2) and "budget" in result.stderr and result.stderr.count("\n") == 1


def test_a_model_with_fewer_outputs_than_the_task_needs_is_refused(caff, tmp_path):
    from trainer.tasks.shakespeare import VOCAB_SIZE

    small = SPEC.model_copy(update={"name": "char-gpt-small-vocab", "vocab_size": VOCAB_SIZE - 1})
    plan_path = _plan(tmp_path / "plan.json", spec=small)
    _refused(caff(*ARGS, "--plan", str(plan_path), "--no-pretrained", "--out", str(tmp_path / "run")),
             f"{VOCAB_SIZE - 1} outputs", f"needs {VOCAB_SIZE}")


def test_a_plan_without_devices_is_refused(caff, tmp_path):
    plan_path = _plan(tmp_path / "plan.json")
    data = json.loads(plan_path.read_text())
    data["devices"] = []
    plan_path.write_text(json.dumps(data))
    result = caff(*ARGS, "--plan", str(plan_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "devices" in result.stderr


# ------------------------------------------------------------------ learning rates

def test_an_infinite_learning_rate_is_refused(caff, tmp_path):
    plan_path = _plan(tmp_path / "plan.json")
    _refused(caff(*ARGS, "--plan", str(plan_path), "--lr", "inf", "--out", str(tmp_path / "run")), "lr")


def test_updates_rejected_for_a_diverging_learning_rate_are_reported(caff, tmp_path):
    plan_path = _plan(tmp_path / "plan.json")
    result = caff(*ARGS, "--plan", str(plan_path), "--rounds", "1", "--lr", "1e30", "--out", str(tmp_path / "run"))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rejected"], "the test needs a learning rate that makes updates non-finite"
    assert f"{len(row['rejected'])} update(s) rejected" in result.stdout, result.stdout


# ------------------------------------------------------------------ durability and a full disk

def test_every_writer_is_atomic_durable_and_gives_ordinary_permissions(caff, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1])
    from trainer.checkpoint import save_weights

    plan_path = _plan(tmp_path / "plan.json")
    save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    assert caff(*ARGS, "--rounds", "1", "--plan", str(plan_path), "--out", str(tmp_path / "run")).returncode == 0
    targets = [plan_path, tmp_path / "w.safetensors", *(tmp_path / "run" / name for name in
                                                        ("metrics.jsonl", "global-1.safetensors", "state.json"))]
    umask = os.umask(0)
    os.umask(umask)
    for target in targets:
        at = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target))
        assert ("fsync", events[at][1]) in events[:at], target  # the file's bytes are on disk before the rename
        assert ("fsync", str(target.parent)) in events[at:], target  # and the rename, after it
        assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask, target


def test_a_write_that_hits_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    import errno

    from profiles import atomic

    path = tmp_path / "f.json"
    path.write_text("old")
    monkeypatch.setattr(atomic.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError) as exc:
        atomic.atomic_write(path, "new")
    assert exc.value.errno == errno.ENOSPC and str(path) in str(exc.value)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_run_whose_disk_fills_ends_in_one_line_and_keeps_the_last_commit(caff, interrupted, tmp_path,
                                                                           monkeypatch):
    import errno

    from profiles import atomic

    run, plan_path = _copy(interrupted, tmp_path)
    committed = (run / "state.json").read_bytes()
    write = atomic.os.write

    def full_after_metrics(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors.tmp-" + str(os.getpid())):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)
    monkeypatch.setattr(atomic.os, "write", full_after_metrics)
    _refused(caff(*ARGS, "--plan", str(plan_path), "--out", str(run), "--resume"),
             "cannot write", "global-3.safetensors", "No space left on device")
    assert (run / "state.json").read_bytes() == committed  # round 2 stays the commit point
    monkeypatch.setattr(atomic.os, "write", write)
    assert caff(*ARGS, "--plan", str(plan_path), "--out", str(run), "--resume").returncode == 0


@pytest.mark.slow
def test_a_run_that_runs_out_of_file_space_ends_in_one_line(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk in a real process: writes past 100 kB fail (EFBIG), as
    they would with ENOSPC. (The test above covers the same path in this process, fast.)"""
    plan_path = _plan(tmp_path / "plan.json")
    run = tmp_path / "run"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    result = subprocess.run([sys.executable, "-m", "caff.cli", *ARGS, "--plan", str(plan_path), "--out", str(run)],
                            capture_output=True, text=True, preexec_fn=small_files,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("caff: error: cannot write") and result.stderr.count("\n") == 1, result.stderr
    assert "global-1.safetensors" in result.stderr
    assert not list(run.glob(".*tmp*"))  # no half-written file left behind


# ------------------------------------------------------------------ measuring and seeding

TINY_SDPA = ZOO["minilm-l6"].model_copy(update={"n_blocks": 2, "d_model": 64, "n_heads": 4, "d_ff": 128,
                                                "vocab_size": 100, "n_classes": 3})


def _encoder_batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(1, 100, (4, 24), generator=generator), torch.randint(0, 3, (4,), generator=generator)


@pytest.mark.parametrize("mode", ["all", "lora:4"])
def test_measuring_a_round_does_not_change_what_it_trains(mode):
    """An SDPA model trains the same floats measured or not, so a resumed run (which measures its
    first round again) is bit-identical to the uninterrupted one."""
    state = build_model(TINY_SDPA).state_dict()
    mode = TrainMode.parse(mode, TINY_SDPA.n_blocks)
    measured = local_train(state, TINY_SDPA, mode, _encoder_batches(), 3, "sgd", 0.1, seed=5, measure=True)
    plain = local_train(state, TINY_SDPA, mode, _encoder_batches(), 3, "sgd", 0.1, seed=5, measure=False)
    assert measured.flops > 0 and plain.flops == 0
    assert measured.update.keys() == plain.update.keys()
    assert all(torch.equal(measured.update[k], plain.update[k]) for k in measured.update)


def test_lora_starts_from_the_devices_own_random_factors():
    state = build_model(SPEC).state_dict()
    mode = TrainMode.parse("lora:4", SPEC.n_blocks)

    ids = torch.randint(0, 80, (2, 17), generator=torch.Generator().manual_seed(0))

    def factors(seed):
        result = local_train(state, SPEC, mode, iter([(ids[:, :-1], ids[:, 1:])]), 1, "sgd", 1e-9, seed=seed,
                             measure=False)
        return {k: v for k, v in result.update.items() if "lora_A" in k}
    first, again, other = factors(1), factors(1), factors(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)
