"""Each catalogue device's plan for a zoo model, predicted against measured memory (README table).

For every catalogue device (all run PyTorch), plan the first of MODELS on which the device is
feasible, with its own batch size and the LoRA menu off, and run the plan as `caff validate` does:
in a fresh process through `trainer.local.local_train`. Prints a Markdown table: the budget, the
tensor peak and the process peak (VmHWM), predicted and measured, and the process error.

    python bench/device_memory.py [--models char-gpt-s,char-gpt-xs] [--shard-bytes 1MiB]
"""

from __future__ import annotations

import argparse

from costmodel import load_spec
from planner.fleet import PlanSettings, plan
from profiles import catalogue_devices, format_bytes, parse_bytes
from trainer.validate import validate_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="char-gpt-s,char-gpt-xs", help="zoo models, tried in order")
    parser.add_argument("--shard-bytes", default="1MiB", help="data each device holds (default 1MiB)")
    args = parser.parse_args()
    settings = PlanSettings(shard_bytes=parse_bytes(args.shard_bytes))
    specs = [load_spec(name) for name in args.models.split(",")]
    print("| device | model | plan | batch | memory budget | tensor peak predicted | measured | "
          "process predicted | measured (VmHWM) | process error |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, device in catalogue_devices().items():
        entries = [plan([spec], [device], settings) for spec in specs]
        result = next((p for p in entries if p.devices[0].status == "optimal"), entries[-1])
        entry = result.devices[0]
        if entry.status != "optimal":
            print(f"| {name} | {entry.model} | infeasible: needs {format_bytes(entry.needs.memory_bytes)} | "
                  f"{device.batch_size} | {format_bytes(device.memory_bytes)} | | | | | |")
            continue
        row = validate_plan(result, "cpu")[0]
        error = (row["process_predicted"] - row["process_measured"]) / row["process_measured"]
        print(f"| {name} | {entry.model} | {entry.mode} | {row['batch']} | {format_bytes(row['memory_budget'])} | "
              f"{format_bytes(row['peak_predicted'])} | {format_bytes(row['peak_measured'])} | "
              f"{format_bytes(row['process_predicted'])} | {format_bytes(row['process_measured'])} | "
              f"{error:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
