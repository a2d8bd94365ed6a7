"""What compact frozen weights save: one step's tensor peak with frozen linear weights in the model's
fp32, in bf16 and in int8, predicted (`costmodel.estimate`) and measured (`costmodel.measure`: live
tensor bytes of a real step), for head-only and last-block training.

    python bench/compact_frozen.py [--optimizer sgd]

Shapes: char-gpt-xs at batch 8 x 80 characters (Shakespeare), minilm-l6 at batch 8 x 64 tokens (fortunes).
"""

import argparse
import warnings

from costmodel import ZOO, TrainMode, estimate, measure
from profiles import format_bytes

CASES = (("char-gpt-xs", 8, 80), ("minilm-l6", 8, 64))
FORMATS = ("", "+frozen:bf16", "+frozen:int8")


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    args = parser.parse_args()
    print("| model | batch x seq | trains | frozen weights | weights | peak predicted | peak measured | error |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for name, batch, seq in CASES:
        spec = ZOO[name]
        for trains in ("head", "last:1"):
            for fmt in FORMATS:
                mode = TrainMode.parse(trains + fmt, spec.n_blocks)
                report = estimate(spec, mode, batch, seq, args.optimizer)
                measured = measure(spec, mode, batch, seq, args.optimizer).peak_bytes
                print(f"| {name} | {batch} x {seq} | {trains} | {fmt.rpartition(':')[2] or spec.dtype} | "
                      f"{format_bytes(report.totals['param_bytes'])} | {format_bytes(report.peak_bytes)} | "
                      f"{format_bytes(measured)} | {report.peak_bytes / measured - 1:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
