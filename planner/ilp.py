r"""The exact per-device ILP: which blocks train, fully or with which LoRA rank, recomputed or not (PuLP + CBC),
for one table (its frozen weights held one way; the fleet planner compares the tables' optima).

Sets: layers l in L (topological order of `layer_graph`), anc(l) the ancestors of l, states s in
S_l (blocks: frozen, full, each LoRA rank of the menu, and with the recompute menu full and each
rank recomputed; other layers one fixed state), T_l the
trained states of S_l, and for each option (l, s, f) of `CostTable` (f: l's input requires grad)
its costs from `layer_cost` + the optimizer: c_p(l,s,f) for each memory phase p, flops(l,s,f)
per step, upload(l,s,f) and trained(l,s,f) bytes, primary(l,s,f) of the objective. X is the
batch's bytes, B the budgets (memory M, margin m, compute C per round, K local steps, upload U).

Variables::

    x[l,s]   in {0,1}   layer l is in state s
    g[l]     in {0,1}   l's input requires grad (an ancestor trains)
    y[l,s,f] in {0,1}   x[l,s] AND (g[l] == f)
    peak     >= 0       predicted peak memory, bytes

Constraints::

    sum_s x[l,s] = 1                                   one state per layer
    g[l] >= x[j,s]               j in anc(l), s in T_j  an ancestor trains => input requires grad
    g[l] <= sum_{j in anc(l), s in T_j} x[j,s]          ... and only then
    sum_f y[l,s,f] = x[l,s];  y[l,s,1] <= g[l];  y[l,s,0] <= 1 - g[l]
    peak >= X + sum_{l,s,f} c_p(l,s,f) y[l,s,f]        for every phase p (see `planner.table`)
    F + peak + a (peak - sum W(l,s,f) y[l,s,f]) + sum upload(l,s,f) y[l,s,f] <= (1 - m) M
                                   (F fixed bytes, a the allocator's slack, W(l,s,f) weight bytes;
                                    the upload bounds the received tensors the process keeps)
    K * sum flops(l,s,f) y[l,s,f] <= C
    sum upload(l,s,f) y[l,s,f] <= U

Objective, lexicographic, one CBC solve per level, each level's optimum fixed for the next::

    max sum primary(l,s,f) y;   then max sum trained(l,s,f) y;   then min sum flops(l,s,f) y;   then min peak

(the FLOPs level keeps recomputation, and any other costlier plan of equal value, out of a plan that
does not need it).

The linearization is exact: every feasible (x, g, y) is one plan, its y the plan's options, and
``max_p`` of the phase sums is `estimate`'s peak (tests compare them on random plans). CBC works
in floating point, so each solution is re-checked in integers; a plan that breaks a budget by a
solver tolerance is cut off (``sum of its y <= |L| - 1``) and the level is solved again.

Ties make levels hard: with a LoRA menu, maximizing trained bytes among plans of equally many full
blocks is a subset-sum over look-alike blocks, whose LP bound sits just above the optimum. Any two
plans of the same earlier levels differ in a level's objective by a multiple of its *step* (a gcd,
`objective_step`), so CBC is told to prune nodes that cannot beat the incumbent by a step
(``-increment``); that closes most such gaps at the root. What stays unproven within
``time_limit`` seconds raises `SolverError`. The costs are in MiB and GFLOP in the ILP (better
scaled for CBC); the plan's exact integers always come from `CostTable`.
"""

from __future__ import annotations

import math

import numpy as np
import pulp

from planner.budget import Budgets
from planner.table import CostTable, trains

MiB = 2**20
MFLOP, GFLOP = 1e6, 1e9


class SolverError(RuntimeError):
    """CBC stopped without proving an optimum (time limit or numerical trouble)."""


class DeviceIlp:
    """The ILP of one table under one device's budgets; `solve` returns the optimal option indices.
    ``time_limit``: seconds per CBC solve."""

    def __init__(self, table: CostTable, budgets: Budgets, time_limit: float = 120.0):
        self.table, self.budgets, self.time_limit = table, budgets, time_limit
        problem = pulp.LpProblem("caff_plan", pulp.LpMaximize)
        layers = table.layers
        binary = lambda name: problem.add_variable(name, cat=pulp.LpBinary)  # noqa: E731
        self.x = {(l, s): binary(f"x_{i}_{k}") for i, l in enumerate(layers) for k, s in enumerate(table.states[l])}
        g = {l: binary(f"g_{i}") for i, l in enumerate(layers)}
        self.y = [binary(f"y_{i}") for i in range(len(table.options))]  # y[l,s,f], one per option of the table
        self.peak = problem.add_variable("peak", lowBound=0)
        for l in layers:
            problem += pulp.lpSum(self.x[l, s] for s in table.states[l]) == 1
            trained_above = [self.x[j, s] for j in table.ancestors[l] for s in table.states[j] if trains(s)]
            for x_js in trained_above:
                problem += g[l] >= x_js
            problem += g[l] <= pulp.lpSum(trained_above)
            for s in table.states[l]:
                flags = {o.input_grad: self.y[i] for i in table.layer_options[l]
                         if (o := table.options[i]).state == s}
                problem += pulp.lpSum(flags.values()) == self.x[l, s]
                if True in flags:
                    problem += flags[True] <= g[l]
                if False in flags:
                    problem += flags[False] <= 1 - g[l]
        for row in table.phase_coefficients:
            problem += self.peak >= (table.batch_bytes + self._sum(row)) / MiB
        if math.isfinite(budgets.memory_bytes):
            kept = self._sum(table.upload_bytes, MiB)  # bound on the received tensors kept, as `Budgets.process_bytes`
            slack = budgets.tensor_overhead  # the allocator's, per byte of tensor peak less the weights
            problem += ((1 + slack) * self.peak - slack * self._sum(table.weight_bytes, MiB) + kept
                        <= (budgets.usable_memory_bytes - budgets.fixed_bytes) / MiB)
        if math.isfinite(budgets.compute_flops):
            problem += budgets.local_steps * self._sum(table.step_flops, GFLOP) <= budgets.compute_flops / GFLOP
        if math.isfinite(budgets.upload_bytes):
            problem += self._sum(table.upload_bytes, MiB) <= budgets.upload_bytes / MiB
        self.problem = problem

    def _sum(self, per_option, unit=1.0) -> pulp.LpAffineExpression:
        return pulp.lpSum(float(c) / unit * y for c, y in zip(per_option, self.y) if c)

    def solve(self, tiebreaks: bool = True) -> list[int] | None:
        """Option indices of the lexicographic optimum, or None when no plan fits.

        Without ``tiebreaks`` the last two levels (fewest FLOPs, then least peak, among plans of the
        best key) are skipped."""
        table = self.table
        params = table.objective.kind == "params"
        levels = [(table.primary, MiB if params else 1.0, pulp.LpMaximize),  # (per-option values, unit, sense)
                  (table.trained_bytes, MiB, pulp.LpMaximize),
                  (table.step_flops, MFLOP, pulp.LpMinimize),  # MFLOP: CBC's 1e-7 tolerance is 0.1 FLOP
                  (None, MiB, pulp.LpMinimize)]  # None: the peak
        if params:
            del levels[1]  # the primary is already the trained bytes
        if not tiebreaks:
            del levels[-2:]
        selection, fixed = None, []
        for level, (values, unit, sense) in enumerate(levels):
            expression = self.peak if values is None else self._sum(values, unit)
            self.problem.sense = sense
            self.problem.setObjective(expression)
            step = 0.0 if values is None else objective_step(table, values, fixed) / unit
            selection = self._solve_checked(step)
            if selection is None:
                return None
            if level < len(levels) - 1:  # keep this level's optimum in the next levels
                reached = float(values[selection].sum())
                tolerance = 0.5 if _integral(values) else 1e-9 * max(1.0, abs(reached))
                if sense == pulp.LpMaximize:
                    self.problem += expression >= (reached - tolerance) / unit
                else:
                    self.problem += expression <= (reached + tolerance) / unit
                fixed.append(values)
        return selection

    def _solve_checked(self, step: float) -> list[int] | None:
        """Solve; re-check the solution exactly and cut it off while it breaks a budget. ``step``: the
        objective's granularity, which lets CBC prune nodes that cannot beat the incumbent by a step."""
        options = [f"increment {0.999 * step!r}"] if step else []
        while True:
            self.problem.solve(pulp.PULP_CBC_CMD(msg=False, warmStart=True, timeLimit=self.time_limit,
                                                 options=options))
            if self.problem.status == pulp.LpStatusInfeasible:
                return None
            if self.problem.status != pulp.LpStatusOptimal or self.problem.sol_status != pulp.LpSolutionOptimal:
                raise SolverError(f"CBC proved no optimum within {self.time_limit:g} s (status "
                                  f"{pulp.LpStatus[self.problem.status]}); the frontier solver is exact and fast")
            states = {l: s for (l, s), var in self.x.items() if var.varValue > 0.5}
            selection = self.table.selection(self.table.mode_of(states))
            if self.budgets.fits(self.table.evaluate(selection))[0]:
                return selection
            self.problem += pulp.lpSum(self.y[i] for i in selection) <= len(selection) - 1


def _integral(values: np.ndarray) -> bool:
    return bool(np.all(values == np.round(values)))


def objective_step(table: CostTable, values: np.ndarray, fixed: list[np.ndarray]) -> int:
    """The largest g found such that any two plans alike in each ``fixed`` per-option sum differ in the sum
    of ``values`` by a multiple of g; 0 when the values are not integers.

    Plans alike in a fixed sum E rank alike by ``values - mu * E`` for any mu; each mu that cancels the
    difference between two options of one layer is tried (with ``mu = 0``), and for each the gcd of
    the differences between options of the same layer bounds the step (one option per layer)."""
    if not _integral(values):
        return 0
    shifts = [(0, np.zeros_like(values))]
    for e in filter(_integral, fixed):
        for options in table.layer_options.values():
            for o in options[1:]:
                de, dc = int(e[o] - e[options[0]]), int(values[o] - values[options[0]])
                if de and dc % de == 0:
                    shifts.append((dc // de, e))
    best = 0
    for mu, e in shifts:
        shifted = (values - mu * e).astype(np.int64)
        step = 0
        for options in table.layer_options.values():
            step = math.gcd(step, *(int(shifted[o] - shifted[options[0]]) for o in options[1:]))
        best = max(best, step)
    return best
