"""Planners: the default ``quota`` planner and baselines behind one interface."""

from ultraep.planners.base import Planner, masters_only_plan
from ultraep.planners.quota import QuotaConfig, QuotaPlanner

__all__ = ["Planner", "QuotaConfig", "QuotaPlanner", "masters_only_plan"]
