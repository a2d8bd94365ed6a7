"""LoRA in every block against training only the last K blocks: what each costs on a device.

Prints a markdown table (the README's) per model: upload, saved activations, backward FLOPs
and peak memory of one step, from the analytic estimate (which tests check against
FlopCounterMode, saved-tensor hooks and a live-bytes tracker).

    python bench/lora_vs_suffix.py [--batch 16] [--seq 128] [--optimizer adam] [--rank 8]
"""

import argparse

from costmodel import ZOO, TrainMode, estimate
from profiles import format_bytes, format_flops


def rows(spec, batch: int, seq: int, optimizer: str, rank: int):
    modes = [f"lora:{rank}"] + [f"last:{k}" for k in range(spec.n_blocks + 1)]
    reports = {text: estimate(spec, TrainMode.parse(text, spec.n_blocks), batch, seq, optimizer) for text in modes}
    lora_upload = reports[modes[0]].totals["upload_bytes"]
    for text, report in reports.items():
        label = "head only" if text == "last:0" else text
        yield label, report, report.totals["upload_bytes"] <= lora_upload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--models", default="minilm-l6,char-gpt-m")
    args = parser.parse_args()
    for name in args.models.split(","):
        spec = ZOO[name]
        print(f"\n**{name}** ({spec.n_blocks} blocks, width {spec.d_model}), batch {args.batch} x "
              f"{spec.tokens_per_sample(args.seq)} tokens, {args.optimizer}, {spec.dtype}\n")
        print("| trains | upload | upload <= LoRA's | saved activations | backward FLOPs | peak memory |")
        print("|---|---:|:-:|---:|---:|---:|")
        for label, report, within in rows(spec, args.batch, args.seq, args.optimizer, args.rank):
            total = report.totals
            print(f"| {label} | {format_bytes(total['upload_bytes'])} | {'yes' if within else 'no'} | "
                  f"{format_bytes(total['activation_bytes'])} | {format_flops(total['bwd_flops'])} | "
                  f"{format_bytes(report.peak_bytes)} |")


if __name__ == "__main__":
    main()
