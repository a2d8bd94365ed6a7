"""The planner: its linear forms are estimate's costs, the ILP and the frontier are optimal against
brute force over every plan (through `estimate`), fleets, plan files and ``caff plan``."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pulp
import pytest
from costmodel.sampling import random_config

from caff.cli import main
from costmodel import ZOO, ModelSpec, TrainMode, estimate
from costmodel.process import churned_bytes, kept_bytes
from planner import (BUDGETS, Budgets, CostTable, DeviceIlp, Objective, PlanCosts, PlanSettings, compute_frontier, plan,
                     read_plan_file, write_plan_file)
from planner.fleet import preferred
from planner.frontier import FEW_DEVICES
from planner.table import MAX_COST
from profiles import DeviceSpec
from tests.conftest import TENSORS_ONLY

pytestmark = pytest.mark.filterwarnings("ignore:PULP_CBC_CMD is deprecated:DeprecationWarning")
estimate_module = importlib.import_module("costmodel.estimate")
BATCH, SEQ = 4, 16
SMALL = {  # name: (spec, LoRA rank menu, optimizer, recompute menu, compact frozen formats); every zoo model
    # of at most 8 blocks
    "gpt10": (ModelSpec(name="gpt10", kind="gpt", n_blocks=10, d_model=32, n_heads=2, d_ff=64, max_seq_len=16,
                        vocab_size=20), (), "sgd", False, ()),
    "gpt5-lora": (ModelSpec(name="gpt5", kind="gpt", n_blocks=5, d_model=48, n_heads=2, d_ff=96, max_seq_len=16,
                            vocab_size=20), (2, 4), "adam", False, ("int8",)),
    "tied-lora": (ModelSpec(name="tied", kind="gpt", n_blocks=4, d_model=32, n_heads=2, d_ff=128, max_seq_len=16,
                            vocab_size=40, tied_embeddings=True), (2,), "momentum", True, ("bf16", "int8")),
    "encoder-lora": (ModelSpec(name="enc", kind="encoder", n_blocks=4, d_model=32, n_heads=4, d_ff=64, max_seq_len=16,
                               vocab_size=30, norm="post", attention="sdpa"), (2, 4), "adam", True, ()),
    "vit-lora": (ModelSpec(name="vit", kind="vit", n_blocks=3, d_model=32, n_heads=2, d_ff=64, image_size=8,
                           patch_size=4, n_classes=5), (4,), "sgd", True, ("int8", "bf16")),
    "bf16-lora": (ModelSpec(name="half", kind="gpt", n_blocks=3, d_model=32, n_heads=2, d_ff=64, max_seq_len=16,
                            vocab_size=20, dtype="bf16"), (2,), "adam", True, ("int8",)),
    "char-gpt-xs": (ZOO["char-gpt-xs"], (4,), "adam", True, ("int8", "bf16")),
    "char-gpt-s": (ZOO["char-gpt-s"], (), "sgd", True, ("int8",)),
    "char-gpt-m": (ZOO["char-gpt-m"], (), "momentum", True, ()),
    "vit-tiny": (ZOO["vit-tiny"], (), "adam", True, ("bf16",)),
    "minilm-l6": (ZOO["minilm-l6"], (), "sgd", True, ("int8", "bf16")),
}


def mode_of_states(states) -> TrainMode:
    """The mode giving block b ``states[b]``: 'frozen', 'full', a rank, or ('recompute', 'full' or rank)."""
    trained = [s[1] if isinstance(s, tuple) else s for s in states]
    return TrainMode(blocks=frozenset(b for b, s in enumerate(trained) if s == "full"),
                     lora={b: s for b, s in enumerate(trained) if isinstance(s, int)},
                     recompute=frozenset(b for b, s in enumerate(states) if isinstance(s, tuple)))


def block_states(ranks, recompute: bool) -> list:
    trained = ["full", *ranks]
    return ["frozen", *trained, *([("recompute", s) for s in trained] if recompute else [])]


def all_modes(spec: ModelSpec, ranks, recompute: bool = False) -> list[TrainMode]:
    return [mode_of_states(states) for states in itertools.product(block_states(ranks, recompute),
                                                                   repeat=spec.n_blocks)]


def small_table(name: str, objective: Objective = Objective(), frozen: str | None = None) -> CostTable:
    spec, ranks, optimizer, recompute, _ = SMALL[name]
    return CostTable(spec, BATCH, SEQ, optimizer, ranks, objective, recompute, frozen)


def small_tables(name: str, objective: Objective = Objective()) -> list[CostTable]:
    """One table per way of holding frozen weights in the model's menu (full precision first)."""
    return [small_table(name, objective, frozen) for frozen in (None, *SMALL[name][4])]


@functools.cache
def brute_force(name: str):
    """Every plan of a small model (every assignment of block states, each way of holding frozen weights)
    and its costs, each from `estimate` and `costmodel.process`; precision: bits per frozen weight."""
    spec, ranks, optimizer, recompute, frozen = SMALL[name]
    modes = [mode.model_copy(update={"frozen": f}) for f in (None, *frozen) for mode in all_modes(spec, ranks, recompute)]
    reports = [estimate(spec, mode, BATCH, SEQ, optimizer) for mode in modes]
    column = lambda values: np.array(list(values), dtype=np.int64)  # noqa: E731
    return modes, {"peak": column(r.peak_bytes for r in reports),
                   "flops": column(r.totals["fwd_flops"] + r.totals["bwd_flops"] for r in reports),
                   "upload": column(r.totals["upload_bytes"] for r in reports),
                   # the planner bounds the received tensors kept (`costmodel.process.kept_bytes`) by the upload
                   "kept": column(r.totals["upload_bytes"] for r in reports),
                   "trained": column(r.totals["grad_bytes"] for r in reports),
                   "churned": column(churned_bytes(r) for r in reports),
                   "precision": column({"int8": 8, "bf16": 16, None: 8 * spec.dtype_bytes}[m.frozen] for m in modes)}


def primary(objective: Objective, modes, trained) -> np.ndarray:
    if objective.kind == "params":
        return trained.astype(float)
    weights = objective.weights or (1,) * 256
    return np.array([sum(weights[b] for b in mode.blocks) for mode in modes], dtype=float)


def random_budgets(rng: random.Random, costs: dict) -> Budgets:
    """Budgets from a bit under the cheapest plan to a bit over the dearest; a third exactly at a plan's cost."""
    steps = rng.randint(1, 3)
    margin = rng.choice([0.0, 0.05, 0.2])

    def draw(values):
        if rng.random() < 1 / 3:
            return int(rng.choice(values))
        return rng.uniform(0.9 * values.min(), 1.02 * values.max())

    exact_memory = rng.random() < 1 / 3
    process = costs["peak"] + costs["kept"]  # tensor peak and kept received tensors
    memory = int(rng.choice(process)) if exact_memory else round(draw(process) / (1 - margin))
    return Budgets(memory, steps * draw(costs["flops"]), round(draw(costs["upload"])), steps,
                   0.0 if exact_memory else margin)


def fits(budgets: Budgets, peak, flops, upload, kept, churned=0):
    """The budget test written out, independent of `Budgets.fits`: the process holds the fixed bytes
    (runtime, shard), the tensor peak, the allocator's slack on its ``churned`` bytes (the peak less the
    weights, `costmodel.process.churned_bytes`) and the received tensors it keeps (bounded by the upload)."""
    return ((budgets.fixed_bytes + peak + np.ceil(budgets.tensor_overhead * churned) + kept
             <= budgets.memory_bytes * (1 - budgets.margin))
            & (upload <= budgets.upload_bytes)
            & (budgets.local_steps * flops <= budgets.compute_flops))


def brute_best(objective: Objective, name: str, budgets: Budgets):
    """The optimum's key (primary, trained bytes, -FLOPs, bits per frozen weight, -peak) over every plan
    that fits, or None."""
    modes, costs = brute_force(name)
    keys = (primary(objective, modes, costs["trained"]), costs["trained"], -costs["flops"], costs["precision"],
            -costs["peak"])
    ok = np.flatnonzero(fits(budgets, costs["peak"], costs["flops"], costs["upload"], costs["kept"], costs["churned"]))
    if not len(ok):
        return None
    best = ok[np.lexsort([k[ok] for k in keys[::-1]])[-1]]
    return tuple(k[best] for k in keys)


def pareto_set(vectors: np.ndarray, chunk: int = 256) -> set[tuple]:
    """The rows (-primary, -trained bytes, costs...) no other row dominates: a key at least as
    good (lexicographically) and no larger costs; compared all with all, ``chunk`` rows at a time."""
    vectors = np.unique(vectors, axis=0)
    kept = set()
    for rows in np.array_split(vectors, -(-len(vectors) // chunk)):
        mine, other = rows[:, None, :], vectors[None, :, :]
        better_key = (other[..., 0] < mine[..., 0]) | (
            (other[..., 0] == mine[..., 0]) & (other[..., 1] <= mine[..., 1]))
        dominated = better_key & (other[..., 2:] <= mine[..., 2:]).all(axis=2) & (other != mine).any(axis=2)
        kept |= set(map(tuple, rows[~dominated.any(axis=1)]))
    return kept


def key_of(objective: Objective, spec: ModelSpec, mode: TrainMode, report):
    modes = [mode]
    return (primary(objective, modes, np.array([report.totals["grad_bytes"]]))[0], report.totals["grad_bytes"],
            -(report.totals["fwd_flops"] + report.totals["bwd_flops"]),
            {"int8": 8, "bf16": 16, None: 8 * spec.dtype_bytes}[mode.frozen], -report.peak_bytes)


def best_over_tables(tables: list[CostTable], budgets: Budgets, solve):
    """The planner's optimum over one table per way of holding frozen weights: each table's optimum by
    ``solve(table, budgets)`` (option indices or None), the best by `planner.fleet.preferred`; its
    table and selection, or None."""
    best = None
    for table in tables:
        selection = solve(table, budgets)
        if selection is not None:
            costs = table.evaluate(np.array(selection))
            if best is None or preferred(costs, best[2])[0]:
                best = (table, selection, costs)
    return best and best[:2]


def objectives(rng: random.Random, n_blocks: int) -> list[Objective]:
    return [Objective("blocks"), Objective("params"),
            Objective("weights", tuple(float(rng.randint(0, 3)) for _ in range(n_blocks)))]


# -- the linear forms are the cost model ----------------------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_linear_forms_equal_estimate_on_random_plans(seed):
    rng = random.Random(seed)
    recompute, frozen = seed % 2 == 1, seed % 3 > 0
    spec, mode, batch, seq, optimizer = random_config(rng, recompute, frozen)
    mode = mode.model_copy(update={"embeddings": False})  # the planner never trains untied embeddings
    ranks = tuple(sorted({*mode.lora.values(), rng.choice([1, 8])}))
    table = CostTable(spec, batch, seq, optimizer, ranks, recompute=recompute, frozen=mode.frozen)
    for _ in range(8):
        report = estimate(spec, mode, batch, seq, optimizer)
        costs = table.evaluate(np.array(table.selection(mode)))
        assert int(costs.peak_bytes[0]) == report.peak_bytes
        assert int(costs.step_flops[0]) == report.totals["fwd_flops"] + report.totals["bwd_flops"]
        assert int(costs.upload_bytes[0]) == report.totals["upload_bytes"]
        assert int(costs.trained_bytes[0]) == report.totals["grad_bytes"]
        assert table.mode(table.selection(mode)) == estimate_module.normalize_mode(spec, mode)  # round trip
        mode = mode_of_states([rng.choice(block_states(ranks, recompute)) for _ in range(spec.n_blocks)])
        mode = mode.model_copy(update={"frozen": table.frozen})


@pytest.mark.parametrize("name", ["gpt5-lora", "tied-lora", "char-gpt-s"])
def test_ilp_with_a_fixed_plan_reproduces_estimate(name):
    """The ILP's own variables: fix x to a plan; g, y and the peak must follow exactly."""
    spec, ranks, optimizer, recompute, _ = SMALL[name]
    table = small_table(name)
    rng = random.Random(name)
    for mode in rng.sample(all_modes(spec, ranks, recompute), 3):
        ilp = DeviceIlp(table, Budgets(float("inf"), float("inf"), float("inf")))
        states = {layer: s for layer, s in zip(table.layers, (table.options[i].state for i in table.selection(mode)))}
        for (layer, state), x in ilp.x.items():
            ilp.problem += x == int(states[layer] == state)
        ilp.problem.sense = pulp.LpMinimize
        ilp.problem.setObjective(ilp.peak)
        ilp.problem.solve(pulp.PULP_CBC_CMD(msg=False))
        chosen = [i for i, y in enumerate(ilp.y) if y.varValue > 0.5]
        assert chosen == table.selection(mode)
        expected = estimate(spec, mode, BATCH, SEQ, optimizer).peak_bytes
        assert ilp.peak.varValue * 2**20 == pytest.approx(expected, rel=1e-7)  # CBC prints 8 digits


def test_linear_forms_and_plans_on_a_branching_graph(monkeypatch):
    """Written against the layer graph: block.0 and block.1 side by side, block.0 is no ancestor of
    block.1, so a backward phase at block.1 needs its big-M coefficient."""
    def branching(spec):
        graph = nx.DiGraph()
        graph.add_edges_from([("embed", "block.0"), ("embed", "block.1"), ("block.0", "block.2"),
                              ("block.1", "block.2"), ("block.2", "head"), ("head", "loss")])
        return graph

    monkeypatch.setattr(estimate_module, "layer_graph", branching)
    estimate_module.layer_ancestors.cache_clear()
    try:
        spec = ModelSpec(name="branch", kind="gpt", n_blocks=3, d_model=32, n_heads=2, d_ff=64, max_seq_len=16,
                         vocab_size=20)
        table = CostTable(spec, BATCH, SEQ, "adam", (2,))
        modes = all_modes(spec, (2,))
        reports = [estimate(spec, mode, BATCH, SEQ, "adam") for mode in modes]
        costs = table.evaluate(np.array([table.selection(mode) for mode in modes]))
        assert costs.peak_bytes.tolist() == [r.peak_bytes for r in reports]
        frontier = compute_frontier(table)
        rng = random.Random(0)
        peaks = np.array([r.peak_bytes for r in reports])
        flops = np.array([r.totals["fwd_flops"] + r.totals["bwd_flops"] for r in reports])
        uploads = np.array([r.totals["upload_bytes"] for r in reports])
        trained = np.array([r.totals["grad_bytes"] for r in reports])  # the tie-break: trained bytes
        for trial in range(40):
            process = peaks + uploads
            budgets = Budgets(rng.uniform(process.min(), process.max()), rng.uniform(flops.min(), flops.max()),
                              rng.uniform(uploads.min(), uploads.max()), 1, 0.0)
            ok = fits(budgets, peaks, flops, uploads, uploads)
            best = max((len(m.blocks), int(t), -int(c), -int(p))
                       for m, t, c, p, f in zip(modes, trained, flops, peaks, ok) if f) if ok.any() else None
            index = frontier.best(Budgets.stack([budgets]))[0]
            got = None if index < 0 else tuple(int(sign * getattr(frontier.costs, name)[index]) for sign, name in (
                (1, "primary"), (1, "trained_bytes"), (-1, "step_flops"), (-1, "peak_bytes")))
            assert got == best
            if trial < 4:
                selection = DeviceIlp(table, budgets).solve()
                by_ilp = None if selection is None else table.evaluate(np.array(selection))
                assert got == (None if by_ilp is None else (int(by_ilp.primary[0]), int(by_ilp.trained_bytes[0]),
                                                            -int(by_ilp.step_flops[0]), -int(by_ilp.peak_bytes[0])))
    finally:
        estimate_module.layer_ancestors.cache_clear()


# -- optimality against brute force ---------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_ilp_optimum_equals_brute_force(name):
    spec, _, optimizer, _, _ = SMALL[name]
    rng = random.Random(name)
    choices = objectives(rng, spec.n_blocks)
    for trial in range(6):
        objective = choices[trial % 3]
        budgets = random_budgets(rng, brute_force(name)[1])
        expected = brute_best(objective, name, budgets)
        found = best_over_tables(small_tables(name, objective), budgets, lambda t, b: DeviceIlp(t, b).solve())
        if expected is None:
            assert found is None
            continue
        mode = found[0].mode(found[1])
        report = estimate(spec, mode, BATCH, SEQ, optimizer)
        flops = report.totals["fwd_flops"] + report.totals["bwd_flops"]
        assert fits(budgets, report.peak_bytes, flops, report.totals["upload_bytes"], report.totals["upload_bytes"])
        assert key_of(objective, spec, mode, report) == expected


@pytest.mark.parametrize("name", SMALL)
def test_frontier_is_the_brute_force_pareto_set_and_finds_every_optimum(name):
    """Per way of holding frozen weights, the frontier is the Pareto set of those plans; the best of
    the frontiers' first fitting plans is the brute-force optimum over all of them."""
    spec, _, optimizer, _, _ = SMALL[name]
    rng = random.Random(name)
    modes, costs = brute_force(name)
    for objective in objectives(rng, spec.n_blocks):
        tables = small_tables(name, objective)
        frontiers = {table: compute_frontier(table) for table in tables}
        value = primary(objective, modes, costs["trained"])
        for table, frontier in frontiers.items():
            these = np.array([mode.frozen == table.frozen for mode in modes])
            pareto = pareto_set(np.column_stack([-value, -costs["trained"], costs["peak"], costs["flops"],
                                                 costs["upload"], costs["churned"]])[these])
            got = np.column_stack([-frontier.costs.primary, -frontier.costs.trained_bytes, frontier.costs.peak_bytes,
                                   frontier.costs.step_flops, frontier.costs.upload_bytes,
                                   frontier.costs.peak_bytes - frontier.costs.weight_bytes])
            assert {tuple(v) for v in got} == pareto and len(got) == len(pareto)
            for selection, peak in zip(frontier.selections, frontier.costs.peak_bytes):
                assert estimate(spec, table.mode(selection), BATCH, SEQ, optimizer).peak_bytes == peak

        def first_fitting(table, budgets):
            index = frontiers[table].best(Budgets.stack([budgets]))[0]
            return None if index < 0 else frontiers[table].selections[index]

        for budgets in (random_budgets(rng, costs) for _ in range(100)):
            found = best_over_tables(tables, budgets, first_fitting)
            got_key = None if found is None else key_of(objective, spec, found[0].mode(found[1]), estimate(
                spec, found[0].mode(found[1]), BATCH, SEQ, optimizer))
            assert got_key == brute_best(objective, name, budgets)


@pytest.mark.parametrize("seed", range(8))
def test_compiled_pruning_keeps_exactly_the_labels_no_other_dominates(seed):
    """`_non_dominated` (numba's `_skyline`) against the definition, pair by pair: a label goes iff
    another of its signature has a key (primary, trained) >= lexicographically and costs <=, where of
    identical labels the first stays. Few distinct values make ties, identical labels and cross-key
    dominance common; a float primary and a constant column are included."""
    from planner.frontier import _non_dominated

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    primary = rng.integers(0, 4, n) * 0.5
    trained = rng.integers(0, 3, n) * 1000
    costs = np.column_stack([rng.integers(0, 4, n), rng.integers(-2, 3, n) * 2**40, np.full(n, 7),
                             rng.integers(0, 5, n)][: 1 + seed % 4])
    if seed % 2:  # sums of scaled costs that round alike: a dominator may come after what it dominates
        costs = np.column_stack([costs, rng.choice([0, 2**60], n), rng.choice([0, 1, 2**60], n)])
    signature = rng.random((n, seed % 3)) < 0.5
    key_at_least = (primary[:, None] > primary[None, :]) | (
        (primary[:, None] == primary[None, :]) & (trained[:, None] >= trained[None, :]))
    no_more = (costs[:, None, :] <= costs[None, :, :]).all(axis=2)
    alike = (signature[:, None, :] == signature[None, :, :]).all(axis=2)
    identical = alike & (primary[:, None] == primary[None, :]) & (trained[:, None] == trained[None, :]) & \
        (costs[:, None, :] == costs[None, :, :]).all(axis=2)
    earlier = np.arange(n)[:, None] < np.arange(n)[None, :]
    dominates = alike & key_at_least & no_more & (~identical | earlier)  # [q, p]: q dominates p
    np.fill_diagonal(dominates, False)
    expected = np.flatnonzero(~dominates.any(axis=0))
    assert _non_dominated(primary, trained, costs, signature).tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["char-gpt-s", "minilm-l6"])
def test_each_devices_optimum_is_the_first_frontier_plan_its_budgets_fit(name):
    """`Frontier.best` (numba's `_first_fitting`, which skips runs of 64 plans on their least needs)
    against `Budgets.fits` on every plan: the first fitting one, for many devices at once, with budgets
    at and around the frontier's own costs, allocator overheads that differ per device, fixed bytes,
    several steps, and each budget lifted. The frontiers hold several runs (160-304 plans)."""
    frontier = compute_frontier(CostTable(ZOO[name], 4, 32, "adam", (4, 8), recompute=True, frozen="int8"))
    assert len(frontier) > 2 * 64
    rng = np.random.default_rng(0)
    n = 2000
    memory, flops, upload = (frontier.costs.peak_bytes + frontier.costs.upload_bytes, frontier.costs.step_flops,
                             frontier.costs.upload_bytes)

    def draw(values, scale=1.0):  # a plan's own value (a third of the time) or anywhere around them
        return np.where(rng.random(n) < 1 / 3, rng.choice(values, n) * scale,
                        rng.uniform(0.9 * values.min(), 1.1 * values.max(), n) * scale)

    steps = rng.integers(1, 4, n)
    overhead = rng.choice([0.0, 0.25, 0.493], n)
    fixed = rng.choice([0, 2**10, 2**16], n)
    budgets = Budgets((draw(memory, 1.3) + fixed)[:, None] / 0.95, (draw(flops) * steps)[:, None],
                      np.floor(draw(upload))[:, None], steps[:, None], 0.05, fixed[:, None], overhead[:, None])
    for lifted in (budgets, *(budgets.without(b) for b in BUDGETS)):
        fits = lifted.fits(frontier.costs)
        assert frontier.best(lifted).tolist() == np.where(fits.any(axis=1), fits.argmax(axis=1), -1).tolist()
    assert 0 < (frontier.best(budgets) >= 0).sum() < n  # some devices fit a plan, some none


def test_numba_loads_where_a_frontier_is_computed_not_where_a_plan_is_read():
    """A device's training process imports the trainer, which reads plans through the planner: numba
    (~55 MB resident, not in the runtime footprint the budgets charge) must not load there; a frontier
    loads it."""
    code = ("import sys, trainer.local, trainer.methods, planner; loaded = 'numba' in sys.modules; "
            "planner.compute_frontier(planner.CostTable(__import__('costmodel').ZOO['char-gpt-xs'], 2, 16, 'sgd')); "
            "print(loaded, 'numba' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_a_damaged_kernel_cache_is_compiled_afresh(tmp_path):
    """numba's cache of the planner's kernels, next to the module: damaged (its index and code cut
    short, as a full disk leaves them), the next process drops it and compiles again, and plans as
    before; no traceback."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    for package in ("profiles", "costmodel", "planner"):
        shutil.copytree(root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import planner; from costmodel import ZOO; t = planner.CostTable(ZOO['char-gpt-xs'], 2, 16, 'sgd', (2,), "
            "recompute=True); print(len(planner.compute_frontier(t)))")
    run = lambda: subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)  # noqa: E731
    first = run()
    cached = sorted((tmp_path / "planner" / "__pycache__").glob("*.nb*"))
    assert first.returncode == 0 and cached, first.stderr
    for path in cached:
        path.write_bytes(path.read_bytes()[:20])
    again = run()
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


@pytest.mark.parametrize("name", ["tied-lora", "char-gpt-xs", "minilm-l6"])
def test_frontier_for_some_devices_keeps_their_optima_with_any_budget_lifted(name):
    """A frontier pruned to the plans some device can reach (with at most one budget lifted) gives every
    device the same optimum as the full frontier, under its budgets and with each lifted."""
    rng = random.Random(name)
    costs = brute_force(name)[1]
    for table in small_tables(name):
        full = compute_frontier(table)
        key = lambda frontier, index: [None if i < 0 else (frontier.costs.primary[i], frontier.costs.trained_bytes[i],  # noqa: E731
                                                          frontier.costs.step_flops[i], frontier.costs.peak_bytes[i])
                                       for i in index]
        for devices in (1, 1, 5, 30):
            budgets = Budgets.stack([random_budgets(rng, costs) for _ in range(devices)])
            pruned = compute_frontier(table, budgets)
            assert len(pruned) <= len(full)
            for lifted in (budgets, *(budgets.without(b) for b in BUDGETS)):
                assert key(pruned, pruned.best(lifted)) == key(full, full.best(lifted))
        tight = Budgets.stack([Budgets(int(costs["peak"].min()), float(costs["flops"].min()), 1, 1, 0.0)])
        assert len(compute_frontier(table, tight)) < len(full)


@pytest.mark.parametrize("name", [name for name in SMALL if SMALL[name][3]])
def test_frontier_for_one_device_bounds_keys_and_stays_optimal(name):
    """For one device with recomputation in the menu, the frontier for it bounds keys with a first pass
    without recomputation (`planner.frontier._Reach`): under its budgets and with each lifted alone, the
    best of the tables' first fitting plans is the brute-force optimum."""
    spec, _, optimizer, _, _ = SMALL[name]
    rng = random.Random(name + "one")
    costs = brute_force(name)[1]
    tables = small_tables(name)
    for _ in range(8):
        budgets = random_budgets(rng, costs)
        stacked = Budgets.stack([budgets])
        frontiers = {table: compute_frontier(table, stacked) for table in tables}
        for lifted, (one, many) in zip(("none", *BUDGETS), [(budgets, stacked)] + [
                (budgets.without(b), stacked.without(b)) for b in BUDGETS]):
            def first_fitting(table, _):
                index = frontiers[table].best(many)[0]
                return None if index < 0 else frontiers[table].selections[index]

            found = best_over_tables(tables, one, first_fitting)
            mode = None if found is None else found[0].mode(found[1])
            report = None if found is None else estimate(spec, mode, BATCH, SEQ, optimizer)
            got = None if found is None else key_of(Objective(), spec, mode, report)
            assert got == brute_best(Objective(), name, one), lifted


@pytest.mark.parametrize("name", ["tied-lora", "char-gpt-xs", "minilm-l6"])
def test_process_memory_is_costmodel_process_and_plans_stay_optimal_with_allocator_slack(name):
    """With the allocator's slack on (as measured runtimes have it), the planner's process memory of a
    plan is `costmodel.process`'s: runtime and shard, tensor peak, slack on the peak less the weights
    (`churned_bytes`), with the kept received tensors bounded by the upload (at least
    `costmodel.process.kept_bytes`); and the ILP and the frontier (for all devices, and for these)
    give the brute-force optimum under it, budgets lifted too."""
    spec, _, optimizer, _, _ = SMALL[name]
    rng = random.Random(name + "slack")
    modes, costs = brute_force(name)
    tables = small_tables(name)
    for table in tables:
        for _ in range(10):
            mode = rng.choice([mode for mode in modes if mode.frozen == table.frozen])
            selection = table.selection(mode)
            report = estimate(spec, mode, BATCH, SEQ, optimizer)
            overhead, fixed = rng.choice([0.05, 0.4, 3.0]), rng.randint(0, 2**24)
            planned = Budgets(2**40, 1e18, 2**40, 1, 0.0, fixed, overhead).process_bytes(table.evaluate(selection))[0]
            kept = report.totals["upload_bytes"]
            assert kept >= kept_bytes(spec, mode, report)
            assert planned - kept == fixed + report.peak_bytes + math.ceil(overhead * churned_bytes(report))
    process = costs["peak"] + np.ceil(3.0 * costs["churned"]) + costs["kept"]
    for trial in range(8):
        memory = int(rng.choice(process)) if trial % 2 else rng.uniform(0.9 * process.min(), 1.02 * process.max())
        budgets = Budgets(memory, rng.uniform(0.9, 1.02) * costs["flops"].max() * rng.random(),
                          round(rng.uniform(0.9 * costs["upload"].min(), 1.02 * costs["upload"].max())), 1, 0.0, 0, 3.0)
        stacked = Budgets.stack([budgets])
        others = [random_budgets(rng, costs) for _ in range(5)]  # more than FEW_DEVICES: the whole frontier
        fleet = {table: compute_frontier(table, Budgets.stack([budgets, *others])) for table in tables}
        alone = {table: compute_frontier(table, stacked) for table in tables}
        for one, many in [(budgets, stacked)] + [(budgets.without(b), stacked.without(b)) for b in BUDGETS]:
            expected = brute_best(Objective(), name, one)
            solvers = [lambda t, b: DeviceIlp(t, b).solve()] if one is budgets else []
            for frontiers in (fleet, alone):
                solvers.append(lambda t, b, f=frontiers: None if (i := f[t].best(many)[0]) < 0 else f[t].selections[i])
            for solve in solvers:
                found = best_over_tables(tables, one, solve)
                mode = None if found is None else found[0].mode(found[1])
                got = None if found is None else key_of(Objective(), spec, mode, estimate(spec, mode, BATCH, SEQ,
                                                                                           optimizer))
                assert got == expected


def test_equal_value_goes_to_fewer_flops_so_recomputation_only_where_memory_needs_it():
    """Training every block, with or without recomputation, has equal value; where both fit, the plan
    without (fewer FLOPs, more memory) wins. At the memory of recomputing every block, the plan trains
    every block and recomputes the subset of least FLOPs that fits (brute force through `estimate`)."""
    spec = ZOO["char-gpt-xs"]
    table = CostTable(spec, BATCH, SEQ, "sgd", recompute=True)
    frontier = compute_frontier(table)
    every = frozenset(range(spec.n_blocks))
    subsets = [frozenset(r) for k in range(spec.n_blocks + 1) for r in itertools.combinations(every, k)]
    reports = [estimate(spec, TrainMode(blocks=every, recompute=r), BATCH, SEQ, "sgd") for r in subsets]
    flops = [r.totals["fwd_flops"] + r.totals["bwd_flops"] for r in reports]
    process = [r.peak_bytes + r.totals["upload_bytes"] for r in reports]
    assert process[-1] < process[0] and flops[-1] > flops[0]  # recomputing all: less memory, more FLOPs
    for memory, expected in ((math.inf, 0), (process[-1], None)):
        budgets = Budgets(memory, math.inf, math.inf, 1, 0.0)
        if expected is None:
            expected = min((i for i in range(len(subsets)) if process[i] <= memory), key=flops.__getitem__)
        by_frontier = frontier.selections[frontier.best(Budgets.stack([budgets]))[0]]
        for chosen in (DeviceIlp(table, budgets).solve(), by_frontier):
            assert table.mode(chosen) == TrainMode(blocks=every, recompute=subsets[expected])
    assert subsets[expected]


def test_int8_frozen_weights_train_more_blocks_in_the_same_memory():
    """minilm-l6, whose frozen weights dominate its memory: at some tensor peak, int8 frozen weights let
    a device train more blocks than fp32 ones (brute force through `estimate`). The planner, with
    memory for the whole process (tensor peak + kept received bytes, `costmodel.process`), offered
    int8 trains as many blocks as that figure allows over fp32 and int8 plans, without it as over
    fp32 plans alone, whichever `costmodel.process` makes the smaller."""
    spec, _, optimizer, _, _ = SMALL["minilm-l6"]
    modes, costs = brute_force("minilm-l6")
    blocks = np.array([len(mode.blocks) for mode in modes])
    fp32, int8 = (np.array([mode.frozen == f for mode in modes]) for f in (None, "int8"))

    def most_blocks(plans, memory, budget) -> int:
        return int(blocks[plans & (memory <= budget)].max(initial=-1))

    gains = [m for m in np.unique(costs["peak"][int8]) if most_blocks(int8, costs["peak"], m)
             > most_blocks(fp32, costs["peak"], m)]
    assert gains  # on the tensor peak
    process = costs["peak"] + costs["kept"]
    for memory in (gains[0], gains[-1], *np.unique(process[int8])[::40]):
        device = DeviceSpec(name="d", memory_bytes=int(memory), compute_flops=1e18, upload_bytes=2**40,
                            local_steps=1, batch_size=BATCH, runtime=TENSORS_ONLY)
        for menu, plans in (((), fp32), (("int8",), fp32 | int8)):
            entry = plan([spec], [device], PlanSettings(seq=SEQ, optimizer=optimizer, margin=0.0, frozen=menu)).devices[0]
            assert (len(entry.trained_blocks) if entry.mode else -1) == most_blocks(plans, process, memory)


def test_table_refuses_modes_outside_its_menu():
    table = small_table("gpt5-lora")  # ranks 2 and 4, no recompute
    for mode, message in ((TrainMode(lora={0: 8}), "not in the menu"), (TrainMode(blocks={1}, recompute={1}), "recompute"),
                          (TrainMode(blocks={1}, frozen="int8"), "holds frozen weights in fp32")):
        with pytest.raises(ValueError, match=message):
            table.selection(mode)
    with pytest.raises(ValueError, match="holds frozen weights int8"):
        small_table("gpt5-lora", frozen="int8").selection(TrainMode(blocks={1}))
    with pytest.raises(ValueError, match="already holds its weights in bf16"):
        small_table("bf16-lora", frozen="bf16")


def test_infeasible_device_gets_the_head_only_needs():
    spec, _, optimizer, _, _ = SMALL["gpt10"]
    head = estimate(spec, TrainMode(), BATCH, SEQ, optimizer)
    flops = head.totals["fwd_flops"] + head.totals["bwd_flops"]
    device = DeviceSpec(name="tiny", memory_bytes=head.peak_bytes // 2, compute_flops=1e15,
                        upload_bytes=head.totals["upload_bytes"] - 1, local_steps=3, batch_size=BATCH,
                        runtime=TENSORS_ONLY)
    for solver in ("frontier", "ilp"):
        entry = plan([spec], [device], PlanSettings(seq=SEQ, optimizer=optimizer, solver=solver)).devices[0]
        assert (entry.status, entry.mode, entry.peak_bytes) == ("infeasible", None, None)
        assert entry.binding == ["memory", "upload"]
        assert entry.needs.memory_bytes == pytest.approx((head.peak_bytes + head.totals["upload_bytes"]) / 0.95)
        assert (entry.needs.compute_flops, entry.needs.upload_bytes) == (3 * flops, head.totals["upload_bytes"])


# -- fleets -------------------------------------------------------------------------------------

def random_devices(rng: random.Random, name: str, n: int, batches=(BATCH, 2 * BATCH)) -> list[DeviceSpec]:
    _, costs = brute_force(name)
    devices = []
    for i in range(n):
        b = random_budgets(rng, costs)
        devices.append(DeviceSpec(name=f"d{i}", memory_bytes=max(1, int(b.memory_bytes)),
                                  compute_flops=max(1.0, b.compute_flops), upload_bytes=max(1, int(b.upload_bytes)),
                                  local_steps=b.local_steps, batch_size=rng.choice(batches), runtime=TENSORS_ONLY))
    return devices


@pytest.mark.parametrize("n", [FEW_DEVICES, 2 * FEW_DEVICES])  # frontiers pruned by the devices' budgets; whole,
def test_fleet_frontier_plans_equal_per_device_ilp(n):                # the large ones computed on threads
    specs = [SMALL["gpt5-lora"][0], SMALL["gpt10"][0]]
    devices = random_devices(random.Random(3), "gpt5-lora", n)
    settings = PlanSettings(lora_ranks=(2, 4), recompute=True, seq=SEQ, optimizer="adam")
    by_frontier = plan(specs, devices, settings)
    by_ilp = plan(specs, devices, dataclasses.replace(settings, solver="ilp"))
    summary = lambda p: [(a.model, a.score, a.infeasible_devices) for a in p.architectures]  # noqa: E731
    assert summary(by_frontier) == summary(by_ilp)
    same = lambda e: (e.status, len(e.trained_blocks), e.upload_bytes, e.peak_bytes, e.binding, e.needs)  # noqa: E731
    assert [same(e) for e in by_frontier.devices] == [same(e) for e in by_ilp.devices]


@pytest.mark.parametrize("seed", range(3))
def test_a_few_devices_get_the_plans_a_fleet_gives_them_though_trying_compact_weights_only_where_memory_holds(seed):
    """A few devices are solved on tables with compact frozen weights only where lifting memory reaches a
    better plan on the tables without (`planner.fleet._held_by_memory`); a fleet solves every device on
    every table. The same devices get the same plans either way, compact ones included."""
    specs = [SMALL["gpt5-lora"][0]]
    devices = [device.model_copy(update={"name": f"device-{i}"})
               for i, device in enumerate(random_devices(random.Random(seed), "gpt5-lora", 3 * FEW_DEVICES))]
    settings = PlanSettings(lora_ranks=(2, 4), recompute=True, frozen=("int8", "bf16"), seq=SEQ, optimizer="adam")
    same = lambda e: (e.status, e.mode, e.upload_bytes, e.peak_bytes, e.flops_per_round, e.binding, e.needs)  # noqa: E731
    fleet = [same(e) for e in plan(specs, devices, settings).devices]
    few = [same(e) for start in range(0, len(devices), FEW_DEVICES)
           for e in plan(specs, devices[start:start + FEW_DEVICES], settings).devices]
    assert few == fleet
    assert any("frozen:" in (mode or "") for _, mode, *_ in fleet) or seed  # compact weights do win somewhere


def test_fleet_chooses_the_architecture_and_every_plan_fits():
    rng = random.Random(7)
    specs = [ModelSpec(name=f"gpt{n}", kind="gpt", n_blocks=n, d_model=32, n_heads=2, d_ff=64, max_seq_len=16,
                       vocab_size=20) for n in (2, 4, 6)]
    devices = random_devices(rng, "gpt10", 300)
    result = plan(specs, devices, PlanSettings(seq=SEQ, optimizer="sgd", lora_ranks=(2,), recompute=True))
    scores = {a.model: a.score for a in result.architectures}
    without = plan(specs, devices, PlanSettings(seq=SEQ, optimizer="sgd", lora_ranks=(2,)))
    assert all(a.score >= b.score for a, b in zip(result.architectures, without.architectures))
    assert sum(a.score for a in result.architectures) > sum(b.score for b in without.architectures)
    assert any("recompute" in e.mode for e in result.devices if e.mode) and not any(
        "recompute" in e.mode for e in without.devices if e.mode)
    assert result.winner == max(scores, key=scores.get)
    assert all(a.verdict.startswith("won" if a.model == result.winner else "lost") for a in result.architectures)
    spec = result.spec(result.winner)
    total = 0
    for entry, device in zip(result.devices, devices):
        assert entry.budgets.batch_size == device.batch_size
        if entry.status == "infeasible":
            continue
        total += len(entry.trained_blocks)
        report = estimate(spec, TrainMode.parse(entry.mode, spec.n_blocks), device.batch_size, SEQ, "sgd")
        assert report.peak_bytes == entry.peak_bytes == entry.process.tensor_peak_bytes
        assert entry.process.total_bytes <= device.memory_bytes * 0.95
        assert entry.flops_per_round == device.local_steps * (report.totals["fwd_flops"] + report.totals["bwd_flops"])
        assert entry.flops_per_round <= device.compute_flops
        assert entry.upload_bytes == report.totals["upload_bytes"] <= device.upload_bytes
    assert total / len(devices) == pytest.approx(scores[result.winner])
    winner = next(a for a in result.architectures if a.model == result.winner)
    trained = [set(e.trained_blocks) | set(e.lora_ranks) for e in result.devices]
    assert winner.coverage == pytest.approx([sum(b in t for t in trained) / len(trained) for b in range(spec.n_blocks)])


def test_min_coverage_rules_out_architectures():
    specs = [ModelSpec(name=f"gpt{n}", kind="gpt", n_blocks=n, d_model=32, n_heads=2, d_ff=64, max_seq_len=16,
                       vocab_size=20) for n in (2, 6)]
    devices = random_devices(random.Random(11), "gpt10", 200, batches=(BATCH,))
    free = plan(specs, devices, PlanSettings(seq=SEQ))
    coverage = {a.model: min(a.coverage) for a in free.architectures}
    assert coverage["gpt6"] < coverage["gpt2"] < 1
    between = (coverage["gpt6"] + coverage["gpt2"]) / 2
    guarded = plan(specs, devices, PlanSettings(seq=SEQ, min_coverage=between))
    assert guarded.winner == "gpt2"
    loser = next(a for a in guarded.architectures if a.model == "gpt6")
    assert not loser.meets_min_coverage and "below the minimum coverage" in loser.verdict
    nobody = plan(specs, devices, PlanSettings(seq=SEQ, min_coverage=1.0))
    assert nobody.winner is None and nobody.devices == []


def test_batch_override_and_bad_settings():
    spec = SMALL["gpt10"][0]
    devices = random_devices(random.Random(5), "gpt10", 5)
    result = plan([spec], devices, PlanSettings(seq=SEQ, batch=2))
    assert {e.budgets.batch_size for e in result.devices} == {2}
    with pytest.raises(ValueError, match="margin"):
        PlanSettings(margin=1.0)
    with pytest.raises(ValueError, match="objective"):
        plan([spec], devices, PlanSettings(seq=SEQ, objective=Objective("weights", (1.0, 2.0))))
    with pytest.raises(ValueError, match="seq"):
        plan([spec], devices, PlanSettings(seq=SEQ + 1))
    assert str(Objective.parse("1,2.5")) == "1,2.5" and Objective.parse("params").kind == "params"
    with pytest.raises(ValueError, match="objective"):
        Objective.parse("blocks,")


def test_budgets_without_lifts_one_budget():
    costs = PlanCosts(*(np.array([10]),) * 7)
    budgets = Budgets(5, 5, 5)
    assert not budgets.fits(costs)[0]
    assert [bool(budgets.without(b).over(costs)[b][0]) for b in BUDGETS] == [False] * 3


@pytest.mark.parametrize("n", [1, 2 * FEW_DEVICES])  # a few devices in turn; a fleet on threads
def test_devices_with_budgets_beyond_int64_are_planned_as_if_unbounded(n):
    """Budgets a device spec may hold but int64 cannot (memory 10^30 bytes, upload 10^300 bytes: Python
    integers, stacked as object arrays) allow as much as a budget lifted; with every menu on, each
    device trains everything, bound by nothing, as a device with all three budgets lifted would."""
    huge = [DeviceSpec(name=f"huge-{i}", memory_bytes=10**30, compute_flops=1e300, upload_bytes=10**300,
                       local_steps=1 + i % 3, batch_size=BATCH, runtime=TENSORS_ONLY) for i in range(n)]
    stacked = Budgets.stack([Budgets.of_device(d) for d in huge])
    lifted = stacked.without("memory").without("compute").without("upload")
    assert [np.broadcast_to(a, (n, 1)).tolist() for a in (*stacked.allowances(), *lifted.allowances())] == \
        [[[MAX_COST]] * n] * 6
    settings = PlanSettings(lora_ranks=(2, 4), recompute=True, frozen=("int8", "bf16"), seq=SEQ, optimizer="adam")
    spec = SMALL["gpt5-lora"][0]
    result = plan([spec], huge, settings)
    assert [(e.status, e.trained_blocks, e.binding) for e in result.devices] == \
        [("optimal", list(range(spec.n_blocks)), [])] * n


# -- plan files ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_plan():
    spec = SMALL["tied-lora"][0]
    devices = random_devices(random.Random(2), "tied-lora", 6)
    return plan([spec, SMALL["gpt10"][0]], devices, PlanSettings(seq=SEQ, lora_ranks=(2,), recompute=True,
                                                                 optimizer="momentum"))


def test_plan_file_round_trip_is_atomic(tmp_path, small_plan):
    path = tmp_path / "plan.json"
    write_plan_file(path, small_plan)
    assert read_plan_file(path) == small_plan
    assert os.listdir(tmp_path) == ["plan.json"]
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["recompute"] is True
    del data["recompute"], data["frozen"]  # a plan file written before the recompute and frozen menus
    path.write_text(json.dumps(data))
    assert read_plan_file(path).recompute is False and read_plan_file(path).frozen == []


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.pop("devices"), "devices: Field required"),
    (lambda d: d["devices"][0].update(model="nope"), "model 'nope' is not the winner"),
    (lambda d: d["devices"][0].update(status="sometimes"), "devices[0].status"),
    (lambda d: d["devices"][0]["budgets"].update(local_steps=0), "devices[0].budgets.local_steps"),
])
def test_bad_plan_files_fail_with_one_line(tmp_path, small_plan, edit, message):
    data = json.loads(small_plan.model_dump_json())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        read_plan_file(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plan_file_mode_must_match_its_blocks(tmp_path, small_plan):
    data = json.loads(small_plan.model_dump_json())
    entry = next(e for e in data["devices"] if e["status"] == "optimal")
    entry["trained_blocks"] = [0, 1, 2, 3] if entry["trained_blocks"] != [0, 1, 2, 3] else []
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="disagrees"):
        read_plan_file(tmp_path / "p.json")
    (tmp_path / "q.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON plan file"):
        read_plan_file(tmp_path / "q.json")


# -- caff plan ----------------------------------------------------------------------------------

def test_cli_plans_a_device_as_json(capsys):
    assert main(["plan", "char-gpt-xs", "--device", "rpi4-2gb", "--lora-ranks", "4,8", "--recompute", "--frozen",
                 "int8,bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recompute"] is True and out["frozen"] == ["int8", "bf16"]
    entry = out["devices"][0]
    assert (entry["device"], entry["model"], entry["status"]) == ("rpi4-2gb", "char-gpt-xs", "optimal")


def test_cli_plans_a_fleet_and_writes_the_plan(tmp_path, capsys):
    path = tmp_path / "plan.json"
    args = ["plan", "char-gpt-xs,char-gpt-s", "--fleet", "heterogeneous-mix", "--fleet-size", "40", "-o", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "winner:" in out and "Architectures" in out
    assert len(read_plan_file(path).devices) == 40


@pytest.mark.parametrize("args, message", [
    (["--device", "rpi4-2gb", "--margin", "1.5"], "--margin: must be in [0, 1)"),
    (["--device", "rpi4-2gb", "--lora-ranks", "4,x"], "--lora-ranks"),
    (["--device", "rpi4-2gb", "--frozen", "int4"], "--frozen: formats are bf16 and int8"),
    (["--device", "rpi4-2gb", "--objective", "1,2"], "--objective: 2 weights"),
    (["--device", "rpi4-2gb", "--fleet-size", "3"], "--fleet-size"),
    (["--fleet", "heterogeneous-mix"], "--fleet-size"),
    (["--device", "no-such-device"], "unknown device"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, args, message):
    assert main(["plan", "char-gpt-xs", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("caff: error: ") and message in err and err.count("\n") == 1


def test_cli_without_a_winner_exits_1(capsys):
    assert main(["plan", "char-gpt-s", "--fleet", "iot-edge", "--min-coverage", "1"]) == 1
    assert "no architecture meets the minimum coverage" in capsys.readouterr().out
