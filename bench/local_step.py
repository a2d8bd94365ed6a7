"""Does freezing a prefix really save time? Step time against predicted FLOPs, and engine overhead.

Part 1: for several plans of one model, the median wall time of a training step (no counters
attached) next to the estimate's FLOPs per step; the ratio (seconds per TFLOP) should be roughly
constant across plans if FLOPs are what costs time. Part 2: one federated round of the in-process
engine, its wall time against the sum of its clients' own local-training time (target: overhead
under 10%), evaluating the global model every round and every fifth round.

    python bench/local_step.py [--model char-gpt-m] [--batch 16] [--seq 80]
"""

import argparse
import statistics
import tempfile
import time

import torch

from costmodel import ZOO, TrainMode, apply_mode, build_model, estimate, make_batch, make_optimizer


def step_seconds(spec, mode, batch, seq, repeats=7) -> float:
    model = apply_mode(build_model(spec), mode)
    opt = make_optimizer(model.parameters(), "sgd")
    inputs, targets = make_batch(spec, batch, seq)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model(inputs, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def engine_overhead(eval_every: int, rounds: int = 5) -> tuple[float, float, float]:
    from planner.fleet import PlanSettings, plan
    from profiles import load_fleet
    from trainer.engine import TrainConfig, run

    devices = load_fleet("edge-mix").expand(40, seed=0)
    planned = plan([ZOO["char-gpt-s"]], devices, PlanSettings(seq=80, lora_ranks=(2, 4, 8)))
    with tempfile.TemporaryDirectory() as out:
        metrics = run(TrainConfig(task="shakespeare", rounds=rounds, clients_per_round=10, local_steps=4,
                                  pretrained=False, eval_every=eval_every), planned, out)
    later = metrics[1:]  # round 1 also pays one-off imports (peft) inside the clients' time
    return tuple(sum(m[key] for m in later) for key in ("seconds", "client_seconds", "eval_seconds"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="char-gpt-m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    spec = ZOO[args.model]
    n = spec.n_blocks
    print(f"{args.model}, batch {args.batch} x {args.seq} tokens, sgd, {torch.get_num_threads()} threads")
    print(f"{'plan':22s} {'GFLOP/step':>10s} {'ms/step':>8s} {'s per TFLOP':>11s}")
    for text in ["head", "last:1", f"last:{n // 2}", "all", "lora:8", f"blocks:0,{n - 1}"]:
        mode = TrainMode.parse(text, n)
        report = estimate(spec, mode, args.batch, args.seq)
        flops = report.totals["fwd_flops"] + report.totals["bwd_flops"]
        seconds = step_seconds(spec, mode, args.batch, args.seq)
        print(f"{text:22s} {flops / 1e9:10.2f} {seconds * 1e3:8.1f} {seconds / flops * 1e12:11.2f}")
    for eval_every in (1, 5):
        wall, clients, evaluation = engine_overhead(eval_every)
        print(f"engine, evaluating every {eval_every} round(s): rounds 2-5 of 10 clients x 4 steps took {wall:.1f} s, "
              f"clients' own local training {clients:.1f} s, the server's test evaluation {evaluation:.1f} s: "
              f"overhead {(wall - clients) / wall:.0%} of the wall time, {(wall - clients - evaluation) / wall:.0%} "
              "without evaluation")

if __name__ == "__main__":
    main()
