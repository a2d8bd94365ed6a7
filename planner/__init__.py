"""Which blocks each device trains: an exact ILP per device, exact Pareto frontiers for fleets, plan files.

Costs come only from `costmodel.estimate` (through `CostTable`); budgets from `profiles` devices.
"""

from planner.budget import BUDGETS, Budgets
from planner.fleet import SOLVERS, PlanSettings, plan
from planner.frontier import Frontier, compute_frontier
from planner.ilp import DeviceIlp, SolverError
from planner.planfile import (ArchitectureSummary, DeviceBudgets, DevicePlan, Needs, PlanFile, read_plan_file,
                              write_plan_file)
from planner.table import CostTable, Objective, PlanCosts

__all__ = ["BUDGETS", "SOLVERS", "ArchitectureSummary", "Budgets", "CostTable", "DeviceBudgets", "DeviceIlp",
           "DevicePlan", "Frontier", "Needs", "Objective", "PlanCosts", "PlanFile", "PlanSettings", "SolverError",
           "compute_frontier", "plan", "read_plan_file", "write_plan_file"]
