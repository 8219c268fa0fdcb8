"""The ``none`` baseline: no replicas, every logical expert is served by its master only."""

from __future__ import annotations

import torch

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners.base import Planner, masters_only_plan

__all__ = ["NonePlanner"]


class NonePlanner(Planner):
    """Leave every redundant slot empty; each master's quota is its expert's whole load.

    This is the unbalanced reference that every other planner is measured against.
    """

    name = "none"

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        """Return the masters-only plan on ``loads.device``.

        loads: [num_ranks, num_experts] int64, any device. Assignments per source rank and logical expert.
        """
        return masters_only_plan(loads, layout)
