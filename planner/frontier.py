"""The Pareto frontier of a table's plans: every plan that is some device's optimum, whatever its budgets.

A device's optimum is the plan of largest key (primary, trained bytes; lexicographic, see
`Objective`), then fewest FLOPs, then least peak, among plans within its memory, compute and upload
budgets (a table's plans share one precision of frozen weights). A plan q *dominates* p when
key(q) >= key(p) and q needs no more peak memory, FLOPs or upload bytes than p, and no more
churned bytes (peak less weights, on which the allocator's slack is charged): wherever p fits, q fits
and is at least as good. So the non-dominated plans, sorted
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
    flops, upload (also the planner's bound on the received bytes kept), weights, and the key

Each later layer adds its base to every phase and its G to the backward and optimizer phases, so
once every layer is placed, ``peak = X + max(fwd, bwd)`` (the optimizer's largest temporary S
joins the optimizer phase of its own layer). Adding a layer changes each quantity by a
nondecreasing function of the old ones, and lexicographic order is kept under addition, so a label
dominated (key >=, weights >=, every other quantity <=) by another with the same *signature* (which later layers
already have an input that requires grad) can never complete to a better plan than its dominator
does: dropping it is exact. A label's fwd at or under its bwd stays under it whatever follows (a
later layer adds its base to fwd, its base and G to bwd), so there fwd cannot matter and the pruning
compares it as -1. Labels are held class by class (alike in signature and key, larger keys first):
a class's labels extended by one option make a run, and a layer's runs are grouped into the next
classes, so no label is ever sorted. The pruning (`_skyline`) settles the classes one at a time:
within a class, each label against those kept so far; then each survivor against the kept labels of
the classes of larger key whose least costs allow it. The loops over labels (`_extended`, `_skyline`,
`_reaching`, and `_first_fitting` for many devices' optima) are compiled by numba and run outside
the interpreter's lock.
Without LoRA menus the plan space is 2^blocks; with a menu of r ranks (2 + r)^blocks, and with
recomputation (2 + 2r)^blocks, of which the pruning keeps some hundreds of labels (12 blocks and 3
ranks: at most ~1,300 before a layer's pruning, a frontier of ~200-300 plans; with recomputation
too, up to ~80,000 before a layer's pruning and a frontier of ~5,000-8,500 plans, each key's
plans trading FLOPs for memory). Tests check the frontier against enumeration through `estimate` and
against the per-device ILP.

Given the budgets of a few devices (at most FEW_DEVICES), the frontier keeps only the plans that can
be the optimum of one of them with at most one of its budgets lifted (all the fleet planner asks of
it: each device's optimum, and whether lifting one budget reaches a better plan; `_Reach`). Every
quantity of a label is a lower bound on that of any plan it completes to (later layers add
nonnegative bytes and FLOPs: at least each later layer's cheapest option), so a label whose bounds
exceed a device's allowances completes to no plan within them, and with recomputation in the menu
keys are bounded too: a first pass without recomputation (a frontier of some hundreds of plans)
gives each device a key it surely reaches, and a label whose key plus the most the later layers can
add stays below that key for every device with room for it completes to no device's optimum. A
dominated label exceeds what its dominator exceeds, so the two prunings agree. (Pruning by a whole
fleet's largest allowances did not pay: 10,000 devices of `bench/planner_scale.py` left the
frontiers nearly whole.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from planner.budget import BUDGETS, Budgets
from planner.table import MAX_COST, CostTable, PlanCosts, Recomputed

# columns of a label's quantities
BELOW, GRAD, FWD, BWD, FLOPS, UPLOAD, WEIGHT = range(7)  # WEIGHT: minus the weights (less slack)
FEW = 64  # labels kept without pruning at a layer (the final pruning removes what is dominated)
FEW_DEVICES = 4  # devices for which `_Reach` tests each one on its own


def _compiled(function):
    """``function`` compiled by numba (`numba.njit`, outside the interpreter's lock, cached on disk) at
    its first call: numba (~55 MB resident) loads only in a process that computes frontiers, never in
    a device's training process, which imports the planner only to read its plan (its runtime
    footprint was measured without numba). A cache that fails to load (a damaged file) is dropped and
    the function compiled afresh, once."""
    compiled = None

    @functools.wraps(function)
    def call(*args):
        nonlocal compiled
        if compiled is None:
            import numba

            compiled = numba.njit(nogil=True, cache=True)(function)
            try:
                return compiled(*args)
            except Exception:
                compiled._cache.flush()
                compiled = numba.njit(nogil=True, cache=True)(function)
        return compiled(*args)
    return call


@dataclass
class Frontier:
    """Non-dominated plans of one table, best first: key descending, then FLOPs, then peak ascending."""

    table: CostTable
    selections: np.ndarray  # (plans, layers) option indices
    costs: PlanCosts

    def __len__(self) -> int:
        return len(self.selections)

    def best(self, budgets: Budgets) -> np.ndarray:
        """For budgets of many devices (column arrays), the index of each one's optimal plan (the first
        within its `Budgets.allowances`); -1 where none fits."""
        devices = budgets.devices
        memory, compute, upload = (np.broadcast_to(np.asarray(a, dtype=np.int64), (devices, 1))[:, 0]
                                   for a in budgets.allowances())
        overhead = np.broadcast_to(np.asarray(budgets.tensor_overhead, dtype=np.float64), (devices, 1))[:, 0]
        return _first_fitting(self.costs.peak_bytes, self.costs.peak_bytes - self.costs.weight_bytes,
                              self.costs.step_flops, self.costs.upload_bytes, np.ascontiguousarray(memory),
                              np.ascontiguousarray(compute), np.ascontiguousarray(upload),
                              np.ascontiguousarray(overhead))


@_compiled
def _first_fitting(peak: np.ndarray, churn: np.ndarray, flops: np.ndarray, upload: np.ndarray, memory: np.ndarray,
                   compute: np.ndarray, uploads: np.ndarray, overhead: np.ndarray,
                   run: int = 64) -> np.ndarray:  # pragma: no cover
    """Per device, the first plan whose memory (`Budgets.process_bytes` less the fixed bytes: peak, the
    allocator's slack ``ceil(churn x overhead)``, the upload bytes kept), FLOPs and upload bytes are within
    its allowances ``memory``, ``compute`` and ``uploads``; -1 where none is. The plans go in runs of
    ``run``: a device skips a run where it falls short of the run's least of some need (memory: at least
    peak + upload), and stops where it falls short of the least over all the plans left."""
    plans, devices = len(peak), len(memory)
    runs = (plans + run - 1) // run
    least = np.full((runs, 3), np.iinfo(np.int64).max)  # per run, its least memory, FLOPs and upload
    for i in range(plans):
        r = i // run
        least[r, 0] = min(least[r, 0], peak[i] + upload[i])
        least[r, 1] = min(least[r, 1], flops[i])
        least[r, 2] = min(least[r, 2], upload[i])
    left = least.copy()  # per run, the least from it on
    for r in range(runs - 2, -1, -1):
        for k in range(3):
            left[r, k] = min(left[r, k], left[r + 1, k])
    found = np.full(devices, -1, dtype=np.int64)
    for d in range(devices):
        for r in range(runs):
            if left[r, 0] > memory[d] or left[r, 1] > compute[d] or left[r, 2] > uploads[d]:
                break
            if least[r, 0] > memory[d] or least[r, 1] > compute[d] or least[r, 2] > uploads[d]:
                continue
            for i in range(r * run, min(plans, (r + 1) * run)):
                if flops[i] <= compute[d] and upload[i] <= uploads[d] and \
                        peak[i] + np.int64(np.ceil(churn[i] * overhead[d])) + upload[i] <= memory[d]:
                    found[d] = i
                    break
            if found[d] >= 0:
                break
    return found


def compute_frontier(table: CostTable, budgets: Budgets | None = None) -> Frontier:
    """The exact frontier of ``table`` by dynamic programming with dominance pruning; with ``budgets``
    of at most FEW_DEVICES devices (column arrays), only its plans that can be one's optimum with at
    most one budget lifted (with more devices, the whole frontier). With recomputation in the menu, a
    first pass without it (a small frontier) gives each device a key it reaches (`_Reach.floors`), which
    the second pass cannot go below."""
    if budgets is None or budgets.devices > FEW_DEVICES:
        return _frontier(table)
    reach = _Reach(table, budgets)
    if table.recompute:
        reach.floors(_frontier(table, reach, [not isinstance(o.state, Recomputed) for o in table.options]), budgets)
    return _frontier(table, reach)


def _frontier(table: CostTable, reach: _Reach | None = None, allowed: list[bool] | None = None) -> Frontier:
    """`compute_frontier` over the options ``allowed`` (all by default), each label checked by ``reach``.

    The labels are held class by class (alike in signature and key; the classes of a signature by key
    descending), as `_skyline` prunes them: a class's labels extended by one option make a *run*, and
    each layer's runs are grouped into the new classes, so that no label is ever sorted."""
    layers = table.layers
    last_choice, descendants, option_trains, option_flags, terms = _layout(table)
    quantities = np.zeros((1, 7), dtype=np.int64)
    starts = np.array([0, 1])  # class c holds labels starts[c]:starts[c + 1]
    primary, trained = np.zeros(1), np.zeros(1, dtype=np.int64)  # per class
    input_grad = np.zeros((1, len(layers)), dtype=bool)  # per class, whether each later layer's input requires grad
    steps = []  # per layer, each label's option and the label of the layers before it that it extends
    for at, name in enumerate(layers):
        options = np.array([i for i in table.layer_options[name] if allowed is None or allowed[i]])
        # runs: each class extended with each option whose flag matches the class's input_grad at this layer
        run_class, choice = np.nonzero(option_flags[options][None, :] == input_grad[:, at][:, None])
        run_option = options[choice]
        run_grad = input_grad[run_class] | (option_trains[run_option][:, None] & descendants[at][None, :])
        run_primary = primary[run_class] + table.primary[run_option]
        run_trained = trained[run_class] + table.trained_bytes[run_option]
        runs, first_run, signature = _grouped(run_grad[:, at + 1:], run_primary, run_trained)
        new, label, option = _extended(quantities, starts, run_class[runs], run_option[runs], terms)
        run_sizes = np.diff(starts)[run_class[runs]]
        sizes = np.add.reduceat(run_sizes, first_run)
        primary, trained, input_grad = (a[runs[first_run]] for a in (run_primary, run_trained, run_grad))
        signature = signature[runs[first_run]]
        for pruning in ("reach", "dominance"):
            if pruning == "reach" and reach is not None:
                keep = reach.keeps(at, new, np.repeat(primary, sizes), np.repeat(trained, sizes))
            elif pruning == "dominance" and len(new) > FEW and at < last_choice:
                # prune many labels while choices remain (the final pruning follows); a forward phase at or
                # under the backward phases so far stays so (each later layer adds its base to the one, its
                # base and gradients to the other): where FWD <= BWD, FWD cannot matter
                costs = new[:, [BELOW, BWD, FLOPS, FWD, GRAD, UPLOAD, WEIGHT]]  # most varying in a class first
                costs[costs[:, 3] <= costs[:, 1], 3] = -1
                keep = _skyline(costs, np.append(0, np.cumsum(sizes)), np.searchsorted(signature, signature))
            else:
                continue
            new, label, option = new[keep], label[keep], option[keep]
            sizes = np.bincount(np.repeat(np.arange(len(sizes)), sizes)[keep], minlength=len(sizes))
            held = sizes > 0  # classes left
            sizes, primary, trained, input_grad, signature = (
                a[held] for a in (sizes, primary, trained, input_grad, signature))
        quantities, starts = new, np.append(0, np.cumsum(sizes))
        steps.append((option, label))
    primary, trained = np.repeat(primary, np.diff(starts)), np.repeat(trained, np.diff(starts))
    final = PlanCosts(
        peak_bytes=table.batch_bytes + np.maximum(quantities[:, FWD], quantities[:, BWD]),
        step_flops=quantities[:, FLOPS], upload_bytes=quantities[:, UPLOAD], trained_bytes=trained, primary=primary,
        weight_bytes=-quantities[:, WEIGHT],
        precision=np.full(len(primary), table.precision))
    # a plan dominates where it needs no more peak, FLOPs, upload or churned bytes (what the allocator's slack scales)
    keep = np.flatnonzero(_skyline(np.column_stack([final.peak_bytes, final.step_flops, final.upload_bytes,
                                                    final.peak_bytes - final.weight_bytes]),
                                   starts, np.zeros(len(starts) - 1, dtype=np.int64)))
    order = keep[np.lexsort((final.upload_bytes[keep], final.peak_bytes[keep], final.step_flops[keep], -trained[keep],
                             -primary[keep]))]
    selections = np.empty((len(order), len(layers)), dtype=np.int64)
    labels = order
    for at in range(len(layers) - 1, -1, -1):  # back from the last layer along each plan's labels
        option, label = steps[at]
        selections[:, at], labels = option[labels], label[labels]
    return Frontier(table, selections, final.take(order))


@functools.lru_cache(maxsize=256)
def _layout(table: CostTable) -> tuple:
    """What `_frontier` reads of ``table``, computed once per table: the last layer with a choice;
    descendants[a, l], whether layer l is below layer a; per option whether it trains, its flag (its
    input requires grad) and its terms, as `_extended` reads them."""
    q = table.memory_terms
    last_choice = max((at for at, name in enumerate(table.layers) if len(table.states[name]) > 1), default=-1)
    position = {name: i for i, name in enumerate(table.layers)}
    descendants = np.zeros((len(table.layers), len(table.layers)), dtype=bool)
    for name in table.layers:
        for ancestor in table.ancestors[name]:
            descendants[position[ancestor], position[name]] = True
    terms = np.column_stack([q["base"], q["below"], q["grad"], q["fwd"], q["bwd"], q["temp"], q["in_backward"],
                             table.step_flops, table.upload_bytes, table.weight_bytes]).astype(np.int64)
    return (last_choice, descendants, np.array([o.trains for o in table.options]),
            np.array([o.input_grad for o in table.options]), terms)


def clear_layouts() -> None:
    """Forget every table's layout (`planner.fleet.clear_caches`)."""
    _layout.cache_clear()


@_compiled
def _extended(quantities: np.ndarray, starts: np.ndarray, run_class: np.ndarray, run_option: np.ndarray,
              terms: np.ndarray):  # pragma: no cover
    """The labels of each run (class ``run_class[r]``: labels ``starts[c]:starts[c + 1]``) extended by
    its option ``run_option[r]``, run after run: their quantities, the label each extends and its option.
    ``terms``: per option, its base, below, grad, fwd, bwd and temp bytes, whether it is in backward, its
    FLOPs, upload and weight bytes."""
    count = 0
    for c in run_class:
        count += starts[c + 1] - starts[c]
    new = np.empty((count, 7), dtype=np.int64)
    label, option = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
    at_row = 0
    for c, o in zip(run_class, run_option):
        t = terms[o]
        base = t[0]
        for r in range(starts[c], starts[c + 1]):
            old, row = quantities[r], new[at_row]
            row[BELOW] = old[BELOW] + base + t[1]
            row[GRAD] = old[GRAD] + base + t[2]
            row[FWD] = max(old[FWD] + base, old[BELOW] + base + t[3])
            # earlier backward phases also hold this layer's gradients; its optimizer temporary joins all of them
            row[BWD] = max(old[BWD] + base + t[2], row[GRAD] + t[5])
            if t[6]:
                row[BWD] = max(row[BWD], old[BELOW] + base + t[4])
            row[FLOPS] = old[FLOPS] + t[7]
            row[UPLOAD] = old[UPLOAD] + t[8]
            row[WEIGHT] = old[WEIGHT] - t[9]
            label[at_row], option[at_row] = r, o
            at_row += 1
    return new, label, option


class _Reach:
    """Which labels of `_frontier` can complete to the optimum of one of a few devices with at most one of
    its budgets lifted. Every quantity of a label is a lower bound on that of the plans it completes to
    (later layers add at least their cheapest option). Each device counts as four, under its budgets
    and with each one lifted, each tested on its own (``rooms``: allowances (`Budgets.allowances`);
    those another covers left out) and with a *floor*: a key that some plan within its allowances
    reaches (`floors`; none at first). A label's key plus the largest key each later layer adds bounds
    the keys of its plans, so it goes unless some device has room for its bounds and a floor at most
    that bound."""

    def __init__(self, table: CostTable, budgets: Budgets):
        allowances = np.column_stack([np.broadcast_to(a, (budgets.devices, 1))[:, 0] for a in budgets.allowances()])
        self.all_rooms = np.concatenate([allowances] + [np.where(np.arange(3) == k, MAX_COST, allowances)
                                                        for k in range(3)]).astype(np.int64)
        self.all_floors = np.full((len(self.all_rooms), 2), -1.0)  # (primary, trained bytes): below every key
        self._reduce()
        self.overhead = float(np.min(budgets.tensor_overhead))
        q = table.memory_terms
        least = lambda values, pick=min: np.array([pick(values[i] for i in table.layer_options[name])  # noqa: E731
                                                   for name in table.layers] + [0])
        after = lambda values, pick=min: np.cumsum(least(values, pick)[::-1])[::-1][1:]  # noqa: E731  layers > at
        self.batch_bytes = table.batch_bytes
        # per layer, the least each quantity gains after it (`_reaching` reads them in this order)
        self.after = np.column_stack([after(q["base"]), after(q["base"] + q["grad"]),
                                      *(after(q["base"] + grad - table.weight_bytes) for grad in (0, q["grad"])),
                                      after(table.step_flops), after(table.upload_bytes)]).astype(np.int64)
        self.primary, self.trained = after(table.primary, max), after(table.trained_bytes, max)  # the most
        # sums of whole-number primaries are exact; others get a margin for rounding
        self.slack = 0.0 if np.all(table.primary == np.round(table.primary)) else 1e-9 * max(1.0, self.primary[0])

    def floors(self, frontier: Frontier, budgets: Budgets) -> None:
        """Each device's floors: the keys of its optima (and with each budget lifted) in ``frontier``, a
        frontier of some of the table's plans."""
        best = np.concatenate([frontier.best(b) for b in (budgets, *(budgets.without(k) for k in BUDGETS))])
        keys = np.column_stack([frontier.costs.primary, frontier.costs.trained_bytes])
        self.all_floors[best >= 0] = keys[best[best >= 0]]
        self._reduce()

    def _reduce(self) -> None:
        """Leave out each device another covers: room at least as large, floor at most its own."""
        keep = _non_dominated(-self.all_floors[:, 0], -self.all_floors[:, 1], -self.all_rooms,
                              np.zeros((len(self.all_rooms), 0), dtype=bool))
        self.rooms, self.floor = self.all_rooms[keep], self.all_floors[keep]

    def keeps(self, at: int, labels: np.ndarray, primary: np.ndarray, trained: np.ndarray) -> np.ndarray:
        """Whether each label (quantities after layer ``at``, its key) can complete to some device's optimum."""
        return _reaching(labels, primary + self.primary[at], trained + self.trained[at], self.after[at], self.rooms,
                         self.floor, self.batch_bytes, self.overhead, self.slack)


@_compiled
def _reaching(labels: np.ndarray, top: np.ndarray, most: np.ndarray, after: np.ndarray, rooms: np.ndarray,
              floor: np.ndarray, batch_bytes: int, overhead: float, slack: float) -> np.ndarray:  # pragma: no cover
    """`_Reach.keeps`: whether some room (memory, FLOPs, upload) holds a label's least needs and has a
    floor (primary, trained bytes) at most its largest key (``top``, ``most``). ``after``: the least
    base, base + grad, churned base, churned base + grad, FLOPs and upload the layers after it add."""
    kept = np.zeros(len(labels), dtype=np.bool_)
    for i in range(len(labels)):
        row = labels[i]
        peak = batch_bytes + max(row[FWD] + after[0], row[BWD] + after[1])
        churn = batch_bytes + row[WEIGHT] + max(row[FWD] + after[2], row[BWD] + after[3])
        upload = row[UPLOAD] + after[5]  # also the bound on the received bytes kept
        memory = peak + np.int64(np.ceil(churn * overhead)) + upload
        flops = row[FLOPS] + after[4]
        for r in range(len(rooms)):
            low, least = floor[r, 0], floor[r, 1]
            if memory <= rooms[r, 0] and flops <= rooms[r, 1] and upload <= rooms[r, 2] and (
                    low < top[i] - slack or (low <= top[i] + slack and (slack > 0 or least <= most[i]))):
                kept[i] = True
                break
    return kept


def _non_dominated(primary: np.ndarray, trained: np.ndarray, costs: np.ndarray, signature: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the labels no other label of the same signature dominates (key >= and
    costs <=); of identical labels the first is kept. Labels are sorted into classes alike in signature
    and key, the classes of a signature by key descending, and `_skyline` settles them one at a time."""
    if not len(primary):
        return np.zeros(0, dtype=np.int64)
    order, first, sig = _grouped(signature, primary, trained)
    of_class = sig[order[first]]
    kept = _skyline(np.ascontiguousarray(costs[order], dtype=np.int64), np.append(first, len(order)),
                    np.searchsorted(of_class, of_class))
    return np.sort(order[kept])


def _grouped(signature: np.ndarray, primary: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, ...]:
    """Items (rows of ``signature``, bools; their keys) in classes alike in signature and key: the order
    that puts each class's items side by side, the classes of a signature together and by key
    descending; where each class starts in it; and each item's signature, numbered."""
    packed = np.packbits(signature, axis=1)
    sig = np.unique(packed.view(f"V{packed.shape[1]}").ravel(), return_inverse=True)[1].ravel() if packed.size \
        else np.zeros(len(primary), dtype=np.int64)
    order = np.lexsort((-trained, -primary, sig))
    change = np.ones(len(order), dtype=bool)
    change[1:] = (np.diff(sig[order]) != 0) | (np.diff(primary[order]) != 0) | (np.diff(trained[order]) != 0)
    return order, np.flatnonzero(change), sig


@_compiled
def _skyline(costs: np.ndarray, starts: np.ndarray, first_of_signature: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Whether each row of ``costs`` (rows, columns) is dominated by no other: none of its class (rows
    ``starts[c]:starts[c + 1]``) or of an earlier class of its signature (from class
    ``first_of_signature[c]``; a larger key) is <= it in every column. A class's rows go by their costs
    over each column's spread, summed (dominators first, but for ties of that sum), each compared with
    the rows kept so far, latest first (none of which dominates another): it goes if one is <= it, and
    removes those it is <= (rare); of identical rows the first stays. Each class's survivors are then
    compared with the kept rows of the earlier classes whose least costs (per column) are <= theirs."""
    n, m = costs.shape
    if n == 0:
        return np.zeros(0, dtype=np.bool_)
    classes = len(starts) - 1
    columns = np.array([j for j in range(m) if costs[:, j].min() < costs[:, j].max()], dtype=np.int64)
    scale = np.array([1.0 / (costs[:, j].max() - costs[:, j].min()) for j in columns])
    kept = np.empty(n, dtype=np.int64)  # the kept rows, class by class
    kept_from = np.empty(classes + 1, dtype=np.int64)  # kept[kept_from[c]:kept_from[c + 1]]: class c's
    least = np.empty((classes, m), dtype=np.int64)  # per class, the least cost per column of its kept rows
    total = np.zeros(n)  # per row, its costs over each column's spread, summed
    for i in range(n):
        for k in range(len(columns)):
            total[i] += costs[i, columns[k]] * scale[k]
    most = np.empty(m, dtype=np.int64)
    could = np.empty(classes, dtype=np.int64)
    count = 0
    for c in range(classes):
        kept_from[c] = count
        for i in starts[c] + np.argsort(total[starts[c]:starts[c + 1]], kind="mergesort"):
            dominated = False
            for k in range(count - 1, kept_from[c] - 1, -1):  # the latest kept first: nearest in total
                q = kept[k]
                if q < 0:
                    continue
                below, above = True, True
                for j in columns:
                    if costs[q, j] > costs[i, j]:
                        below = False
                    elif costs[q, j] < costs[i, j]:
                        above = False
                    if not below and not above:
                        break
                if below:
                    dominated = True
                    break
                if above:
                    kept[k] = -1
            if not dominated:
                kept[count] = i
                count += 1
        most[:] = np.iinfo(np.int64).min  # the class's largest cost per column
        for k in range(kept_from[c], count):
            if kept[k] >= 0:
                for j in columns:
                    most[j] = max(most[j], costs[kept[k], j])
        candidates = 0  # could[:candidates]: the classes that may dominate some row
        for e in range(c - 1, first_of_signature[c] - 1, -1):
            below = True
            for j in columns:
                if least[e, j] > most[j]:
                    below = False
                    break
            if below:
                could[candidates] = e
                candidates += 1
        end = kept_from[c]
        for k in range(kept_from[c], count):
            i = kept[k]
            if i < 0:
                continue
            dominated = False
            for e in could[:candidates]:
                below = True
                for j in columns:
                    if least[e, j] > costs[i, j]:
                        below = False
                        break
                if not below:
                    continue
                for f in range(kept_from[e], kept_from[e + 1]):
                    q = kept[f]
                    below = True
                    for j in columns:
                        if costs[q, j] > costs[i, j]:
                            below = False
                            break
                    if below:
                        dominated = True
                        break
                if dominated:
                    break
            if not dominated:
                kept[end] = i
                end += 1
        count = end
        kept_from[c + 1] = count
        for j in range(m):
            least[c, j] = np.iinfo(np.int64).max
        for k in range(kept_from[c], count):
            for j in range(m):
                least[c, j] = min(least[c, j], costs[kept[k], j])
    found = np.zeros(n, dtype=np.bool_)
    for k in range(count):
        found[kept[k]] = True
    return found
