"""Every method under the same memory budgets, several seeds (the README's tables).

Fleets: three homogeneous fleets whose memory is 1/8, 1/4 and 1/2 of what full fine-tuning of
the task's reference model needs (batch 8 or --batch, sgd), with compute and upload generous so memory
binds; and the shipped heterogeneous `edge-mix` fleet. Each fleet is planned over the task's
pretrained candidates (Shakespeare: the char-GPT zoo xs, s, m, against char-gpt-s; Fashion-MNIST:
vit-tiny; fortunes: all-MiniLM-L6-v2); every method then runs the same rounds with the same seeds.

    python bench/method_study.py [--task shakespeare] [--rounds 6] [--clients 5] [--steps 8] [--lr 0.05]
        [--seeds 0,1] [--batch 8] [--eval-every 1] [--fleets 1/8,1/4,1/2,edge-mix] [--methods caff,lora,...] [--out study]
"""

import argparse
import statistics
from pathlib import Path

from costmodel import ZOO, TrainMode, estimate
from planner.fleet import PlanSettings, plan
from profiles import DeviceSpec, format_bytes, format_flops, load_fleet
from trainer.engine import TASK_SEQ, TrainConfig, run
from trainer.methods import METHODS

CANDIDATES = {"shakespeare": ["char-gpt-xs", "char-gpt-s", "char-gpt-m"], "fashion-mnist": ["vit-tiny"],
              "fortunes": ["minilm-l6"]}
REFERENCE = {"shakespeare": "char-gpt-s", "fashion-mnist": "vit-tiny", "fortunes": "minilm-l6"}


def fleets(task: str, n_devices: int, batch: int) -> dict[str, list[DeviceSpec]]:
    reference = ZOO[REFERENCE[task]]
    full = estimate(reference, TrainMode.parse("all", reference.n_blocks), batch, TASK_SEQ[task]).peak_bytes
    out = {}
    for label, share in (("1/8", 8), ("1/4", 4), ("1/2", 2)):
        device = DeviceSpec(name=f"mem-{share}", memory_bytes=full // share, compute_flops=1e13, upload_bytes=10**9,
                            local_steps=4, batch_size=batch)
        out[label] = [device.model_copy(update={"name": f"mem-{share}#{i}"}) for i in range(n_devices)]
    out["edge-mix"] = load_fleet("edge-mix").expand(n_devices, seed=0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="shakespeare", choices=sorted(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the homogeneous fleets' devices")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--fleets", default="1/8,1/4,1/2,edge-mix", help="a subset of 1/8, 1/4, 1/2, edge-mix")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="study")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.task}: {args.rounds} rounds x {args.clients} clients x {args.steps} local steps (sgd, lr {args.lr}), "
          f"seeds {seeds}; final test accuracy and loss: mean (min..max over seeds)\n")
    print("| fleet | method | model | trained clients/round | accuracy | loss | uploaded | client FLOPs |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    chosen = args.fleets.split(",")
    for fleet_name, devices in fleets(args.task, args.devices, args.batch).items():
        if fleet_name not in chosen:
            continue
        planned = plan([ZOO[name] for name in CANDIDATES[args.task]], devices,
                       PlanSettings(seq=TASK_SEQ[args.task], lora_ranks=(2, 4, 8, 16)))
        for method in args.methods.split(","):
            finals = []
            for seed in seeds:
                out = Path(args.out) / fleet_name.replace(" ", "_").replace("/", "-") / f"{method}-{seed}"
                config = TrainConfig(task=args.task, method=method, rounds=args.rounds,
                                     clients_per_round=args.clients, local_steps=args.steps, lr=args.lr,
                                     seed=seed, eval_every=args.eval_every)
                try:
                    finals.append(run(config, planned, out, resume=(out / "state.json").exists()))
                except ValueError as why:  # e.g. smallest: no architecture every device can train
                    print(f"| {fleet_name} | {method} | - | - | {why} | | | |", flush=True)
                    break
            if len(finals) < len(seeds):
                continue
            acc = [m[-1]["test_accuracy"] for m in finals]
            loss = [m[-1]["test_loss"] for m in finals]
            trained = statistics.mean(sum(c["status"] == "trained" for c in r["clients"]) for m in finals for r in m)
            print(f"| {fleet_name} | {method} | {finals[0][0]['model']} | {trained:.1f} | "
                  f"{statistics.mean(acc):.3f} ({min(acc):.3f}..{max(acc):.3f}) | "
                  f"{statistics.mean(loss):.3f} ({min(loss):.3f}..{max(loss):.3f}) | "
                  f"{format_bytes(statistics.mean(sum(r['uploaded_bytes'] for r in m) for m in finals))} | "
                  f"{format_flops(statistics.mean(sum(r['flops'] for r in m) for m in finals))} |", flush=True)


if __name__ == "__main__":
    main()
