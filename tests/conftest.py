import os
import warnings
from types import SimpleNamespace

from pathlib import Path

import pytest
import torch
from hypothesis import settings

# hypothesis draws the same examples on every run and machine (a red run replays as is), keeps no
# example database, and has no per-example deadline (timing varies on shared cores)
settings.register_profile("caff", derandomize=True, database=None, deadline=None)
settings.load_profile("caff")

# one intra-op thread per test process: pytest -n 2 on two cores would otherwise oversubscribe them
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torch.distributed._tools.*")


@pytest.fixture
def caff(capsys):
    """Run the CLI in this process; returns (returncode, stdout, stderr) like a subprocess would."""
    from caff.cli import main

    def run(*args):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


#: A runtime profile without footprint, for tests whose budgets are about tensors alone.
TENSORS_ONLY = str(Path(__file__).parent / "data" / "runtime-tensors-only.json")


@pytest.fixture
def need_data():
    """``need_data(loader, *args)``: what the loader returns, or skip naming the data package it lacks."""
    def load(loader, *args, **kwargs):
        try:
            return loader(*args, **kwargs)
        except RuntimeError as missing:
            if "install" not in str(missing):
                raise
            pytest.skip(str(missing))
    return load


@pytest.fixture
def three_device_plan(tmp_path):
    """A plan file for char-gpt-xs on devices with 0.3, 0.6 and 1.4 times full fine-tuning's peak (batch 2)."""
    from costmodel import ZOO, TrainMode, estimate
    from planner.fleet import PlanSettings, plan
    from planner.planfile import write_plan_file
    from profiles import DeviceSpec

    spec = ZOO["char-gpt-xs"]
    full = estimate(spec, TrainMode.parse("all", spec.n_blocks), 2, 80).peak_bytes
    devices = [DeviceSpec(name=f"d{i}", memory_bytes=int(f * full), compute_flops=1e12, upload_bytes=10**8,
                          local_steps=2, batch_size=2, runtime=TENSORS_ONLY) for i, f in enumerate((0.3, 0.6, 1.4))]
    path = tmp_path / "plan.json"
    write_plan_file(path, plan([spec], devices, PlanSettings(seq=80, lora_ranks=(2, 4))))
    return path
