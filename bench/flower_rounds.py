"""Round time on Flower against the in-process engine, for the same plan, seed and rounds, and
where a deployment round's time goes.

Runs one federated run three ways: in this process (`trainer.engine.run`), on Flower's
simulation engine (one virtual node per device) and on a real localhost deployment (a
``flower-superlink`` and one ``flower-supernode`` per device, TLS and SuperNode authentication,
driven by ``flwr run``; each node trains in its training worker, `trainer.nodeworker`); and
Flower's own floor: the same federation and ServerApp grid with a ClientApp that sends back the
arrays it received (``flower-floor``, `bench/flower_floor_app`). Prints each engine's wall time,
its mean round time after round 1 (the server's own clock, from sending the tasks to the
checkpoint), the ratio to in-process and the largest difference of the final global weights from
the in-process engine's; then the deployment's rounds split into stages, from the wall-clock and
CPU times the ServerApp, every ClientApp process and the nodes' workers record
(`trainer.flower.timing`), and the CPU seconds all of the federation's processes and workers
spend per round (read from the kernel with psutil every 0.5 s; finished processes count through
their parents). On a machine with C free cores a round cannot take less than that CPU / C, plus
Flower's polls. Last, the nodes' process memory: each worker's measured peak against the runtime
profile's prediction, the ClientApp shim's, and the SuperNodes' (with their SuperExecs).

    python bench/flower_rounds.py [--devices 4] [--rounds 3] [--model char-gpt-xs] [--engines ...]
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
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

CLIENT_STAGES = [  # (label, from, to): wall-clock marks a ClientApp process and its node's worker record
    ("message waits for its node (SuperNode's 3 s poll, SuperExec's poll, process spawn)", "sent", "process"),
    ("Python and Flower start, app bundle installed", "process", "module"),
    ("Flower loads the app and hands it the message", "module", "handler"),
    ("ClientApp hands the task and arrays to the node's worker (which is busy with nothing else)",
     "handler", "received"),
    ("worker: data shard (parsed on the node's first message, then in memory)", "received", "data"),
    ("worker: local training and its records", "data", "trained"),
    ("reply: arrays back to the ClientApp, wrapped, serialized and measured", "trained", "replied"),
]


def federation_cpu(processes: list, folders: Path) -> float:
    """CPU seconds so far of a federation's processes and all their descendants, the finished
    (reaped) ones included (every ``flwr-clientapp``, ServerApp and SuperExec process), and of the
    nodes' training workers (`trainer.nodeworker`: a ``worker.pid`` in a node folder under ``folders``)."""
    import psutil

    pids = {process.pid for process in processes} | {int(path.read_text()) for path in folders.glob("*/worker.pid")}
    members = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(pid)
            members |= {member.pid: member for member in [tree, *tree.children(recursive=True)]}
    total = 0.0
    for member in members.values():
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def sample_cpu(processes: list, folders: Path, samples: list, stop: threading.Event, every: float = 0.5) -> None:
    """Append (time, `federation_cpu`) to ``samples`` every ``every`` seconds until ``stop`` is set."""
    while not stop.wait(every):
        samples.append((time.time(), federation_cpu(processes, folders)))


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
    rows.append(("CPU of a ClientApp process in caff's module (the shim: hand over, wrap, serialize)",
                 statistics.mean(c["cpu_replied"] - c["cpu_module"] for c in clients)))
    rows.append(("CPU of the node's worker per message (data, training, reply)",
                 statistics.mean(c["worker_cpu"] for c in clients)))
    return rows


def node_memory(processes: list, folders: Path) -> dict[str, list[int]]:
    """Resident bytes now of each SuperNode with its SuperExec, and of each node's training worker."""
    import psutil

    def rss(pid: int, children: bool = False) -> int:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            members = [process, *(process.children() if children else [])]
            return sum(m.memory_info().rss for m in members if "clientapp" not in " ".join(m.cmdline()))
        return 0
    return {"SuperNode and its SuperExec": [rss(p.pid, children=True) for p in processes[1:]],
            "training worker": [rss(int(path.read_text())) for path in folders.glob("*/worker.pid")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="char-gpt-xs")
    parser.add_argument("--engines", default="in-process,flower-sim,flower,flower-floor",
                        help="comma-separated; in-process always runs (the reference); flower-floor: Flower's "
                             "own floor, a ClientApp that echoes caff's arrays (bench/flower_floor_app); "
                             "flower-floor-packed: the same bytes as one array")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a timeout's SIGTERM still ends the federation
    torch.set_num_threads(1)  # every engine one thread per process: the same float sums everywhere
    os.environ.update({"OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"})
    devices = load_fleet("edge-mix").expand(args.devices, seed=0)
    planned = plan([ZOO[args.model]], devices, PlanSettings(seq=80, lora_ranks=(2, 4, 8)))
    config = TrainConfig(task="shakespeare", rounds=args.rounds, clients_per_round=args.devices, eval_samples=64)
    work = Path(tempfile.mkdtemp(prefix="caff-flower-bench-"))
    write_plan_file(work / "plan.json", planned)
    app_dir = Path(__file__).resolve().parents[1]
    samples, memory = [], {}  # (time, federation CPU seconds) while the deployment runs; its processes' bytes

    def run_file(name: str) -> str:
        return write_run_file(work / f"{name}.json", config, work / "plan.json", work / name)

    def deployment() -> None:
        os.environ["CAFF_FLOWER_TIMINGS"] = str(work / "timings.jsonl")
        stop, folders = threading.Event(), work / "logs" / "flwr-home" / "caff-nodes"
        try:
            with localhost_federation(args.devices, work / "logs") as federation:
                threading.Thread(target=sample_cpu, args=(federation.processes, folders, samples, stop),
                                 daemon=True).start()
                flwr_run(run_file("flower"), federation.address, app_dir, log_file=work / "flwr-run.log",
                         root_certificates=federation.root_certificates)
                stop.set()
                memory.update(node_memory(federation.processes, folders))
        finally:
            del os.environ["CAFF_FLOWER_TIMINGS"]

    def floor(packed: bool) -> None:
        name = "flower-floor" + ("-packed" if packed else "")
        (work / name).mkdir()
        with localhost_federation(args.devices, work / f"{name}-logs") as federation:
            flwr_run(str(work / name / "rounds.jsonl"), federation.address, app_dir / "bench" / "flower_floor_app",
                     log_file=work / f"{name}.log", root_certificates=federation.root_certificates,
                     run_config={"nodes": args.devices, "rounds": args.rounds, "packed": packed,
                                 "arrays": str(work / "in-process" / f"global-{args.rounds}.safetensors")})

    engines = {"in-process": lambda: run(config, planned, work / "in-process"),
               "flower-sim": lambda: run_simulation(run_file("flower-sim"), args.devices, app_dir, work / "sim-logs"),
               "flower": deployment, "flower-floor": lambda: floor(False), "flower-floor-packed": lambda: floor(True)}
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
    print(f"{'engine':20s} {'wall s':>8s} {'round s (2+)':>12s} {'x in-process':>12s} {'max |w - w_in-process|':>22s}")
    for name in engines:
        if name.startswith("flower-floor"):  # a trivial ClientApp: its own clock, no weights to compare
            rounds = [json.loads(line) for line in (work / name / "rounds.jsonl").read_text().splitlines()]
            mean = statistics.mean(r["finished"] - r["started"] for r in rounds[1:])
            print(f"{name:20s} {walls[name]:8.1f} {mean:12.2f} {mean / base:12.1f} {'(echoes its arrays)':>22s}")
            continue
        weights = load_file(str(work / name / f"global-{args.rounds}.safetensors"))
        difference = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        mean = statistics.mean(_round_seconds(work / name)[1:])
        print(f"{name:20s} {walls[name]:8.1f} {mean:12.2f} {mean / base:12.1f} {difference:22.2e}")
    if "flower" not in engines:
        return
    print("\nwhere a deployment round goes (rounds 2+; client stages: mean per message, in parallel across nodes)")
    for label, seconds in breakdown(work / "timings.jsonl", samples):
        print(f"{seconds:7.2f} s  {label}")
    print("\nprocess memory on the deployment's nodes, MiB (last round; each worker's peak resident set, measured,"
          " against the runtime profile's prediction)")
    last = json.loads((work / "flower" / "metrics.jsonl").read_text().splitlines()[-1])
    for client in (c for c in last["clients"] if c["status"] == "trained"):
        print(f"  {client['device']:24s} worker {client['process_bytes'] / 2**20:7.1f} (USS "
              f"{client.get('process_uss_bytes', 0) / 2**20:6.1f})  "
              f"predicted {client['predicted_process_bytes'] / 2**20:7.1f}"
              f"  ({client['process_bytes'] / client['predicted_process_bytes'] - 1:+.1%})"
              f"  ClientApp shim {client['clientapp_bytes'] / 2**20:6.1f}")
    for what, sizes in memory.items():
        print(f"  {what} at the run's end: " + ", ".join(f"{size / 2**20:.1f}" for size in sizes))
    print(f"(runs and logs in {work})")


if __name__ == "__main__":
    main()
