"""The planner interface shared by the default planner and the baselines."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from ultraep.layout import ExpertLayout, check_load_matrix
from ultraep.plan import Plan

__all__ = ["Planner", "masters_only_plan"]


class Planner(abc.ABC):
    """A pure function from (load matrix, layout) to a :class:`~ultraep.plan.Plan`.

    Planners that learn from past microbatches (the periodic ``eplb`` baseline) receive each
    microbatch's real load matrix through :meth:`observe` after it ran; the others ignore it.
    """

    name: ClassVar[str]

    def __call__(self, loads: torch.Tensor, layout: ExpertLayout, *, check_values: bool = True) -> Plan:
        """Plan one layer and microbatch.

        loads: [num_ranks, num_experts] integer tensor, any device. Assignments per source rank and
          logical expert; -1 padding in ``topk_ids`` must not be counted.
        check_values: also check for negative entries and totals past the int64 limits; this reads the
          tensor on the host, so a CUDA-graph hot path passes ``False``.
        Returns a plan whose tensors are on ``loads.device``.
        """
        check_load_matrix(loads, layout, check_values=check_values)
        return self.plan(loads.to(torch.int64), layout)

    @abc.abstractmethod
    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        """Plan from a validated int64 load matrix ``[num_ranks, num_experts]``."""

    def observe(self, loads: torch.Tensor, layout: ExpertLayout) -> None:  # noqa: B027 - optional hook
        """Record the load matrix of a microbatch that ran; history-based planners override this."""


def masters_only_plan(loads: torch.Tensor, layout: ExpertLayout) -> Plan:
    """Return the plan with every redundant slot empty and each master's quota equal to its expert's load.

    loads: [num_ranks, num_experts] int64, any device.
    """
    expert_load = loads.sum(dim=0)
    zeros = torch.zeros(layout.num_ranks, layout.redundant_slots_per_rank, dtype=torch.int64, device=loads.device)
    quota = torch.cat([expert_load.view(layout.num_ranks, layout.experts_per_rank), zeros], dim=1)  # [num_ranks, slots_per_rank]
    return Plan(layout, zeros - 1, quota.reshape(-1))
