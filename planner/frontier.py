"""The Pareto frontier of a table's plans: every plan that is some device's optimum, whatever its budgets.

A device's optimum is the plan of largest key (primary, trained bytes; lexicographic, see
`Objective`), then fewest FLOPs, then least peak, among plans within its memory, compute and upload
budgets (a table's plans share one precision of frozen weights). A plan q *dominates* p when
key(q) >= key(p) and q needs no more peak memory, FLOPs, upload or kept bytes than p: wherever p
fits, q fits and is at least as good. So the non-dominated plans, sorted
by (key descending, FLOPs ascending, peak ascending), hold every device's optimum: the first one
that fits.

The frontier is exact, computed by dynamic programming over the layers in topological order.
With per layer j ``base_j = W_j + O_j + buffers_j``, ``below_j = A_j - external_j``, ``G_j``,
``F_j``, ``B_j`` and ``S_j`` (`CostTable.memory_terms`), a partial plan (a label) of the first
layers carries, in bytes and FLOPs per step, each memory phase of `costmodel.estimate` so far with
the terms later layers add to it left out::

    below = sum_j base_j + below_j                      (what a later layer's phases start from)
    grad  = sum_j base_j + G_j
    fwd   = max over its layers l of  sum_j base_j + below_{<l} + F_l
    bwd   = max over its layers l of  sum_j base_j + grad_{<=l} + S_l, and over those l in backward
            of  sum_j base_j + below_{<l} + B_l + grad_{>l}
    flops, upload, kept (received bytes kept, `CostTable.kept_bytes`), and the key

Each later layer adds its base to every phase and its G to the backward and optimizer phases, so
once every layer is placed, ``peak = X + max(fwd, bwd)`` (the optimizer's largest temporary S
joins the optimizer phase of its own layer). Adding a layer changes each quantity by a
nondecreasing function of the old ones, and lexicographic order is kept under addition, so a label
dominated (key >=, every quantity <=) by another with the same *signature* (which later layers
already have an input that requires grad) can never complete to a better plan than its dominator
does: dropping it is exact.
Without LoRA menus the plan space is 2^blocks; with a menu of r ranks (2 + r)^blocks, and with
recomputation (2 + 2r)^blocks, of which the pruning keeps some hundreds of labels (12 blocks and 3
ranks: at most ~1,300 before a layer's pruning, a frontier of ~200-300 plans; with recomputation
too, up to ~100,000 before a layer's pruning and a frontier of ~5,000-8,500 plans, each key's
plans trading FLOPs for memory). Tests check the frontier against enumeration through `estimate` and
against the per-device ILP.

Given the budgets of the devices it serves, the frontier keeps only the plans that fit some device
with at most one of its budgets lifted (all the fleet planner asks of it: each device's optimum,
and whether lifting one budget reaches a better plan). Every quantity of a label is a lower bound
on that of any plan it completes to (later layers add nonnegative bytes and FLOPs: at least each
later layer's cheapest option), so a label whose bounds exceed the largest allowance of the fleet
in two budgets or more completes to no such plan, and is dropped (`_beyond_reach`). A dominated label
exceeds what its dominator exceeds, so the two prunings agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from planner.budget import Budgets
from planner.table import CostTable, PlanCosts

# columns of a label's quantities
BELOW, GRAD, FWD, BWD, FLOPS, UPLOAD, KEPT = range(7)
FEW = 64  # labels kept without pruning at a layer (the final pruning removes what is dominated)


@dataclass
class Frontier:
    """Non-dominated plans of one table, best first: key descending, then FLOPs, then peak ascending."""

    table: CostTable
    selections: np.ndarray  # (plans, layers) option indices
    costs: PlanCosts

    def __len__(self) -> int:
        return len(self.selections)

    def best(self, budgets: Budgets, chunk: int = 1024) -> np.ndarray:
        """For budgets of many devices (column arrays), the index of each one's optimal plan; -1 where
        none fits. A device under the least cost of every plan in a budget fits none; the others
        go ``chunk`` at a time, so that memory stays ~chunk x plans x 8 bytes."""
        found = np.full(budgets.devices, -1)
        if not len(self):
            return found
        least = PlanCosts(*(getattr(self.costs, f.name)[[0]].clip(max=getattr(self.costs, f.name).min())
                            for f in dataclasses.fields(PlanCosts)))
        could = np.flatnonzero(np.broadcast_to(budgets.fits(least), (budgets.devices, 1))[:, 0])
        for start in range(0, len(could), chunk):
            devices = could[start:start + chunk]
            fits = budgets.rows(devices).fits(self.costs)
            found[devices] = np.where(fits.any(axis=1), fits.argmax(axis=1), -1)
        return found


def compute_frontier(table: CostTable, budgets: Budgets | None = None) -> Frontier:
    """The exact frontier of ``table`` by dynamic programming with dominance pruning; with ``budgets``
    (column arrays, many devices), only its plans that fit some device with at most one budget lifted."""
    q = table.memory_terms
    reach = _Reach(table, budgets) if budgets is not None else None
    width = KEPT + 1 if table.frozen else KEPT  # without compact weights the kept bytes are the upload bytes
    last_choice = max((at for at, name in enumerate(table.layers) if len(table.states[name]) > 1), default=-1)
    layers = table.layers
    position = {name: i for i, name in enumerate(layers)}
    descendants = np.zeros((len(layers), len(layers)), dtype=bool)  # descendants[a, l]: l is below a
    for name in layers:
        for ancestor in table.ancestors[name]:
            descendants[position[ancestor], position[name]] = True
    option_trains = np.array([o.trains for o in table.options])

    quantities = np.zeros((1, 7), dtype=np.int64)
    primary = np.zeros(1)
    trained = np.zeros(1, dtype=np.int64)
    selections = np.zeros((1, 0), dtype=np.int64)
    input_grad = np.zeros((1, len(layers)), dtype=bool)  # per label, per layer
    for at, name in enumerate(layers):
        options = np.array(table.layer_options[name])
        flags = np.array([table.options[i].input_grad for i in options])
        # every label extends with every option whose flag matches the label's input_grad at this layer
        label, choice = np.nonzero(flags[None, :] == input_grad[:, at][:, None])
        option = options[choice]
        old = quantities[label]
        new = np.empty_like(old)
        base = q["base"][option]
        new[:, BELOW] = old[:, BELOW] + base + q["below"][option]
        new[:, GRAD] = old[:, GRAD] + base + q["grad"][option]
        new[:, FWD] = np.maximum(old[:, FWD] + base, old[:, BELOW] + base + q["fwd"][option])
        # earlier backward phases also hold this layer's gradients; its optimizer temporary joins all of them
        earlier = np.maximum(old[:, BWD] + base + q["grad"][option], new[:, GRAD] + q["temp"][option])
        new[:, BWD] = np.where(q["in_backward"][option],
                               np.maximum(earlier, old[:, BELOW] + base + q["bwd"][option]), earlier)
        new[:, FLOPS] = old[:, FLOPS] + table.step_flops[option]
        new[:, UPLOAD] = old[:, UPLOAD] + table.upload_bytes[option]
        new[:, KEPT] = old[:, KEPT] + table.kept_bytes[option]
        primary = primary[label] + table.primary[option]
        trained = trained[label] + table.trained_bytes[option]
        selections = np.column_stack([selections[label], option])
        input_grad = input_grad[label] | (option_trains[option][:, None] & descendants[at][None, :])
        if reach is not None:
            near = ~reach.beyond(at, new)
            new, primary, trained, selections, input_grad = (a[near] for a in (new, primary, trained, selections,
                                                                               input_grad))
        if len(new) <= FEW or last_choice <= at:  # prune many new labels while choices remain; the final pruning follows
            quantities = new
            continue
        # a forward phase at or under the backward phases so far stays so (each later layer adds its base
        # to the one, its base and gradients to the other): where FWD <= BWD, FWD cannot matter
        costs = new[:, :width].copy()
        costs[costs[:, FWD] <= costs[:, BWD], FWD] = -1
        keep = _non_dominated(primary, trained, costs, input_grad[:, at + 1:])
        quantities, primary, trained = new[keep], primary[keep], trained[keep]
        selections, input_grad = selections[keep], input_grad[keep]
    final = PlanCosts(
        peak_bytes=table.batch_bytes + np.maximum(quantities[:, FWD], quantities[:, BWD]),
        step_flops=quantities[:, FLOPS], upload_bytes=quantities[:, UPLOAD], trained_bytes=trained, primary=primary,
        kept_bytes=quantities[:, KEPT], precision=np.full(len(primary), table.precision))
    keep = _non_dominated(primary, trained, np.column_stack(
        [final.peak_bytes, final.step_flops, final.upload_bytes, final.kept_bytes][:width - 3]),
        np.zeros((len(primary), 0), dtype=bool))
    order = keep[np.lexsort((final.peak_bytes[keep], final.step_flops[keep], -trained[keep], -primary[keep]))]
    return Frontier(table, selections[order], final.take(order))


class _Reach:
    """The largest allowance of many devices in each budget, and per layer the least bytes and FLOPs
    the layers after it add to a label's quantities (`compute_frontier`)."""

    def __init__(self, table: CostTable, budgets: Budgets):
        self.memory, self.compute, self.upload = (int(np.max(a)) for a in budgets.allowances())
        self.overhead = float(np.min(budgets.tensor_overhead))
        q = table.memory_terms
        least = lambda values: np.array([min(int(values[i]) for i in table.layer_options[name])  # noqa: E731
                                         for name in table.layers] + [0], dtype=np.int64)
        after = lambda values: np.cumsum(least(values)[::-1])[::-1][1:]  # noqa: E731  sum over layers > at
        self.batch_bytes = table.batch_bytes
        self.base, self.base_grad = after(q["base"]), after(q["base"] + q["grad"])
        self.flops, self.uploads, self.kept = after(table.step_flops), after(table.upload_bytes), after(table.kept_bytes)

    def beyond(self, at: int, labels: np.ndarray) -> np.ndarray:
        """Whether each label (quantities after layer ``at``) completes only to plans that exceed the
        fleet's largest allowance in two budgets or more."""
        peak = self.batch_bytes + np.maximum(labels[:, FWD] + self.base[at], labels[:, BWD] + self.base_grad[at])
        memory = peak + np.ceil(peak * self.overhead).astype(np.int64) + labels[:, KEPT] + self.kept[at]
        over = ((memory > self.memory).astype(np.int8) + (labels[:, FLOPS] + self.flops[at] > self.compute)
                + (labels[:, UPLOAD] + self.uploads[at] > self.upload))
        return over >= 2


def _non_dominated(primary: np.ndarray, trained: np.ndarray, costs: np.ndarray, signature: np.ndarray,
                   size: int = 256, block: int = 4096) -> np.ndarray:
    """Indices of labels no other label of the same signature dominates (key >= and costs <=);
    of identical labels the first is kept. Each signature's labels go on their own, with each cost
    column replaced by its dense rank (the same comparisons, in 2 or 4 bytes rather than 8)."""
    if not len(primary):
        return np.zeros(0, dtype=np.int64)
    ranked = np.column_stack([np.unique(column, return_inverse=True)[1].ravel() for column in costs.T])
    ranked = ranked.astype(np.int16 if ranked.max() < 2**15 else np.int32)
    packed = np.packbits(signature, axis=1)
    sig = np.unique(packed.view(f"V{packed.shape[1]}").ravel(), return_inverse=True)[1].ravel() if packed.size \
        else np.zeros(len(primary), dtype=np.int64)
    kept = []
    for value in np.unique(sig):
        members = np.flatnonzero(sig == value)
        kept.append(members[_non_dominated_alike(primary[members], trained[members], ranked[members], size, block)])
    return np.concatenate(kept)


def _non_dominated_alike(primary: np.ndarray, trained: np.ndarray, costs: np.ndarray, size: int,
                         block: int) -> np.ndarray:
    """`_non_dominated` among labels of one signature.

    Sorted by key descending, then costs, a label's dominators all come before it, and every label
    before it is kept or dominated by a kept one. The sorted labels are cut into groups at key
    boundaries (runs of one key, joined until a group holds ``size``). A label of group A can
    dominate one of group B only if A's least costs (per column) are <= B's largest. So each group in
    turn is tested, ``size`` rows by ``block`` labels at a time, against its own earlier labels and
    against the kept labels of the earlier groups that pass that test, each row dropped once dominated."""
    order = np.lexsort((*costs.T[::-1], -trained, -primary))
    columns = np.ascontiguousarray(costs[order].T)
    runs = np.flatnonzero(np.concatenate([[True], (np.diff(primary[order]) != 0) | (np.diff(trained[order]) != 0)]))
    starts = runs[np.concatenate([[True], np.diff(runs // size) > 0])]
    ends = np.append(starts[1:], len(order))
    least = np.stack([np.minimum.reduceat(column, starts) for column in columns], axis=1)
    most = np.stack([np.maximum.reduceat(column, starts) for column in columns], axis=1)

    def dominated(rows: np.ndarray, by: np.ndarray) -> np.ndarray:
        """Per row, whether a label of ``by`` (positions in ``order``) before it dominates it."""
        found = by[None, :] < rows[:, None]
        for column in columns:
            found &= column[by][None, :] <= column[rows][:, None]
        return found.any(axis=1)

    def survivors(rows: np.ndarray, by: np.ndarray) -> np.ndarray:
        for start in range(0, len(by), block):
            if not len(rows):
                break
            rows = rows[~dominated(rows, by[start:start + block])]
        return rows

    kept: list[np.ndarray] = []
    for g, (start, end) in enumerate(zip(starts, ends)):
        rows = np.concatenate([survivors(np.arange(at, min(at + size, end)), np.arange(start, min(at + size, end)))
                               for at in range(start, end, size)])
        could = np.flatnonzero((least[:g] <= most[g]).all(axis=1))[::-1]  # latest first: likeliest dominators
        kept.append(survivors(rows, np.concatenate([kept[a] for a in could]) if len(could) else could))
    return order[np.concatenate(kept)]
