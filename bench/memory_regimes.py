"""Blocks trained per homogeneous memory regime, without and with recomputation and int8 frozen
weights: planned, and measured.

For each model on its task's samples (char-gpt-xs and char-gpt-s on Shakespeare, vit-tiny on
Fashion-MNIST, minilm-l6 on fortunes), a device of the accuracy study's regimes ``mem-1/8``,
``mem-1/4``, ``mem-1/2`` (`method_study.devices`: memory 1/8, 1/4, 1/2 of full fine-tuning's
tensor peak for the step's tensors and kept arrays, no runtime footprint; compute and upload
ample; SGD, batch 8, 8 local steps) is planned by `planner.plan` (objective: fully trained blocks;
no LoRA menu) with each of the menus: none, recompute, int8 frozen weights (sent compact, so the
device holds them once), both. Each plan's step is then measured once on CPU
(`costmodel.measure`: FlopCounterMode and saved-tensor hooks; the peak is the tensors' live bytes).

    OMP_NUM_THREADS=1 python bench/memory_regimes.py [--no-measure]

Prints one Markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.method_study import devices, tensors_only_runtime  # noqa: E402
from costmodel import ZOO, TrainMode, estimate, measure  # noqa: E402
from planner import PlanSettings, plan  # noqa: E402
from trainer.engine import TASK_SEQ  # noqa: E402

MODELS = {"char-gpt-xs": "shakespeare", "char-gpt-s": "shakespeare", "vit-tiny": "fashion-mnist",
          "minilm-l6": "fortunes"}
REGIMES = ("mem-1/8", "mem-1/4", "mem-1/2")
MENUS = (("none", False, ()), ("recompute", True, ()), ("int8", False, ("int8",)), ("recompute, int8", True, ("int8",)))
BATCH, STEPS = 8, 8
MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-measure", action="store_true", help="predictions only")
    args = parser.parse_args()
    runtime = tensors_only_runtime(Path(tempfile.mkdtemp(prefix="caff-regimes-")))
    print("| model | regime | menu | trains | blocks | FLOPs per round predicted | measured | "
          "peak predicted | measured |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for name, task in MODELS.items():
        spec, seq = ZOO[name], TASK_SEQ[task]
        full = estimate(spec, TrainMode.parse("all", spec.n_blocks), BATCH, seq)
        print(f"| {name} | full fine-tuning | | `all` | {spec.n_blocks} | "
              f"{STEPS * (full.totals['fwd_flops'] + full.totals['bwd_flops']) / 1e9:.2f} G | "
              f"| {full.peak_bytes / MiB:.2f} MiB | |")
        for regime in REGIMES:
            fleet = devices(regime, spec, task, 1, BATCH, STEPS, runtime)
            for menu, recompute, frozen in MENUS:
                entry = plan([spec], fleet, PlanSettings(seq=seq, recompute=recompute, frozen=frozen)).devices[0]
                if entry.status != "optimal":
                    print(f"| {name} | {regime} | {menu} | nothing fits | | | | | |")
                    continue
                flops = peak = ""
                if not args.no_measure:
                    step = measure(spec, TrainMode.parse(entry.mode, spec.n_blocks), BATCH, seq)
                    flops = f"{STEPS * (step.fwd_flops + step.bwd_flops) / 1e9:.2f} G"
                    peak = f"{step.peak_bytes / MiB:.2f} MiB"
                print(f"| {name} | {regime} | {menu} | `{entry.mode}` | "
                      f"{len(entry.trained_blocks)} | {entry.flops_per_round / 1e9:.2f} G | {flops} | "
                      f"{entry.peak_bytes / MiB:.2f} MiB | {peak} |", flush=True)


if __name__ == "__main__":
    main()
