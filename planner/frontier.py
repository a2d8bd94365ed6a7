"""The Pareto frontier of a model's plans: every plan that is some device's optimum, whatever its budgets.

A device's optimum is the plan of largest key (primary, trained bytes; lexicographic, see
`Objective`) and then least peak, among plans within its memory, compute and upload budgets.
A plan q *dominates* p when key(q) >= key(p) and q needs no more peak memory, FLOPs or upload
than p: wherever p fits, q fits and is at least as good. So the non-dominated plans, sorted by
(key descending, peak ascending), hold every device's optimum: the first one that fits.

The frontier is exact, computed by dynamic programming over the layers in topological order.
A partial plan (a label) of the first layers carries, in bytes and FLOPs per step::

    base  = sum W_j + O_j + buffers_j      below = sum A_j - external_j     grad = sum G_j
    fwd   = max over its layers l of  below_{<l} + F_l
    bwd   = max over its layers l in backward of  below_{<l} + B_l + grad_{>l, so far}
    temp  = max S_l                        flops, upload, and the key

and, once every layer is placed, ``peak = X + base + max(fwd, bwd, grad + temp)``, the phases of
`costmodel.estimate`. Adding a layer changes each quantity by a nondecreasing function of the
old ones, and lexicographic order is kept under addition, so a label dominated (key >=, every
quantity <=) by another with the same *signature* (which later layers already have an input that
requires grad) can never complete to a better plan than its dominator does: dropping it is exact.
Without LoRA menus the plan space is 2^blocks; with a menu of r ranks (2 + r)^blocks, which the
pruning keeps to a few hundred labels. Tests check the frontier against enumeration through
`estimate` and against the per-device ILP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.budget import Budgets
from planner.table import CostTable, PlanCosts

# columns of a label's quantities
BASE, BELOW, GRAD, FWD, BWD, TEMP, FLOPS, UPLOAD = range(8)


@dataclass
class Frontier:
    """Non-dominated plans of one table, best first: key descending, then peak ascending."""

    table: CostTable
    selections: np.ndarray  # (plans, layers) option indices
    costs: PlanCosts

    def __len__(self) -> int:
        return len(self.selections)

    def best(self, budgets: Budgets) -> np.ndarray:
        """For budgets of many devices (column arrays), the index of each one's optimal plan; -1 where
        none fits."""
        fits = budgets.fits(self.costs)
        return np.where(fits.any(axis=1), fits.argmax(axis=1), -1)


def _option_quantities(table: CostTable) -> dict[str, np.ndarray]:
    c = [o.cost for o in table.options]
    vector = lambda values: np.array(list(values), dtype=np.int64)  # noqa: E731
    return {"base": vector(x.param_bytes + x.optimizer_bytes + x.buffer_bytes for x in c),
            "below": vector(x.activation_bytes - x.external_saved_bytes for x in c),
            "grad": vector(x.grad_bytes for x in c),
            "fwd": vector(x.fwd_peak_bytes for x in c),
            "bwd": vector(x.bwd_peak_bytes for x in c),
            "in_backward": np.array([x.in_backward for x in c]),
            "temp": vector(x.step_temp_bytes for x in c)}


def compute_frontier(table: CostTable) -> Frontier:
    """The exact frontier of ``table`` by dynamic programming with dominance pruning."""
    q = _option_quantities(table)
    layers = table.layers
    position = {name: i for i, name in enumerate(layers)}
    descendants = np.zeros((len(layers), len(layers)), dtype=bool)  # descendants[a, l]: l is below a
    for name in layers:
        for ancestor in table.ancestors[name]:
            descendants[position[ancestor], position[name]] = True
    trains = np.array([o.trains for o in table.options])

    quantities = np.zeros((1, 8), dtype=np.int64)
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
        new[:, BASE] = old[:, BASE] + q["base"][option]
        new[:, BELOW] = old[:, BELOW] + q["below"][option]
        new[:, GRAD] = old[:, GRAD] + q["grad"][option]
        new[:, FWD] = np.maximum(old[:, FWD], old[:, BELOW] + q["fwd"][option])
        new[:, BWD] = old[:, BWD] + q["grad"][option]
        new[:, BWD] = np.where(q["in_backward"][option], np.maximum(new[:, BWD], old[:, BELOW] + q["bwd"][option]),
                               new[:, BWD])
        new[:, TEMP] = np.maximum(old[:, TEMP], q["temp"][option])
        new[:, FLOPS] = old[:, FLOPS] + table.step_flops[option]
        new[:, UPLOAD] = old[:, UPLOAD] + table.upload_bytes[option]
        primary = primary[label] + table.primary[option]
        trained = trained[label] + table.trained_bytes[option]
        selections = np.column_stack([selections[label], option])
        input_grad = input_grad[label] | (trains[option][:, None] & descendants[at][None, :])
        keep = _non_dominated(primary, trained, new, input_grad[:, at + 1:])
        quantities, primary, trained = new[keep], primary[keep], trained[keep]
        selections, input_grad = selections[keep], input_grad[keep]
    final = PlanCosts(
        peak_bytes=table.batch_bytes + quantities[:, BASE]
        + np.maximum.reduce([quantities[:, FWD], quantities[:, BWD], quantities[:, GRAD] + quantities[:, TEMP]]),
        step_flops=quantities[:, FLOPS], upload_bytes=quantities[:, UPLOAD], trained_bytes=trained, primary=primary)
    keep = _non_dominated(primary, trained, np.column_stack(
        [final.peak_bytes, final.step_flops, final.upload_bytes]), np.zeros((len(primary), 0), dtype=bool))
    order = keep[np.lexsort((final.peak_bytes[keep], -trained[keep], -primary[keep]))]
    return Frontier(table, selections[order], PlanCosts(*(getattr(final, f)[order] for f in
                                                          ("peak_bytes", "step_flops", "upload_bytes",
                                                           "trained_bytes", "primary"))))


def _non_dominated(primary: np.ndarray, trained: np.ndarray, costs: np.ndarray, signature: np.ndarray) -> np.ndarray:
    """Indices of labels no other label of the same signature dominates (key >= and costs <=);
    of identical labels one is kept."""
    order = np.lexsort((*costs.T[::-1], -trained, -primary))
    keep = []
    groups: dict[bytes, np.ndarray] = {}
    for i in order:  # a label can only be dominated by one sorted before it
        group = signature[i].tobytes()
        kept = groups.get(group)
        if kept is not None and np.any(np.all(costs[kept] <= costs[i], axis=1)):
            continue
        groups[group] = np.array([i]) if kept is None else np.append(kept, i)
        keep.append(i)
    return np.array(keep, dtype=np.int64)
