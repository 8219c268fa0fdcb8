"""Planners: the default ``quota`` planner and baselines behind one interface."""

from ultraep.planners.base import Planner, masters_only_plan
from ultraep.planners.eplb import EplbConfig, EplbPlanner
from ultraep.planners.lp_reroute import LpRerouteConfig, LpReroutePlanner
from ultraep.planners.milp import MilpConfig, MilpPlanner, MilpResult, solve_milp
from ultraep.planners.none import NonePlanner
from ultraep.planners.pairing import PairingPlanner
from ultraep.planners.quota import QuotaConfig, QuotaPlanner
from ultraep.planners.registry import PLANNER_NAMES, make_planner

__all__ = [
    "PLANNER_NAMES",
    "EplbConfig",
    "EplbPlanner",
    "LpRerouteConfig",
    "LpReroutePlanner",
    "MilpConfig",
    "MilpPlanner",
    "MilpResult",
    "NonePlanner",
    "PairingPlanner",
    "Planner",
    "QuotaConfig",
    "QuotaPlanner",
    "make_planner",
    "masters_only_plan",
    "solve_milp",
]
