"""Measure a training client's whole process: one plan run by `trainer.local.local_train` in a fresh
Python process, as a device runs it, and what the kernel says that process used.

`run_probe` starts ``python -m trainer.probe`` with a job (JSON on stdin) and reads one JSON line
back: the step's measured tensor peak (`LiveBytes`), the process's peak resident set (VmHWM from
/proc/self/status, and ``ru_maxrss``), its unique set size (USS: private pages, from
/proc/self/smaps_rollup, at the end) and the bytes of the received weights and the data shard it
held. The received weights are what a server sends for the plan (`costmodel.compact.compact_state`
of a freshly built model: compact frozen weights compact), built in the calling process and read
by the child from a file, as a device reads them off the wire; the shard is a stand-in buffer of
``shard_bytes`` written through, so its pages are resident. Bytes throughout.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path


def _status_field(name: str) -> int | None:
    """A kB field of /proc/self/status in bytes; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def peak_rss_bytes() -> int:
    """The process's peak resident set: VmHWM where the kernel gives it, else ru_maxrss."""
    hwm = _status_field("VmHWM")
    if hwm is not None:
        return hwm
    return maxrss_bytes()


def maxrss_bytes() -> int:
    """getrusage's ru_maxrss in bytes (it counts KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def uss_bytes() -> int | None:
    """Private (unique) resident bytes of this process now; None where smaps_rollup is missing."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    return sum(int(kb) * 1024 for kb in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", text, re.MULTILINE))


def run_probe(job: dict, timeout: float = 600.0) -> dict:
    """Run ``job`` in a fresh process and return what it measured (see `_probe`)."""
    import tempfile

    import torch

    from costmodel import ModelSpec, TrainMode, build_model
    from costmodel.compact import compact_state

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    spec = ModelSpec.model_validate_json(job["spec"])
    with tempfile.TemporaryDirectory() as folder:
        arrays = Path(folder) / "received.pt"
        torch.save(compact_state(build_model(spec).state_dict(), spec, TrainMode.parse(job["mode"], spec.n_blocks)),
                   arrays)
        done = subprocess.run([sys.executable, "-m", "trainer.probe"], input=json.dumps(job | {"arrays": str(arrays)}),
                              capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the measuring process failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(job: dict) -> dict:
    """Train job's plan for ``steps`` steps of random batches, measured as a client measures its first
    round (FLOPs on a meta copy, the tensor peak on the second step), then read the process's peak.
    Job keys: spec (JSON), mode, batch, seq, optimizer, steps, shard_bytes, arrays (the received
    arrays' file, `torch.save`)."""
    import itertools

    import torch

    from costmodel import ModelSpec, TrainMode, make_batch
    from costmodel.process import tensor_bytes
    from trainer.local import local_train

    spec = ModelSpec.model_validate_json(job["spec"])
    mode = TrainMode.parse(job["mode"], spec.n_blocks)
    shard = torch.ones(job.get("shard_bytes", 0), dtype=torch.uint8)  # the device's data, resident
    received = torch.load(job["arrays"], weights_only=True)
    batch = make_batch(spec, job["batch"], job.get("seq"))
    steps = job.get("steps", 2)
    result = local_train(received, spec, mode, itertools.repeat(batch), steps, job["optimizer"])
    return {"tensor_peak_bytes": result.peak_bytes, "step_flops": result.flops // steps,
            "process_peak_bytes": peak_rss_bytes(), "ru_maxrss_bytes": maxrss_bytes(), "uss_bytes": uss_bytes(),
            "shard_bytes": shard.numel(), "received_bytes": tensor_bytes(*received.values()),
            "torch": torch.__version__}


if __name__ == "__main__":
    print(json.dumps(_probe(json.loads(sys.stdin.read()))))
