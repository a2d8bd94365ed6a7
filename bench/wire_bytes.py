"""Measured wire upload against the planned upload, per method: one round of every method, in process.

Each client's record holds ``upload_bytes`` (its reply's ArrayRecord as Flower serializes it,
`costmodel.wire.wire_bytes`; the Flower engines measure the same from Flower's own objects),
``predicted_upload_bytes`` (the plan's figure for its mode) and ``download_bytes``.

    python bench/wire_bytes.py [--devices 8] [--model char-gpt-xs]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from costmodel import ZOO
from planner.fleet import PlanSettings, plan
from profiles import load_fleet
from trainer.engine import TrainConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--model", default="char-gpt-xs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    planned = plan([ZOO[args.model]], load_fleet("edge-mix").expand(args.devices, seed=0),
                   PlanSettings(seq=80, lora_ranks=(2, 4, 8)))
    work = Path(tempfile.mkdtemp(prefix="caff-wire-bench-"))
    print("| method | mode | clients | upload (wire) B | planned upload B | wire / planned | download B |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method in ("caff", "lora", "fedra", "full", "head"):
        config = TrainConfig(task="shakespeare", method=method, rounds=1, clients_per_round=args.devices,
                             eval_samples=16, local_steps=1)
        rows: dict[tuple, list[dict]] = {}
        for client in run(config, planned, work / method)[0]["clients"]:
            if client["status"] == "trained":
                rows.setdefault((client["mode"], client["upload_bytes"], client["predicted_upload_bytes"],
                                 client["download_bytes"]), []).append(client)
        for (mode, upload, planned_upload, download), clients in rows.items():
            assert upload <= planned_upload, (method, mode)
            print(f"| {method} | `{mode}` | {len(clients)} | {upload:,} | {planned_upload:,} | "
                  f"{upload / planned_upload:.3f} | {download:,} |")


if __name__ == "__main__":
    main()
