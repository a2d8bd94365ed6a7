"""How well the analytic estimate agrees with measurement, and how long it takes.

Draws N random configurations (costmodel.sampling: 1-12 blocks, width 32-512, sequence 1-256,
batch 1-64, every training mode, LoRA ranks 1-64, fp32/bf16, matmul/SDPA attention), measures
each on the CPU, and prints the distribution of relative errors of forward FLOPs, backward
FLOPs, saved activation bytes and peak memory, and of forward FLOPs against fvcore's
FlopCountAnalysis, a second counter (on matmul-attention configurations: fvcore counts SDPA as 0);
then the time of one analytic estimate per block, uncached (every layer cost computed afresh)
and cached (as the planner calls it).

    python bench/costmodel_fidelity.py [--n 100] [--seed 0] [--recompute] [--frozen]

``--recompute`` recomputes a random non-empty subset of each configuration's trained blocks;
``--frozen`` holds each configuration's frozen linear weights compact (``frozen:int8`` or ``frozen:bf16``).
"""

import argparse
import random
import statistics
import time
import warnings

from costmodel import ZOO, TrainMode, estimate, measure
from costmodel.estimate import layer_cost
from costmodel.sampling import random_config

KEYS = ("fwd_flops", "bwd_flops", "activation_bytes", "peak_bytes")
FVCORE = "fwd_flops (fvcore)"


def errors(n: int, seed: int, recompute: bool = False, frozen: bool = False) -> dict[str, list[float]]:
    rng = random.Random(seed)
    found = {key: [] for key in (*KEYS, FVCORE)}
    for index in range(n):
        spec, mode, batch, seq, optimizer = random_config(rng, recompute, frozen)
        report, measured = estimate(spec, mode, batch, seq, optimizer), measure(spec, mode, batch, seq, optimizer)
        predicted = {**report.totals, "peak_bytes": report.peak_bytes}
        for key, seen in measured.total().items():
            if key in found:
                found[key].append((predicted[key] - seen) / seen if seen else float(predicted[key] != seen))
        if spec.attention == "matmul":
            found[FVCORE].append(predicted["fwd_flops"] / measured.fvcore_fwd_flops - 1)
        print(f"\r{index + 1}/{n} configurations measured", end="", flush=True)
    print()
    return found


def estimate_time_per_block(repeats: int = 50) -> tuple[float, float]:
    spec = ZOO["char-gpt-l"]
    modes = [TrainMode.parse(text, spec.n_blocks) for text in ("all", "last:3", "lora:8", "blocks:2,7+lora:0=4")]
    start = time.perf_counter()
    for index in range(repeats):
        layer_cost.cache_clear()
        for mode in modes:
            estimate(spec, mode, 16 + index, 64)
    uncached = (time.perf_counter() - start) / (repeats * len(modes) * spec.n_blocks)
    start = time.perf_counter()
    for _ in range(repeats):
        for mode in modes:
            estimate(spec, mode, 16, 64)
    cached = (time.perf_counter() - start) / (repeats * len(modes) * spec.n_blocks)
    return uncached, cached


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recompute", action="store_true", help="recompute some trained blocks of each")
    parser.add_argument("--frozen", action="store_true", help="hold frozen linear weights in int8 or bf16")
    args = parser.parse_args()
    found = errors(args.n, args.seed, args.recompute, args.frozen)
    print(f"relative error (predicted - measured) / measured over {args.n} configurations "
          f"({len(found[FVCORE])} with matmul attention for fvcore)")
    print(f"{'quantity':19s} {'exact':>7s} {'|e|<=1%':>8s} {'|e|<=5%':>8s} {'median':>8s} {'p95 |e|':>8s} {'max |e|':>8s}")
    for key, values in found.items():
        magnitudes = sorted(abs(v) for v in values)
        share = lambda bound: sum(m <= bound for m in magnitudes) / len(magnitudes)  # noqa: E731
        print(f"{key:19s} {share(0):7.0%} {share(0.01):8.0%} {share(0.05):8.0%} {statistics.median(values):+8.2%} "
              f"{magnitudes[int(0.95 * (len(magnitudes) - 1))]:8.2%} {magnitudes[-1]:8.2%}")
    uncached, cached = estimate_time_per_block()
    print(f"analytic estimate per block: {uncached * 1e6:.0f} us uncached, {cached * 1e6:.1f} us cached "
          f"(char-gpt-l, 12 blocks, 4 modes)")


if __name__ == "__main__":
    main()
