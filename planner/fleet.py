"""Plan many devices at once, under each candidate architecture, and choose the architecture.

For each architecture and each batch size in the fleet (peak memory and FLOPs per step depend on
the batch; local steps only scale the compute test), `compute_frontier` gives the exact Pareto
frontier of plans, best first; every device's optimum is the first frontier plan within its
budgets, found for all devices at once by comparing arrays (devices x frontier plans). A budget
is binding for a device when lifting it alone reaches a frontier plan of larger key. With
``solver='ilp'`` each device is solved by its own `DeviceIlp` instead (the slow reference).

An architecture's score is the mean objective per device (by default the mean number of fully
trained blocks; an infeasible device scores 0); the highest score wins, ties going to fewer
infeasible devices, then to the earlier candidate. ``min_coverage`` is a check, not an
optimization: with every device on its own optimum, each block must be trained (fully or with
LoRA) by at least that share of the devices; an architecture short in any block loses whatever
its score, and is reported so; if none meets it there is no winner. (Raising coverage by moving
devices off their optima is a fleet-wide assignment problem this planner does not attempt.)
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

from costmodel.estimate import clear_layer_costs, layer_names
from costmodel.process import predict_process
from costmodel.spec import ModelSpec
from planner.budget import BUDGETS, Budgets, runtime_profile
from planner.frontier import FEW_DEVICES, Frontier, clear_layouts, compute_frontier
from planner.ilp import DeviceIlp
from planner.planfile import ArchitectureSummary, DevicePlan, PlanFile, ProcessTerms
from planner.table import FROZEN, CostTable, Objective, PlanCosts

SOLVERS = ("frontier", "ilp")


@dataclass(frozen=True)
class PlanSettings:
    """How to plan: objective, LoRA rank menu, recomputation, compact frozen weights, memory margin,
    coverage, step shape and solver.

    ``batch`` overrides every device's batch size; ``seq`` None is each model's maximum. ``recompute``:
    trained blocks may also recompute their activations in backward; ``frozen``: a plan may also hold
    its frozen linear weights compact, in each of these formats ('bf16', 'int8'; one format per plan;
    a model already in bf16 skips 'bf16'). Both are off by default, as the LoRA menu is empty by
    default: plans made before stay as they were."""

    objective: Objective = Objective()
    lora_ranks: tuple[int, ...] = ()
    recompute: bool = False
    frozen: tuple[str, ...] = ()
    margin: float = 0.05
    min_coverage: float | None = None
    batch: int | None = None
    seq: int | None = None
    optimizer: str = "sgd"
    solver: str = "frontier"
    shard_bytes: int = 0  # bytes of training data each device holds while it trains

    def __post_init__(self):
        if unknown := sorted(set(self.frozen) - set(FROZEN)):
            raise ValueError(f"frozen: unknown {unknown[0]!r} ({', '.join(FROZEN)})")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: unknown {self.solver!r} ({', '.join(SOLVERS)})")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin: must be in [0, 1), got {self.margin}")
        if self.min_coverage is not None and not 0 <= self.min_coverage <= 1:
            raise ValueError(f"min_coverage: must be in [0, 1], got {self.min_coverage}")


@dataclass
class _Solved:
    """One architecture's plans for every device, in fleet order. ``rows``: option indices per device,
    -1 where infeasible; ``costs``: of the plan, or of the head-only plan where infeasible."""

    spec: ModelSpec
    tables: list[CostTable]
    rows: np.ndarray
    costs: PlanCosts
    binding: np.ndarray  # (devices, budgets) bool
    seconds: np.ndarray
    full: np.ndarray  # (devices, blocks) bool
    lora: np.ndarray

    @property
    def feasible(self) -> np.ndarray:
        return self.rows[:, 0] >= 0


def plan(specs: list[ModelSpec], devices: list, settings: PlanSettings = PlanSettings()) -> PlanFile:
    """Plan ``devices`` (`profiles.DeviceSpec`) under each architecture in ``specs``; the plan file holds
    every architecture's summary and the winner's per-device plans."""
    if not specs or not devices:
        raise ValueError("plan: need at least one model and one device")
    if len({spec.name for spec in specs}) < len(specs):
        raise ValueError("models: two candidate models share a name")
    menus = [settings.lora_ranks]
    if settings.lora_ranks and any(runtime_profile(d.runtime).lora_bytes for d in devices):
        menus.insert(0, ())
    collecting = gc.isenabled()
    gc.disable()  # the cyclic collector would rescan the thousands of entries as they are built (~15 % of the time)
    try:
        budgets = {menu: [Budgets.of_device(d, settings.margin, settings.shard_bytes, bool(menu)) for d in devices]
                   for menu in menus}
        stacked = {menu: Budgets.stack(budgets[menu]) for menu in menus}
        tables, by_frontier = {}, {}
        batches = _batches(devices, settings)
        # a fleet's tables are solved on threads while later tables are built; a few devices' in turn,
        # and on the tables with compact frozen weights only where memory holds one (`_held_by_memory`)
        many = len(devices) > FEW_DEVICES
        lazy = not many and settings.solver == "frontier" and bool(settings.frozen)
        with ThreadPoolExecutor(max_workers=_cores()) if many else contextlib.nullcontext() as pool:
            for spec in specs:
                tables[spec] = _tables(spec, batches, [c for c in _choices(spec, menus, settings)
                                                       if not lazy or c[1] is None], settings)
                for members, menu_tables in tables[spec] if settings.solver == "frontier" else ():
                    for menu, table in menu_tables:
                        by_frontier[table] = (pool.submit if many else _done)(_solve_by_frontier, table,
                                                                              stacked[menu].rows(members))
            by_frontier = {table: future.result() for table, future in by_frontier.items()}
        for spec in specs if lazy else ():
            for at, (batch, members) in enumerate(batches):
                if _held_by_memory([by_frontier[table] for _, table in tables[spec][at][1]]).any():
                    tables[spec][at] = _tables(spec, [(batch, members)], _choices(spec, menus, settings), settings)[0]
                    for menu, table in tables[spec][at][1]:
                        if table not in by_frontier:
                            by_frontier[table] = _solve_by_frontier(table, stacked[menu].rows(members))
        solved = [_solve_architecture(spec, devices, tables[spec], budgets, stacked, by_frontier) for spec in specs]
        summaries, winner = _summaries(solved, settings)
        return PlanFile(objective=str(settings.objective), lora_ranks=list(settings.lora_ranks),
                        recompute=settings.recompute, frozen=list(settings.frozen), margin=settings.margin,
                        min_coverage=settings.min_coverage, seq=settings.seq, optimizer=settings.optimizer,
                        solver=settings.solver, models=specs, architectures=summaries,
                        winner=winner.spec.name if winner else None,
                        devices=_entries(winner, devices, settings) if winner else [])
    finally:
        if collecting:
            gc.enable()


def _batches(devices: list, settings: PlanSettings) -> list[tuple[int, np.ndarray]]:
    """Each batch size of the fleet and its devices (indices)."""
    sizes = np.array([settings.batch or d.batch_size for d in devices])
    return [(int(batch), np.flatnonzero(sizes == batch)) for batch in np.unique(sizes)]


def _choices(spec: ModelSpec, menus: list[tuple], settings: PlanSettings) -> list[tuple]:
    """The (LoRA menu, way of holding frozen weights) of each table of ``spec``: uncompact first."""
    return [(menu, frozen) for menu in menus for frozen in (None, *settings.frozen) if frozen != spec.dtype]


def _tables(spec: ModelSpec, batches: list[tuple], choices: list[tuple], settings: PlanSettings) -> list[tuple]:
    """Per batch size (`_batches`), its devices and a (LoRA menu, `cost_table`) per choice (`_choices`);
    the first table gives the binding budgets of devices no table fits (see `_solve_architecture`)."""
    return [(members, [(menu, cost_table(spec, batch, settings.seq, settings.optimizer, menu, settings.objective,
                                         settings.recompute, frozen)) for menu, frozen in choices])
            for batch, members in batches]


def _held_by_memory(solved: list[tuple]) -> np.ndarray:
    """Per device, whether lifting its memory budget reaches a plan the planner prefers (`preferred`) to
    its best plan over some tables of one way of holding frozen weights (``solved``: each table's
    `_solve_by_frontier`). Only there can compact frozen weights win: a plan with them has the key, the
    upload bytes and at least the FLOPs of the same plan without them, and less precision."""
    def best(found: list[tuple[PlanCosts, np.ndarray]]) -> tuple[PlanCosts, np.ndarray]:
        costs, fits = found[0]
        for other, other_fits in found[1:]:
            take = other_fits & (~fits | preferred(other, costs))
            costs = PlanCosts(*(np.where(take, getattr(other, f.name), getattr(costs, f.name))
                                for f in fields(PlanCosts)))
            fits = fits | other_fits
        return costs, fits

    (lifted, reaches), (costs, fits) = best([lifted for *_, lifted in solved]), best(
        [(costs, rows[:, 0] >= 0) for rows, costs, *_ in solved])
    return reaches & (~fits | preferred(lifted, costs))


def _solve_architecture(spec: ModelSpec, devices: list, tables: list[tuple], budgets: dict[tuple, list[Budgets]],
                        stacked: dict[tuple, Budgets], by_frontier: dict[CostTable, tuple]) -> _Solved:
    """Every device's best plan of ``spec``; ``tables``: per batch size of the fleet, its devices and a
    (LoRA menu, table) per choice (`_tables`); ``budgets``: each device's, per LoRA menu (see `plan`),
    and ``stacked`` the same as column arrays: plans without LoRA against the plain runtime and plans
    with it against the larger one; ``by_frontier``: each table's `_solve_by_frontier` (none with the
    ILP solver). Each device takes the best of its best plans (`preferred`)."""
    n = len(devices)
    rows = np.full((n, len(layer_names(spec))), -1)
    costs = PlanCosts(*(np.zeros(n, dtype=dtype) for dtype in (np.int64,) * 4 + (float,) + (np.int64,) * 2))
    binding = np.zeros((n, len(BUDGETS)), dtype=bool)
    seconds = np.zeros(n)
    full = np.zeros((n, spec.n_blocks), dtype=bool)
    lora = np.zeros((n, spec.n_blocks), dtype=bool)
    planned: list[CostTable] = [None] * n
    for members, menu_tables in tables:
        for k, (menu, table) in enumerate(menu_tables):
            started = time.perf_counter()
            menu_budgets = stacked[menu].rows(members)
            if table in by_frontier:
                menu_rows, menu_costs, menu_binding, menu_seconds, _ = by_frontier[table]
            else:
                menu_rows, menu_costs, menu_binding, menu_seconds = _solve_by_ilp(
                    table, [budgets[menu][i] for i in members], started)
            feasible = menu_rows[:, 0] >= 0
            if k == 0:  # binding where no table fits: the budgets its head-only plan breaks
                take = np.ones(len(members), dtype=bool)
                over = menu_budgets.over(table.evaluate(table.head_only))
                menu_binding[~feasible] = np.column_stack([over[budget][:, 0] for budget in BUDGETS])[~feasible]
            else:
                take = feasible & ((rows[members, 0] < 0) | preferred(menu_costs, costs.take(members)))
            chosen = members[take]
            seconds[members] += menu_seconds  # solver seconds per device, all menus
            rows[chosen], binding[chosen] = menu_rows[take], menu_binding[take]
            for field in fields(PlanCosts):
                getattr(costs, field.name)[chosen] = getattr(menu_costs, field.name)[take]
            full[chosen], lora[chosen] = (part[take] for part in table.block_training(menu_rows))
            for i in chosen:
                planned[i] = table
    return _Solved(spec, planned, rows, costs, binding, seconds, full, lora)


@functools.lru_cache(maxsize=256)
def cost_table(spec: ModelSpec, batch: int, seq: int | None, optimizer: str, lora_ranks: tuple[int, ...],
               objective: Objective, recompute: bool, frozen: str | None) -> CostTable:
    """`CostTable`, built once per model, step shape and menu in a process: later plans reuse it."""
    return CostTable(spec, batch, seq, optimizer, lora_ranks, objective, recompute, frozen)


_WHOLE_FRONTIERS: dict[CostTable, Frontier] = {}  # the last 128 whole frontiers, oldest first (`_solve_by_frontier`)
_KEEPING = threading.Lock()  # held while a thread changes _WHOLE_FRONTIERS


def clear_caches() -> None:
    """Forget every table, frontier and layer costing computed so far in this process (a cold start)."""
    cost_table.cache_clear()
    _WHOLE_FRONTIERS.clear()
    clear_layouts()
    clear_layer_costs()


def _done(function, *args) -> Future:
    """``function(*args)`` run now, as a finished future."""
    future = Future()
    future.set_result(function(*args))
    return future


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _solve_by_frontier(table: CostTable, stacked: Budgets):
    """Option rows, their costs (the head-only plan's where none fits), binding budgets, solver seconds
    and, with memory lifted, the best plan's costs and whether there is one, per device of ``stacked``
    (their budgets as column arrays), from one frontier of ``table`` for all of them: its whole
    frontier, computed once per table in a process (the last 128 kept) and read by every later fleet or
    device planned on it; except for a few devices on a table whose whole frontier is large (LoRA ranks
    and recomputation together: thousands of plans, ~0.05 s for 12 blocks) and not yet computed, where
    only the plans those devices can reach are (`compute_frontier` with their budgets). The seconds are
    the frontier's (0 where kept) and the solving's, shared among the devices. Runs on threads: the
    frontier's pruning and the search of each device's plan run compiled, outside the interpreter's
    lock."""
    started = time.perf_counter()
    if (frontier := _WHOLE_FRONTIERS.get(table)) is None:
        few = bool(table.recompute and table.lora_ranks) and stacked.devices <= FEW_DEVICES
        frontier = compute_frontier(table, stacked if few else None)
        if not few:
            with _KEEPING:
                if len(_WHOLE_FRONTIERS) >= 128:
                    del _WHOLE_FRONTIERS[next(iter(_WHOLE_FRONTIERS))]
                _WHOLE_FRONTIERS[table] = frontier
    best = frontier.best(stacked)
    plans = PlanCosts(*(np.concatenate([getattr(frontier.costs, f.name), getattr(head, f.name)])  # -1: head only
                        for head in [table.evaluate(table.head_only)] for f in fields(PlanCosts)))
    lifted = {b: frontier.best(stacked.without(b)) for b in BUDGETS}
    binding = np.column_stack([_better(plans, lifted[b], best) for b in BUDGETS])
    rows = np.full((len(best), len(table.layers)), -1)
    rows[best >= 0] = frontier.selections[best[best >= 0]]
    seconds = np.full(len(best), (time.perf_counter() - started) / len(best))
    return rows, plans.take(best), binding & (best >= 0)[:, None], seconds, (plans.take(lifted["memory"]),
                                                                            lifted["memory"] >= 0)


def _solve_by_ilp(table: CostTable, budgets: list[Budgets], started: float):
    """Option rows, their costs, binding budgets and seconds per device, one ILP (and one per lifted
    budget) each."""
    rows = np.full((len(budgets), len(table.layers)), -1)
    binding = np.zeros((len(budgets), len(BUDGETS)), dtype=bool)
    seconds = np.zeros(len(budgets))
    for i, device_budgets in enumerate(budgets):
        selection = DeviceIlp(table, device_budgets).solve()
        if selection is not None:
            rows[i] = selection
            for k, budget in enumerate(BUDGETS):
                lifted = DeviceIlp(table, device_budgets.without(budget)).solve(tiebreaks=False)
                binding[i, k] = _better(table.evaluate(np.array([lifted, selection])), np.array([0]), np.array([1]))[0]
        seconds[i] = time.perf_counter() - started
        started = time.perf_counter()
    return rows, _costs(table, rows), binding, seconds


def preferred(a: PlanCosts, b: PlanCosts) -> np.ndarray:
    """Whether each plan of ``a`` comes before the plan of ``b`` in the planner's order: larger key
    (primary, then trained bytes), then fewer FLOPs, then more precise frozen weights, then less peak."""
    better, tied = np.zeros(len(a.primary), dtype=bool), np.ones(len(a.primary), dtype=bool)
    for x, y in ((a.primary, b.primary), (a.trained_bytes, b.trained_bytes), (b.step_flops, a.step_flops),
                 (a.precision, b.precision), (b.peak_bytes, a.peak_bytes)):
        better |= tied & (x > y)
        tied &= x == y
    return better


def _better(costs: PlanCosts, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether plan a[i] has a larger key (primary, then trained bytes) than plan b[i]; -1 is no plan."""
    primary_a, primary_b = costs.primary[a], costs.primary[b]
    larger = (primary_a > primary_b) | ((primary_a == primary_b) & (costs.trained_bytes[a] > costs.trained_bytes[b]))
    return larger & (a >= 0) & (b >= 0)


def _costs(table: CostTable, rows: np.ndarray) -> PlanCosts:
    """Costs of each row's plan, or of the head-only plan where the row is -1."""
    plans, inverse = np.unique(np.where(rows[:, :1] >= 0, rows, table.head_only), axis=0, return_inverse=True)
    return table.evaluate(plans).take(inverse.ravel())


def _summaries(solved: list[_Solved], settings: PlanSettings) -> tuple[list[ArchitectureSummary], _Solved | None]:
    scored = []
    for result in solved:
        feasible = result.feasible
        coverage = (result.full | result.lora).mean(axis=0)
        scored.append(dict(model=result.spec.name, score=float(np.where(feasible, result.costs.primary, 0).mean()),
                           mean_trained_blocks=float(result.full.sum(axis=1).mean()),
                           mean_lora_blocks=float(result.lora.sum(axis=1).mean()),
                           infeasible_devices=int((~feasible).sum()), coverage=[float(c) for c in coverage],
                           meets_min_coverage=settings.min_coverage is None
                           or bool((coverage >= settings.min_coverage - 1e-12).all())))
    eligible = [i for i, s in enumerate(scored) if s["meets_min_coverage"]]
    best = max(eligible, key=lambda i: (scored[i]["score"], -scored[i]["infeasible_devices"], -i), default=None)
    for i, summary in enumerate(scored):
        summary["verdict"] = _verdict(summary, scored[best] if best is not None else None, i == best, settings)
    return [ArchitectureSummary(**s) for s in scored], solved[best] if best is not None else None


def _verdict(summary: dict, winner: dict | None, won: bool, settings: PlanSettings) -> str:
    if won:
        return "won: highest score" + (" meeting the minimum coverage" if settings.min_coverage is not None else "")
    if not summary["meets_min_coverage"]:
        block = int(np.argmin(summary["coverage"]))
        return (f"lost: block {block} is trained by {summary['coverage'][block]:.1%} of devices, "
                f"below the minimum coverage {settings.min_coverage:.1%}")
    if summary["score"] < winner["score"]:
        return f"lost: score {summary['score']:.4g} is below {winner['model']}'s {winner['score']:.4g}"
    if summary["infeasible_devices"] > winner["infeasible_devices"]:
        return (f"lost: ties {winner['model']} on score but has {summary['infeasible_devices']} infeasible "
                f"devices to its {winner['infeasible_devices']}")
    return f"lost: ties {winner['model']} on score and infeasible devices; {winner['model']} is listed first"


def _entries(solved: _Solved, devices: list, settings: PlanSettings) -> list[DevicePlan]:
    planned: dict[tuple, dict] = {}  # (table, option row, runtime) -> the entry fields of that plan
    peaks, step_flops, uploads = (getattr(solved.costs, f).tolist() for f in ("peak_bytes", "step_flops",
                                                                              "upload_bytes"))
    entries = []
    for i, (device, row, bound, seconds) in enumerate(zip(devices, solved.rows.tolist(), solved.binding.tolist(),
                                                          solved.seconds.tolist())):
        table, steps = solved.tables[i], device.local_steps
        budgets = dict(memory_bytes=device.memory_bytes,  # validated once, inside DevicePlan
                       usable_memory_bytes=device.memory_bytes * (1 - settings.margin),
                       compute_flops=device.compute_flops, upload_bytes=device.upload_bytes,
                       local_steps=steps, batch_size=table.batch)
        common = dict(device=device.name, model=solved.spec.name, budgets=budgets, solver_seconds=seconds,
                      binding=[budget for budget, is_bound in zip(BUDGETS, bound) if is_bound])
        key = (table, tuple(row if row[0] >= 0 else table.head_only), device.runtime)
        if key not in planned:
            mode = table.mode(key[1])
            least = Budgets.of_device(device, settings.margin, settings.shard_bytes)  # head only: no LoRA
            terms = predict_process(solved.spec, mode, table.batch, settings.seq, settings.optimizer,
                                    runtime_profile(device.runtime), settings.shard_bytes)
            planned[key] = dict(mode=str(mode), trained_blocks=sorted(mode.blocks), lora_ranks=mode.lora,
                                terms=ProcessTerms(**terms.to_json()),
                                process=int(least.process_bytes(table.evaluate(np.array(key[1])))[0]))
        fields_of_plan = dict(planned[key])
        terms, process = fields_of_plan.pop("terms"), fields_of_plan.pop("process")
        common |= dict(runtime=device.runtime, process=terms)  # one ProcessTerms per plan, shared
        if row[0] < 0:
            needs = dict(memory_bytes=process / (1 - settings.margin), compute_flops=steps * step_flops[i],
                         upload_bytes=uploads[i])
            entries.append(DevicePlan(status="infeasible", mode=None, needs=needs, trained_blocks=[], lora_ranks={},
                                      **common))  # given, not defaults (which pydantic copies: 30 us each)
            continue
        entries.append(DevicePlan(status="optimal", peak_bytes=peaks[i], flops_per_round=steps * step_flops[i],
                                  upload_bytes=uploads[i], **fields_of_plan, **common))
    return entries
