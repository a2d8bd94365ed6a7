"""Planner at fleet scale: 10,000 devices with distinct budgets x 4 twelve-block architectures, one device
alone, and the fleet's plans checked against the per-device ILP on a random sample; without and with
a LoRA menu, each without and with recomputation, and with compact frozen weights (int8 or bf16).

    python bench/planner_scale.py [--devices 10000] [--sample 50] [--seed 0] [--single 10]
                                  [--menus none,lora,recompute,both,frozen,all]

Prints wall and CPU times (seconds; CPU is this process's, which a busy machine inflates less) and how
many sampled plans equal the ILP's optimum; asserts nothing. The fleet starts cold (`planner.fleet.clear_caches`);
one device is timed both after the fleet (tables and frontiers kept, as in a service) and cold.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from costmodel import ModelSpec  # noqa: E402
from planner import Budgets, CostTable, DeviceIlp, PlanSettings, SolverError, plan  # noqa: E402
from planner.fleet import clear_caches, preferred  # noqa: E402
from planner.frontier import compute_frontier  # noqa: E402
from profiles import DeviceSpec  # noqa: E402

SEQ = 128
ARCHITECTURES = [ModelSpec(name=f"char-gpt-12x{width}", kind="gpt", n_blocks=12, d_model=width, n_heads=heads,
                           d_ff=4 * width, max_seq_len=SEQ, vocab_size=80)
                 for width, heads in ((128, 4), (192, 6), (256, 8), (320, 10))]


def random_devices(n: int, seed: int) -> list[DeviceSpec]:
    """Budgets drawn log-uniformly: memory 32 MiB-4 GiB, 2 GFLOP-5 TFLOP per round, upload 0.5-80 MiB."""
    rng = random.Random(seed)
    log_uniform = lambda lo, hi: math.exp(rng.uniform(math.log(lo), math.log(hi)))  # noqa: E731
    return [DeviceSpec(name=f"device-{i}", memory_bytes=int(log_uniform(32 * 2**20, 4 * 2**30)),
                       compute_flops=log_uniform(2e9, 5e12), upload_bytes=int(log_uniform(2**19, 80 * 2**20)),
                       local_steps=rng.randint(1, 4), batch_size=rng.choice([4, 8, 16]))
            for i in range(n)]


MENUS = {"none": ((), False, ()), "lora": ((4, 8, 16), False, ()), "recompute": ((), True, ()),  # ranks, recompute,
         "both": ((4, 8, 16), True, ()), "frozen": ((), True, ("int8", "bf16")),  # compact frozen formats
         "all": ((4, 8, 16), True, ("int8", "bf16"))}


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def cpu_timed(function, *args):
    """Result, wall seconds and CPU seconds of this process."""
    cpu = time.process_time()
    result, wall = timed(function, *args)
    return result, wall, time.process_time() - cpu


def single(specs: list[ModelSpec], device: DeviceSpec, settings: PlanSettings, kept: bool) -> float:
    """CPU seconds to plan one device, from a cold start unless ``kept``."""
    if not kept:
        clear_caches()
    return cpu_timed(plan, specs, [device], settings)[2]


def check_against_ilp(result, devices, settings: PlanSettings, sample: int, rng: random.Random) -> None:
    """Solve sampled devices of the winning architecture by the per-device ILP, once per LoRA menu (plans
    without LoRA against the runtime without its LoRA library; `planner.plan` does the same), the better
    optimum (`fleet.preferred`) winning; compare keys, FLOPs and peak."""
    spec = result.spec(result.winner)
    menus = [(ranks, frozen) for ranks in {(), settings.lora_ranks} for frozen in (None, *settings.frozen)]
    tables = {}
    agree, seconds = 0, []
    for i in rng.sample(range(len(devices)), sample):
        device, entry = devices[i], result.devices[i]
        best, elapsed = None, 0.0
        for menu, frozen in menus:
            key = (device.batch_size, menu, frozen)
            table = tables.get(key) or tables.setdefault(key, CostTable(
                spec, device.batch_size, settings.seq, settings.optimizer, menu, settings.objective,
                settings.recompute, frozen))
            budgets = Budgets.of_device(device, settings.margin, settings.shard_bytes, bool(menu))
            try:
                selection, seconds_menu = timed(DeviceIlp(table, budgets).solve)
            except SolverError as exc:
                print(f"    {device.name}: {exc}")
                break
            elapsed += seconds_menu
            if selection is not None:
                costs = table.evaluate(np.array(selection))
                best = costs if best is None or preferred(costs, best)[0] else best
        else:
            seconds.append(elapsed)
            if best is None:
                agree += entry.status == "infeasible"
                continue
            agree += (entry.status == "optimal" and len(entry.trained_blocks) == best.primary[0]
                      and entry.upload_bytes == best.upload_bytes[0] and entry.peak_bytes == best.peak_bytes[0]
                      and entry.flops_per_round == device.local_steps * best.step_flops[0])
    print(f"  ILP check on {sample} sampled devices of {spec.name}: {agree}/{sample} optimal keys, FLOPs and peaks "
          "equal; "
          f"ILP {np.mean(seconds):.2f} s per device (median {np.median(seconds):.2f} s, max {np.max(seconds):.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", type=int, default=10, help="devices planned one at a time")
    parser.add_argument("--menus", default=",".join(MENUS), help=f"which state menus, of {', '.join(MENUS)}")
    args = parser.parse_args()
    devices = random_devices(args.devices, args.seed)
    widths = ", ".join(str(spec.d_model) for spec in ARCHITECTURES)
    print(f"{len(devices)} devices with distinct budgets, batch sizes 4/8/16, "
          f"{len(ARCHITECTURES)} architectures of 12 blocks (width {widths}), seq {SEQ}")
    for menu in args.menus.split(","):
        ranks, recompute, frozen = MENUS[menu]
        settings = PlanSettings(lora_ranks=ranks, recompute=recompute, frozen=frozen, seq=SEQ, optimizer="adam")
        print(f"\nLoRA menu {list(ranks) or 'none'}, recompute {'on' if recompute else 'off'}, "
              f"frozen weights {', '.join(('fp32', *frozen))} (adam):")
        tables = [CostTable(spec, 8, SEQ, "adam", ranks, recompute=recompute) for spec in ARCHITECTURES]
        sizes = [len(compute_frontier(table)) for table in tables]
        _, one_frontier, one_cpu = cpu_timed(compute_frontier, tables[-1])
        print(f"  frontier sizes at batch 8: {sizes}; one frontier: {one_frontier * 1e3:.1f} ms "
              f"({one_cpu * 1e3:.1f} ms CPU)")
        clear_caches()  # a cold start: no table, frontier or layer costing of an earlier menu
        result, fleet_seconds, fleet_cpu = cpu_timed(plan, ARCHITECTURES, devices, settings)
        print(f"  fleet: {fleet_seconds:.2f} s ({fleet_cpu:.2f} s CPU) for {len(devices)} devices x "
              f"{len(ARCHITECTURES)} architectures ({fleet_seconds / len(devices) / len(ARCHITECTURES) * 1e6:.1f} us "
              f"per device-architecture); winner {result.winner}")
        for arch in result.architectures:
            print(f"    {arch.model}: {arch.mean_trained_blocks:.2f} blocks, {arch.mean_lora_blocks:.2f} LoRA blocks, "
                  f"{arch.infeasible_devices} infeasible; {arch.verdict}")
        recomputing = sum("recompute" in (entry.mode or "") for entry in result.devices)
        compact = sum("frozen:" in (entry.mode or "") for entry in result.devices)
        print(f"    {recomputing} of {len(devices)} devices recompute some block in {result.winner}'s plans, "
              f"{compact} hold frozen weights compact")
        for kept in (True, False):  # tables and frontiers kept from the fleet's plan, as in a service; or cold
            for specs in (ARCHITECTURES[-1:], ARCHITECTURES):
                cpu = np.array([single(specs, device, settings, kept)
                                for device in devices[:args.single]]) * 1e3
                print(f"  single device, {len(specs)} architecture(s), {'after the fleet' if kept else 'cold'}, CPU "
                      f"over the first {args.single} devices: median {np.median(cpu):.1f} ms, max {cpu.max():.1f} ms")
        if args.sample:
            check_against_ilp(result, devices, settings, args.sample, random.Random(args.seed))


if __name__ == "__main__":
    main()
