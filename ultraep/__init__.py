"""ultraep: exact, real-time load balancing for expert-parallel Mixture-of-Experts layers."""

import logging

from ultraep.kernels import KernelConfig, count_load, plan_quota, reroute_ids
from ultraep.layout import ExpertLayout, check_load_matrix
from ultraep.plan import Plan, PlanInvariantError, check_plan
from ultraep.planners import PLANNER_NAMES, Planner, QuotaConfig, QuotaPlanner, make_planner

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "PLANNER_NAMES",
    "ExpertLayout",
    "KernelConfig",
    "Plan",
    "PlanInvariantError",
    "Planner",
    "QuotaConfig",
    "QuotaPlanner",
    "check_load_matrix",
    "check_plan",
    "count_load",
    "make_planner",
    "plan_quota",
    "reroute_ids",
]
