r"""The exact per-device ILP: which blocks train, fully or with which LoRA rank (PuLP + CBC).

Sets: layers l in L (topological order of `layer_graph`), anc(l) the ancestors of l, states s in
S_l (blocks: frozen, full, each LoRA rank of the menu; other layers one fixed state), T_l the
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
    peak <= (1 - m) M
    K * sum flops(l,s,f) y[l,s,f] <= C
    sum upload(l,s,f) y[l,s,f] <= U

Objective, lexicographic, one CBC solve per level, each level's optimum fixed for the next::

    max sum primary(l,s,f) y;   then max sum trained(l,s,f) y;   then min peak

The linearization is exact: every feasible (x, g, y) is one plan, its y the plan's options, and
``max_p`` of the phase sums is `estimate`'s peak (tests compare them on random plans). CBC works
in floating point, so each solution is re-checked in integers; a plan that breaks a budget by a
solver tolerance is cut off (``sum of its y <= |L| - 1``) and the level is solved again.
"""

from __future__ import annotations

import pulp

from planner.budget import Budgets
from planner.table import CostTable

MiB = 2**20


class DeviceIlp:
    """The ILP of one table under one device's budgets; `solve` returns the optimal option indices."""

    def __init__(self, table: CostTable, budgets: Budgets):
        self.table, self.budgets = table, budgets
        problem = pulp.LpProblem("caff_plan", pulp.LpMaximize)
        layers = table.layers
        self.x = {(l, s): pulp.LpVariable(f"x_{i}_{k}", cat="Binary")
                  for i, l in enumerate(layers) for k, s in enumerate(table.states[l])}
        g = {l: pulp.LpVariable(f"g_{i}", cat="Binary") for i, l in enumerate(layers)}
        self.y = [pulp.LpVariable(f"y_{i}", cat="Binary") for i in range(len(table.options))]
        self.peak = pulp.LpVariable("peak", lowBound=0)
        for l in layers:
            problem += pulp.lpSum(self.x[l, s] for s in table.states[l]) == 1
            trained_above = [self.x[j, s] for j in table.ancestors[l] for s in table.states[j]
                             if s not in (False, "frozen")]
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
        _, phase_coef = table.phases
        for row in phase_coef:
            problem += self.peak >= (table.batch_bytes + self._sum(row)) / MiB
        problem += self.peak <= budgets.usable_memory_bytes / MiB
        problem += budgets.local_steps * self._sum(table.step_flops, 1e9) <= budgets.compute_flops / 1e9
        problem += self._sum(table.upload_bytes, MiB) <= budgets.upload_bytes / MiB
        self.problem = problem

    def _sum(self, per_option, unit=1.0) -> pulp.LpAffineExpression:
        return pulp.lpSum(float(c) / unit * y for c, y in zip(per_option, self.y) if c)

    def solve(self) -> list[int] | None:
        """Option indices of the lexicographic optimum, or None when no plan fits."""
        table = self.table
        levels = [("primary", pulp.LpMaximize, self._sum(table.primary, MiB if table.objective.kind == "params" else 1)),
                  ("trained_bytes", pulp.LpMaximize, self._sum(table.trained_bytes, MiB)),
                  ("peak_bytes", pulp.LpMinimize, self.peak)]
        if table.objective.kind == "params":
            del levels[1]  # the primary is already the trained bytes
        selection = None
        for quantity, sense, expression in levels:
            self.problem.sense = sense
            self.problem.setObjective(expression)
            selection = self._solve_checked()
            if selection is None:
                return None
            unit = 1 if quantity == "primary" and table.objective.kind != "params" else MiB
            reached = float(getattr(table.evaluate(selection), quantity)[0]) / unit
            exact = quantity != "primary" or table.objective.integral
            tolerance = 0.5 / unit if exact else 1e-9 * max(1.0, abs(reached))
            if sense == pulp.LpMaximize:
                self.problem += expression >= reached - tolerance
            else:
                self.problem += expression <= reached + tolerance
        return selection

    def _solve_checked(self) -> list[int] | None:
        """Solve; re-check the solution exactly and cut it off while it breaks a budget."""
        while True:
            self.problem.solve(getattr(self, "solver", pulp.PULP_CBC_CMD(msg=False)))
            if self.problem.status != pulp.LpStatusOptimal:
                return None
            states = {l: s for (l, s), var in self.x.items() if var.varValue > 0.5}
            selection = self.table.selection(self.table.mode_of(states))
            if self.budgets.fits(self.table.evaluate(selection))[0]:
                return selection
            self.problem += pulp.lpSum(self.y[i] for i in selection) <= len(selection) - 1
