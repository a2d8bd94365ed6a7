"""Round time on Flower against the in-process engine, for the same plan, seed and rounds, and
where a deployment round's time goes.

Runs one federated run three ways: in this process (`trainer.engine.run`), on Flower's
simulation engine (one virtual node per device) and on a real localhost deployment (a
``flower-superlink`` and one ``flower-supernode`` per device, TLS and SuperNode authentication,
driven by ``flwr run``). Prints each engine's wall time, its mean round time after round 1 (the
server's own clock, from sending the tasks to the checkpoint), the ratio to in-process and the
largest difference of the final global weights from the in-process engine's; then the
deployment's rounds split into stages, from the wall-clock and CPU times the ServerApp and every
ClientApp process record (`trainer.flower.timing`), and the CPU seconds all of the federation's
processes spend per round (read from the kernel with psutil every 0.5 s; finished processes
count through their parents). On a machine with C free cores a round cannot take less than
that CPU / C, plus Flower's polls.

    python bench/flower_rounds.py [--devices 4] [--rounds 3] [--model char-gpt-xs]
"""

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from costmodel import ZOO
from planner.fleet import PlanSettings, plan
from planner.planfile import write_plan_file
from profiles import load_fleet
from trainer.engine import TrainConfig, run
from trainer.flower import flwr_run, localhost_federation, run_simulation, write_run_file

CLIENT_STAGES = [  # (label, from, to): wall-clock marks a ClientApp process records
    ("message waits for its node (SuperNode's 3 s poll, SuperExec's poll, process spawn)", "sent", "process"),
    ("Python and Flower start, app bundle installed", "process", "module"),
    ("Flower loads the app and hands it the message", "module", "handler"),
    ("caff imports (torch, costmodel, engine)", "handler", "imported"),
    ("data shard (parsed on the node's first message, then read from its shard file)", "imported", "data"),
    ("local training and its records", "data", "trained"),
    ("reply: arrays serialized and measured", "trained", "replied"),
]


def federation_cpu(processes: list) -> float:
    """CPU seconds so far of a federation's processes and all their descendants, the finished
    (reaped) ones included: every ``flwr-clientapp``, ServerApp and SuperExec process."""
    import psutil

    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(process.pid)
            for member in [tree, *tree.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = member.cpu_times()
                    total += times.user + times.system + times.children_user + times.children_system
    return total


def sample_cpu(processes: list, samples: list, stop: threading.Event, every: float = 0.5) -> None:
    """Append (time, `federation_cpu`) to ``samples`` every ``every`` seconds until ``stop`` is set."""
    while not stop.wait(every):
        samples.append((time.time(), federation_cpu(processes)))


def cpu_between(samples: list, start: float, end: float) -> float:
    """Federation CPU seconds between two wall-clock times, from the samples nearest each."""
    def at(moment: float) -> float:
        return min(samples, key=lambda sample: abs(sample[0] - moment))[1]
    return at(end) - at(start)


def _round_seconds(out: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def breakdown(timings: Path, samples: list, first_round: int = 2) -> list[tuple[str, float]]:
    """Mean seconds of each stage over the rounds from ``first_round`` (clients: mean per message)."""
    lines = [json.loads(line) for line in timings.read_text().splitlines()]
    clients = [t for t in lines if t["who"] == "client" and t["round"] >= first_round]
    servers = [t for t in lines if t["who"] == "server" and t["round"] >= first_round]
    rows = [(label, statistics.mean(c[end] - c[start] for c in clients)) for label, start, end in CLIENT_STAGES]
    waits, sends = [], []
    for server in servers:
        mine = [c for c in clients if c["round"] == server["round"]]
        sends.append(min(c["sent"] for c in mine) - server["configured"])
        waits.append(server["replied"] - max(c["replied"] for c in mine))
    rows.insert(0, ("server: sample, plan and send the round's tasks", statistics.mean(sends)))
    rows.append(("last reply reaches the ServerApp (SuperNode's 3 s poll, ServerApp's 1 s poll)",
                 statistics.mean(waits)))
    rows.append(("server: aggregate, evaluate, checkpoint",
                 statistics.mean(s["finished"] - s["replied"] for s in servers)))
    rows.append(("round, the server's clock",
                 statistics.mean(s["finished"] - s["configured"] for s in servers)))
    rows.append(("CPU of every federation process in a round (SuperLink, SuperNodes, SuperExecs, ServerApp, "
                 "ClientApps)", statistics.mean(cpu_between(samples, s["configured"], s["finished"]) for s in servers)))
    rows.append(("CPU of a ClientApp process before caff's module (Python, Flower, app bundle)",
                 statistics.mean(c["cpu_module"] for c in clients)))
    rows.append(("CPU of a ClientApp process in caff's module (imports, data, training, reply)",
                 statistics.mean(c["cpu_replied"] - c["cpu_module"] for c in clients)))
    rows.append(("  of which caff's train handler (torch and caff imports, data, training, reply)",
                 statistics.mean(c["cpu_replied"] - c["cpu_handler"] for c in clients)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="char-gpt-xs")
    parser.add_argument("--engines", default="in-process,flower-sim,flower",
                        help="comma-separated; in-process always runs (the reference)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # every engine one thread per process: the same float sums everywhere
    os.environ.update({"OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"})
    devices = load_fleet("edge-mix").expand(args.devices, seed=0)
    planned = plan([ZOO[args.model]], devices, PlanSettings(seq=80, lora_ranks=(2, 4, 8)))
    config = TrainConfig(task="shakespeare", rounds=args.rounds, clients_per_round=args.devices, eval_samples=64)
    work = Path(tempfile.mkdtemp(prefix="caff-flower-bench-"))
    write_plan_file(work / "plan.json", planned)
    app_dir = Path(__file__).resolve().parents[1]
    samples = []  # (time, federation CPU seconds) while the deployment runs

    def run_file(name: str) -> str:
        return write_run_file(work / f"{name}.json", config, work / "plan.json", work / name)

    def deployment() -> None:
        os.environ["CAFF_FLOWER_TIMINGS"] = str(work / "timings.jsonl")
        stop = threading.Event()
        try:
            with localhost_federation(args.devices, work / "logs") as federation:
                threading.Thread(target=sample_cpu, args=(federation.processes, samples, stop), daemon=True).start()
                flwr_run(run_file("flower"), federation.address, app_dir, log_file=work / "flwr-run.log",
                         root_certificates=federation.root_certificates)
                stop.set()
        finally:
            del os.environ["CAFF_FLOWER_TIMINGS"]

    engines = {"in-process": lambda: run(config, planned, work / "in-process"),
               "flower-sim": lambda: run_simulation(run_file("flower-sim"), args.devices, app_dir, work / "sim-logs"),
               "flower": deployment}
    engines = {name: start for name, start in engines.items()
               if name == "in-process" or name in args.engines.split(",")}
    walls = {}
    for name, start in engines.items():
        started = time.perf_counter()
        start()
        walls[name] = time.perf_counter() - started
    reference = load_file(str(work / "in-process" / f"global-{args.rounds}.safetensors"))
    base = statistics.mean(_round_seconds(work / "in-process")[1:])
    print(f"\n{args.model}, {args.devices} edge-mix devices, all sampled, {args.rounds} rounds, "
          f"{sum(d.status == 'optimal' for d in planned.devices)} train; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'engine':12s} {'wall s':>8s} {'round s (2+)':>12s} {'x in-process':>12s} {'max |w - w_in-process|':>22s}")
    for name in engines:
        rounds = _round_seconds(work / name)
        weights = load_file(str(work / name / f"global-{args.rounds}.safetensors"))
        difference = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        mean = statistics.mean(rounds[1:])
        print(f"{name:12s} {walls[name]:8.1f} {mean:12.2f} {mean / base:12.1f} {difference:22.2e}")
    if "flower" not in engines:
        return
    print("\nwhere a deployment round goes (rounds 2+; client stages: mean per message, in parallel across nodes)")
    for label, seconds in breakdown(work / "timings.jsonl", samples):
        print(f"{seconds:7.2f} s  {label}")
    print(f"(runs and logs in {work})")


if __name__ == "__main__":
    main()
