"""``caff plan``: what each device trains within its memory, compute and upload budgets; for a fleet and
several candidate models, which architecture to deploy."""

from __future__ import annotations

from collections import Counter

from costmodel.estimate import OPTIMIZERS
from costmodel.spec import load_spec
from planner import SOLVERS, Objective, PlanFile, PlanSettings, SolverError, plan, write_plan_file
from profiles import format_bytes, format_flops, load_device, load_fleet, parse_bytes

MAX_ROWS = 30  # device rows printed; the plan file holds them all


def add_parser(subparsers) -> dict:
    p = subparsers.add_parser("plan", help="choose which blocks each device trains (and the architecture)")
    p.add_argument("models", metavar="MODEL[,MODEL...]",
                   help="zoo names or spec files; with several, the one the fleet trains best wins")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="catalogue device name or device JSON file")
    where.add_argument("--fleet", help="catalogue fleet name or fleet JSON file")
    p.add_argument("--objective", default="blocks",
                   help="blocks (fully trained blocks, default) | params (trained bytes) | per-block weights w0,w1,...")
    p.add_argument("--lora-ranks", default="", help="LoRA ranks blocks not fully trained may take, e.g. 4,8,16")
    p.add_argument("--recompute", action="store_true",
                   help="trained blocks may also recompute their activations in backward (fewer bytes, more FLOPs)")
    p.add_argument("--frozen", default="", help="plans may also hold frozen linear weights compact: bf16, int8 or both "
                   "(int8,bf16); one format per plan, chosen only where it trains more")
    p.add_argument("--margin", type=float, default=0.05, help="share of each device's memory kept free (default 0.05)")
    p.add_argument("--min-coverage", type=float, default=None,
                   help="share of devices that must train every block (fully or LoRA)")
    p.add_argument("--batch", type=int, default=None, help="samples per step on every device (default: each device's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample (default: the model's maximum)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--shard-bytes", default="0", help="training data each device holds, e.g. 2MiB (default 0)")
    p.add_argument("--fleet-size", type=int, default=None, help="devices to draw from a fleet given by shares")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--solver", choices=SOLVERS, default="frontier",
                   help="frontier (exact, fast; default) or ilp (exact, one CBC solve per device: slow)")
    p.add_argument("--json", action="store_true", help="print the plan file's JSON")
    p.add_argument("-o", "--output", help="write the plan file here")
    return {"plan": run}


def run(args) -> int:
    settings = _settings(args)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    if not names:
        raise ValueError("MODEL: give at least one model")
    specs = [load_spec(name) for name in names]
    for spec in specs:
        if settings.objective.kind == "weights" and len(settings.objective.weights) != spec.n_blocks:
            raise ValueError(f"--objective: {len(settings.objective.weights)} weights for {spec.name}'s "
                             f"{spec.n_blocks} blocks")
    if args.device is not None:
        if args.fleet_size is not None:
            raise ValueError("--fleet-size: applies to --fleet only")
        devices = [load_device(args.device)]
    else:
        if args.fleet_size is not None and args.fleet_size < 1:
            raise ValueError(f"--fleet-size: must be >= 1, got {args.fleet_size}")
        fleet = load_fleet(args.fleet)
        if fleet.uses_shares and args.fleet_size is None:
            raise ValueError(f"--fleet-size: fleet {fleet.name!r} is given by shares; say how many devices to draw")
        devices = fleet.expand(args.fleet_size, args.seed)
    try:
        result = plan(specs, devices, settings)
    except SolverError as exc:
        raise ValueError(f"--solver ilp: {exc}") from None
    if args.output:
        write_plan_file(args.output, result)
    if args.json:
        print(result.model_dump_json(indent=1))
    else:
        _print(result, args, len(devices))
    return 0 if result.winner else 1


def _settings(args) -> PlanSettings:
    try:
        ranks = tuple(int(r) for r in args.lora_ranks.split(",") if r.strip())
    except ValueError:
        raise ValueError(f"--lora-ranks: expected integers like 4,8,16, got {args.lora_ranks!r}") from None
    frozen = tuple(f.strip() for f in args.frozen.split(",") if f.strip())
    checks = [("--lora-ranks", all(r >= 1 for r in ranks), "ranks must be >= 1"),
              ("--frozen", set(frozen) <= {"bf16", "int8"}, "formats are bf16 and int8"),
              ("--margin", 0 <= args.margin < 1, "must be in [0, 1)"),
              ("--min-coverage", args.min_coverage is None or 0 <= args.min_coverage <= 1, "must be in [0, 1]"),
              ("--batch", args.batch is None or args.batch >= 1, "must be >= 1"),
              ("--seq", args.seq is None or args.seq >= 1, "must be >= 1")]
    for option, ok, rule in checks:
        if not ok:
            raise ValueError(f"{option}: {rule}, got {getattr(args, option[2:].replace('-', '_'))}")
    try:
        objective = Objective.parse(args.objective)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    try:
        shard = parse_bytes(args.shard_bytes)
    except ValueError as exc:
        raise ValueError(f"--shard-bytes: {exc}") from None
    return PlanSettings(objective=objective, lora_ranks=ranks, recompute=args.recompute, frozen=frozen,
                        margin=args.margin,
                        min_coverage=args.min_coverage, batch=args.batch, seq=args.seq, optimizer=args.optimizer,
                        solver=args.solver, shard_bytes=shard)


def _print(result: PlanFile, args, n_devices: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    where = f"device {args.device}" if args.device else f"fleet {args.fleet} ({n_devices} devices)"
    if result.winner:
        _print_devices(console, Table, result, where)
    if len(result.architectures) > 1 or result.min_coverage is not None:
        meaning = Objective.parse(result.objective).meaning
        table = Table(title=f"Architectures for {where}; score: mean {meaning} per device")
        for column in ("model", "score", "fully trained blocks", "LoRA blocks", "infeasible", "least coverage",
                       "verdict"):
            table.add_column(column, justify="left" if column in ("model", "verdict") else "right")
        for arch in result.architectures:
            low = min(range(len(arch.coverage)), key=arch.coverage.__getitem__)
            table.add_row(arch.model, f"{arch.score:.4g}", f"{arch.mean_trained_blocks:.2f}",
                          f"{arch.mean_lora_blocks:.2f}", str(arch.infeasible_devices),
                          f"block {low}: {arch.coverage[low]:.0%}", arch.verdict,
                          style="bold" if arch.model == result.winner else None)
        console.print(table)
    if not result.winner:
        console.print("no architecture meets the minimum coverage: nothing to deploy")
    elif len(result.architectures) > 1:
        console.print(f"winner: {result.winner}")
    if args.output:
        console.print(f"plan written to {args.output}")


def _print_devices(console, Table, result: PlanFile, where: str) -> None:
    """One row per group of devices of the same class (name before '#') with the same plan and budgets."""
    groups = Counter()
    first = {}
    for entry in result.devices:
        key = (entry.device.split("#")[0], entry.model_dump_json(exclude={"device", "solver_seconds"}))
        groups[key] += 1
        first.setdefault(key, entry)
    table = Table(title=f"Plan: {result.winner} on {where} ({result.optimizer}, margin {result.margin:.0%})")
    table.add_column("device")
    table.add_column("train", overflow="fold")
    for column in ("process memory of usable", "FLOPs of compute per round", "upload of budget"):
        table.add_column(column, justify="right")
    table.add_column("binding")
    table.add_column("status")
    for key, count in list(groups.items())[:MAX_ROWS]:
        entry, budgets = first[key], first[key].budgets
        if entry.status == "optimal":
            used = (entry.process.total_bytes if entry.process else entry.peak_bytes, entry.flops_per_round,
                    entry.upload_bytes)
        else:  # what the head-only plan needs
            used = (entry.needs.memory_bytes * (1 - result.margin), entry.needs.compute_flops, entry.needs.upload_bytes)
        table.add_row(entry.device if count == 1 else f"{key[0]} x{count}",
                      entry.mode or "nothing fits; head only needs:",
                      f"{format_bytes(used[0])}\nof {format_bytes(budgets.usable_memory_bytes)}",
                      f"{format_flops(used[1])}\nof {format_flops(budgets.compute_flops)}",
                      f"{format_bytes(used[2])}\nof {format_bytes(budgets.upload_bytes)}",
                      ", ".join(entry.binding) or "none", entry.status,
                      style=None if entry.status == "optimal" else "red")
    console.print(table)
    if len(groups) > MAX_ROWS:
        console.print(f"... and {len(groups) - MAX_ROWS} more rows; -o or --json gives every device")
