"""``caff validate``, ``caff train``, ``caff report`` and ``caff demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from profiles import format_bytes, format_flops, read_json_object

#: the demo's SGD learning rates. Plain SGD at 0.1 on char-gpt-xs's lowest blocks takes the pretrained model from
#: 38.5 % to 15 % test accuracy in two steps of batch 16 (the top blocks take 0.1 to 0.3), so methods that train
#: every block get 0.03, as the accuracy study's tuning on the validation set chooses for them (study/shakespeare)
DEMO_LR = {"caff": 0.03, "lora": 0.1, "full": 0.03}


def add_parser(subparsers) -> dict:
    validate = subparsers.add_parser("validate", help="run each distinct plan of a plan file for real and compare")
    validate.add_argument("plan", help="plan file written by caff plan")
    validate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present, and cpu)")
    validate.add_argument("--json", action="store_true", help="print the rows as JSON")

    train = subparsers.add_parser("train", help="federated rounds in which every device executes its plan")
    train.add_argument("--config", help="JSON file with the fields below (flags override it)")
    train.add_argument("--task", choices=["shakespeare", "fortunes", "fashion-mnist"])
    train.add_argument("--method", choices=["caff", "lora", "full", "head", "fedra", "smallest"])
    train.add_argument("--plan", help="plan file (caff plan); or give --fleet and --model to plan here")
    train.add_argument("--fleet", help="fleet name or file, planned with --model")
    train.add_argument("--model", help="candidate architectures, comma-separated (with --fleet)")
    train.add_argument("--fleet-size", type=int, default=100, help="devices drawn from a fleet given by shares")
    train.add_argument("--rounds", type=int)
    train.add_argument("--clients-per-round", type=int)
    train.add_argument("--local-steps", type=int, help="default: each device's planned local steps")
    train.add_argument("--lr", type=float, help="SGD learning rate per step (default 0.01)")
    train.add_argument("--lora-scale", type=float, help="LoRA's alpha / rank for every adapter (default 2)")
    train.add_argument("--seed", type=int)
    train.add_argument("--drop-rate", type=float, help="chance that a sampled device fails mid-round")
    train.add_argument("--eval-every", type=int, help="evaluate the global model every N rounds (and after the last)")
    train.add_argument("--eval-samples", type=int,
                       help="test samples the server evaluates on (default: the task's whole test set)")
    train.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    train.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoints)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--engine", choices=["local", "flower-sim", "flower"], default="local",
                       help="local: this process; flower-sim: Flower's simulation engine, one virtual node per "
                            "device; flower: a running Flower SuperLink (--superlink) and its SuperNodes")
    train.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's address (--engine flower)")
    train.add_argument("--root-certificates", help="CA certificate the SuperLink's TLS certificate is signed by "
                                                   "(--engine flower; caff certs makes one)")
    train.add_argument("--insecure", action="store_true",
                       help="connect to the SuperLink without TLS (--engine flower; only on a trusted network)")
    train.add_argument("--round-timeout", type=float, default=600.0,
                       help="seconds a Flower round waits for replies before it goes on without them")

    report = subparsers.add_parser("report", help="compare runs: a table and accuracy plots (PNG)")
    report.add_argument("runs", nargs="+", help="run directories")
    report.add_argument("-o", "--output", default="report.png", help="plot file (default report.png)")

    demo = subparsers.add_parser("demo", help="plan a shipped fleet, validate its plans, and train caff, LoRA and full "
                                              "fine-tuning on Shakespeare from the English-pretrained char-gpt-xs")
    demo.add_argument("--fleet", default="edge-mix", help="shipped fleet name or file (default edge-mix)")
    demo.add_argument("--rounds", type=int, default=20)
    demo.add_argument("--batch", type=int, default=16, help="samples per step on every device (default 16: memory "
                                                           "binds on the Raspberry Pi Zero 2 W nodes)")
    demo.add_argument("--lr", type=float, default=None,
                      help="SGD learning rate of every method (default: each method's, " +
                           ", ".join(f"{m} {lr:g}" for m, lr in DEMO_LR.items()) + ")")
    demo.add_argument("--eval-samples", type=int, default=500, help="test samples evaluated each round")
    demo.add_argument("--central-steps", type=int, default=150,
                      help="AdamW steps of the centralized full fine-tuning that gives the upper bound")
    demo.add_argument("--out", default="demo-runs")
    return {"validate": run_validate, "train": run_train, "report": run_report, "demo": run_demo}


def run_validate(args) -> int:
    from planner.planfile import read_plan_file
    from trainer.validate import validate_plan

    plan = read_plan_file(args.plan)
    rows = validate_plan(plan, args.device)
    verdict = 0 if all(row["within_budget"] for row in rows) else 1
    if args.json:
        print(json.dumps(rows, indent=1))
        return verdict
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.plan}: predicted and measured, per distinct plan, each in a fresh process")
    for column in ("model", "mode", "batch", "devices", "tensor peak predicted", "tensor peak measured",
                   "process predicted", "process measured (peak RSS)", "USS at end", "memory budget",
                   "FLOPs/round predicted", "FLOPs/round measured", "upload", "verdict"):
        table.add_column(column, justify="left" if column in ("model", "mode", "verdict") else "right")
    shown = lambda value: "-" if value is None else format_bytes(value)  # noqa: E731
    for row in rows:
        table.add_row(row["model"], row["mode"], str(row["batch"]), str(row["devices"]),
                      format_bytes(row["peak_predicted"]), format_bytes(row["peak_measured"]),
                      format_bytes(row["process_predicted"]), shown(row["process_measured"]), shown(row["uss"]),
                      format_bytes(row["memory_budget"]), format_flops(row["flops_predicted"]),
                      format_flops(row["flops_measured"]), format_bytes(row["upload"]),
                      "ok" if row["within_budget"] else "OVER BUDGET")
    Console(width=220).print(table)
    return verdict


def _train_config(args):
    from trainer.engine import TrainConfig

    fields = read_json_object(args.config, "config") if args.config else {}
    for key in ("task", "method", "rounds", "clients_per_round", "local_steps", "lr", "lora_scale", "seed",
                "drop_rate", "eval_every", "eval_samples"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.no_pretrained:
        fields["pretrained"] = False
    plan_source = {k: fields.pop(k, None) for k in ("plan", "fleet", "model")}
    for key in plan_source:
        plan_source[key] = getattr(args, key) or plan_source[key]
    from pydantic import ValidationError

    from profiles import one_line_validation_error
    try:
        return TrainConfig(**fields), plan_source
    except ValidationError as exc:
        raise ValueError(one_line_validation_error(exc)) from None


def _plan_for(source: dict, fleet_size: int, seed: int, task: str, batch: int | None = None):
    from planner.planfile import read_plan_file

    if source["plan"]:
        return read_plan_file(source["plan"])
    if not (source["fleet"] and source["model"]):
        raise ValueError("give --plan, or --fleet with --model")
    from costmodel import load_spec
    from planner.fleet import PlanSettings, plan
    from profiles import load_fleet
    from trainer.engine import TASK_SEQ

    fleet = load_fleet(source["fleet"])
    devices = fleet.expand(fleet_size if fleet.uses_shares else None, seed=seed)
    return plan([load_spec(m) for m in source["model"].split(",")], devices,
                PlanSettings(seq=TASK_SEQ[task], lora_ranks=(2, 4, 8, 16), batch=batch))


def run_train(args) -> int:
    config, source = _train_config(args)
    plan = _plan_for(source, args.fleet_size, config.seed, config.task)
    if source["plan"]:  # a plan file made for another run is refused naming the file
        from trainer.engine import planned_for

        try:
            planned_for(config, plan)
        except ValueError as why:
            raise ValueError(f"{source['plan']}: {why}") from None
    if args.engine != "flower":  # steps run on this machine
        from trainer.validate import check_smallest_steps_fit

        check_smallest_steps_fit(plan)
    if args.engine == "local":
        from rich.progress import Progress

        from trainer.engine import run

        with Progress(transient=True) as bar:
            task = bar.add_task(f"{config.method}: rounds x clients", total=config.rounds * config.clients_per_round)
            metrics = run(config, plan, args.out, resume=args.resume, progress=lambda n: bar.advance(task, n))
    else:
        metrics = _run_on_flower(args, config, plan)
    over = _print_rounds(metrics)
    if over:
        print(f"caff: error: {len(over)} device(s) went over their memory budget: {', '.join(sorted(over)[:5])}",
              file=sys.stderr)
        return 1
    return 0


def _run_on_flower(args, config, plan) -> list[dict]:
    """Write the run file (and the plan) into --out and run it on Flower; the metrics the server wrote."""
    from planner.planfile import write_plan_file
    from trainer.rundir import load_run, plan_digest

    if args.engine == "flower" and bool(args.root_certificates) == bool(args.insecure):
        raise ValueError("--engine flower: give --root-certificates CA (TLS; caff certs makes one) or --insecure")
    out = Path(args.out).resolve()
    load_run(config, plan_digest(plan), None, out, args.resume)  # refuse before Flower starts, not inside its ServerApp
    out.mkdir(parents=True, exist_ok=True)
    write_plan_file(out / "plan.json", plan)
    try:
        from trainer.flower import flwr_run, run_simulation, write_run_file
    except ImportError:
        raise ValueError("--engine flower needs Flower: pip install 'caff-fl[flower]'") from None
    run_file = write_run_file(out / "flower-run.json", config, out / "plan.json", out, args.resume, args.round_timeout)
    app_dir = Path(__file__).resolve().parents[1]
    if not (app_dir / "pyproject.toml").is_file():
        raise ValueError(f"--engine {args.engine} runs the Flower app of a source checkout; {app_dir} is not one")
    if args.engine == "flower-sim":
        run_simulation(run_file, len(plan.devices), app_dir, out / "flower-sim")
    else:
        flwr_run(run_file, args.superlink, app_dir, log_file=out / "flwr-run.log",
                 root_certificates=args.root_certificates)
    saved = load_run(config, plan_digest(plan), None, out, True)
    if saved is None or saved[1] <= config.rounds:
        log = out / ("flower-sim" if args.engine == "flower-sim" else "") / "flwr-run.log"
        raise ValueError(f"the Flower run stopped before round {config.rounds} (see {log} and Flower's output)")
    return saved[2]


def _print_rounds(metrics: list[dict]) -> set[str]:
    """Print one line per round; the devices that went over their memory budget in any round."""
    over_any = set()
    for m in metrics:
        trained = [c for c in m["clients"] if c["status"] == "trained"]
        over = [c["device"] for c in trained if c["peak_bytes"] > c["memory_budget_bytes"]]
        over_any.update(over)
        tested = (f"test loss {m['test_loss']:.3f}  accuracy {m['test_accuracy']:.3f}" if m["test_loss"] is not None
                  else "(not evaluated this round)")
        rejected = f", {len(m['rejected'])} update(s) rejected" if m["rejected"] else ""
        print(f"round {m['round']:3d}  {m['method']:8s} {tested}  trained {len(trained)}/{len(m['clients'])}"
              f"{rejected}  upload {format_bytes(m['uploaded_bytes'])}  {format_flops(m['flops'])}  "
              f"{m['seconds']:.1f} s" + (f"  OVER MEMORY BUDGET: {', '.join(over)}" if over else ""))
    return over_any


def run_report(args) -> int:
    from trainer.report import load_runs, plot_runs, summary_rows

    runs = load_runs(args.runs)
    for row in summary_rows(runs):
        print(row)
    plot_runs(runs, args.output)
    print(f"plot written to {args.output}", file=sys.stderr)
    return 0


def run_demo(args) -> int:
    """Plan a shipped fleet for char-gpt-xs, validate its plans, train caff, LoRA and full fine-tuning on
    Shakespeare under the same budgets, and plot them against the pretrained model and the upper bound."""
    from types import SimpleNamespace

    from costmodel import ZOO
    from planner.planfile import write_plan_file
    from profiles.atomic import atomic_write
    from trainer.reference import references
    from trainer.rundir import load_run, plan_digest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan_for({"plan": None, "fleet": args.fleet, "model": "char-gpt-xs"}, 40, 0, "shakespeare", args.batch)
    modes: dict[str, int] = {}
    for device in plan.devices:
        key = device.mode if device.status == "optimal" else device.status
        modes[key] = modes.get(key, 0) + 1
    print(f"== plan: {args.fleet}, 40 devices, char-gpt-xs: " + ", ".join(f"{n} x {m}" for m, n in modes.items()))
    runs = {method: SimpleNamespace(
        config=None, task="shakespeare", method=method, plan=str(out / "plan.json"), fleet=None, model=None,
        fleet_size=40, rounds=args.rounds, clients_per_round=10, local_steps=None, lr=args.lr or DEMO_LR[method], seed=0,
        lora_scale=None, drop_rate=None, eval_every=None, eval_samples=args.eval_samples, engine="local",
        no_pretrained=False, out=str(out / method), resume=(out / method / "state.json").exists())
        for method in ("caff", "lora", "full")}
    for run_args in runs.values():  # refuse a run directory before the long steps below
        load_run(_train_config(run_args)[0], plan_digest(plan), None, run_args.out, run_args.resume)
    write_plan_file(out / "plan.json", plan)
    print("== validate")
    if run_validate(SimpleNamespace(plan=str(out / "plan.json"), device="cpu", json=False)):
        return 1
    for method, run_args in runs.items():
        print(f"== {method}")
        if run_train(run_args):
            return 1
    from trainer.report import load_runs, plot_runs, summary_rows

    cached = out / "references.json"
    if not cached.exists():
        atomic_write(cached, json.dumps(references("shakespeare", ZOO["char-gpt-xs"], args.central_steps,
                                                   samples=args.eval_samples)))
    refs = json.loads(cached.read_text())
    results = load_runs([run_args.out for run_args in runs.values()])
    for row in summary_rows(results):
        print(row)
    levels = {f"pretrained ({refs['pretrained']['accuracy']:.3f})": refs["pretrained"]["accuracy"],
              f"central full fine-tuning ({refs['upper_bound']['accuracy']:.3f})": refs["upper_bound"]["accuracy"]}
    print(f"reference: pretrained accuracy {refs['pretrained']['accuracy']:.3f}, centralized full fine-tuning "
          f"{refs['upper_bound']['accuracy']:.3f} ({refs['central']}); {refs['test_samples']} test samples")
    plot_runs(results, str(out / "demo.png"), levels)
    print(f"plot written to {out / 'demo.png'}", file=sys.stderr)
    return 0
