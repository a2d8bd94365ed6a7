"""Round time on Flower against the in-process engine, for the same plan, seed and rounds.

Runs one federated run three ways: in this process (`trainer.engine.run`), on Flower's
simulation engine (Ray, one virtual node per device) and on a real localhost deployment (a
``flower-superlink`` and one ``flower-supernode`` per device, driven by ``flwr run``). Prints
each engine's wall time, its mean round time after round 1 (the server's own clock, from
sending the tasks to the checkpoint) and the ratio to in-process, and the largest difference
of the final global weights from the in-process engine's.

    OMP_NUM_THREADS=1 python bench/flower_rounds.py [--devices 4] [--rounds 3] [--model char-gpt-xs]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from costmodel import ZOO
from planner.fleet import PlanSettings, plan
from planner.planfile import write_plan_file
from profiles import load_fleet
from trainer.engine import TrainConfig, run
from trainer.flower import flwr_run, localhost_federation, run_simulation, write_run_file


def _round_seconds(out: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="char-gpt-xs")
    args = parser.parse_args()
    devices = load_fleet("edge-mix").expand(args.devices, seed=0)
    planned = plan([ZOO[args.model]], devices, PlanSettings(seq=80, lora_ranks=(2, 4, 8)))
    config = TrainConfig(task="shakespeare", rounds=args.rounds, clients_per_round=args.devices, eval_samples=64)
    work = Path(tempfile.mkdtemp(prefix="caff-flower-bench-"))
    write_plan_file(work / "plan.json", planned)
    app_dir = Path(__file__).resolve().parents[1]

    def run_file(name: str) -> str:
        return write_run_file(work / f"{name}.json", config, work / "plan.json", work / name)

    def deployment() -> None:
        with localhost_federation(args.devices, work / "logs") as federation:
            flwr_run(run_file("flower"), federation.address, app_dir, log_file=work / "flwr-run.log",
                     root_certificates=federation.root_certificates)

    engines = {"in-process": lambda: run(config, planned, work / "in-process"),
               "flower-sim": lambda: run_simulation(run_file("flower-sim"), args.devices),
               "flower": deployment}
    walls = {}
    for name, start in engines.items():
        started = time.perf_counter()
        start()
        walls[name] = time.perf_counter() - started
    reference = load_file(str(work / "in-process" / f"global-{args.rounds}.safetensors"))
    base = statistics.mean(_round_seconds(work / "in-process")[1:])
    print(f"\n{args.model}, {args.devices} edge-mix devices, all sampled, {args.rounds} rounds, "
          f"{sum(d.status == 'optimal' for d in planned.devices)} train")
    print(f"{'engine':12s} {'wall s':>8s} {'round s (2+)':>12s} {'x in-process':>12s} {'max |w - w_in-process|':>22s}")
    for name in engines:
        rounds = _round_seconds(work / name)
        weights = load_file(str(work / name / f"global-{args.rounds}.safetensors"))
        difference = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        mean = statistics.mean(rounds[1:])
        print(f"{name:12s} {walls[name]:8.1f} {mean:12.2f} {mean / base:12.1f} {difference:22.2e}")
    print(f"(runs and logs in {work})")


if __name__ == "__main__":
    main()
