"""The ``lp_reroute`` baseline: a fixed periodic placement plus a per-microbatch LP that reroutes load.

This is an LPLB-style baseline written from a short description, not from any code. Replicas sit in
redundant slots chosen periodically from past loads, exactly as the ``eplb`` baseline places them.
Each microbatch then solves a linear program that splits every expert's current load over the
instances it already has, so that the largest rank load is as small as possible:

    minimise t
    subject to   sum of x_i over the instances i of expert e  = load[e]     for every expert e
                 sum of x_i over the instances i on rank r   <= t           for every rank r
                 x_i >= 0

Experts with a single instance have a fixed quota (their load), so only experts with replicas get
variables. The fixed loads enter the rank rows as constants. The LP is solved with HiGHS through
``scipy.optimize.linprog``. The LP solution is rounded to integers per expert by the largest
remainder method: every instance gets ``floor(x_i)``, and the assignments left over go one each to the
instances with the largest fractional parts (ties: lower physical slot id). Rounding can lift a rank
by a few assignments; when it lifts the largest rank load above that of the ``eplb`` even split on
the same placement, the planner keeps the even split, so it is never worse than that split.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.sparse import csr_matrix

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners.base import Planner
from ultraep.planners.eplb import EplbConfig, EplbPlanner

__all__ = ["LpRerouteConfig", "LpReroutePlanner"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LpRerouteConfig:
    """Settings of the LP reroute baseline: those of the periodic placement it reuses."""

    window: int = 16
    """Microbatches of history behind each placement (as ``EplbConfig.window``)."""
    interval: int = 16
    """Re-place on every ``interval``-th plan call (as ``EplbConfig.interval``)."""
    policy: str = "global"
    """Placement policy (as ``EplbConfig.policy``)."""
    num_nodes: int = 1
    """Nodes for the hierarchical placement policy (as ``EplbConfig.num_nodes``)."""

    def __post_init__(self) -> None:
        # The placement settings are checked by the EplbConfig they build, whose errors name this class's fields.
        try:
            self.placement_config()
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace("EplbConfig.", "LpRerouteConfig.")) from error

    def placement_config(self) -> EplbConfig:
        """Return the settings of the periodic placement."""
        return EplbConfig(window=self.window, interval=self.interval, policy=self.policy, num_nodes=self.num_nodes)


class LpReroutePlanner(Planner):
    """Periodic EPLB-style placement with per-microbatch LP quotas. See the module docstring.

    Phases per microbatch, in the order a loop calls them:

    1. :meth:`plan`: the inner periodic placement gives the redundant slots' experts (re-placed every
       ``interval`` calls from the last ``window`` observed microbatches), then the LP sets the quotas.
    2. :meth:`observe`: the microbatch's loads go into the placement history.

    One planner serves one layout; use one instance per MoE layer.
    """

    name = "lp_reroute"

    def __init__(self, config: LpRerouteConfig | None = None, **settings) -> None:
        if config is not None and settings:
            raise TypeError(f"pass either config or settings, not both (got settings {sorted(settings)})")
        self.config = config if config is not None else LpRerouteConfig(**settings)
        self._placement = EplbPlanner(self.config.placement_config())
        self._placement._owner = type(self).__name__

    def reset(self) -> None:
        """Forget the placement history."""
        self._placement.reset()

    def observe(self, loads: torch.Tensor, layout: ExpertLayout) -> None:
        """Append the load matrix of a microbatch that ran to the placement history.

        loads: [num_ranks, num_experts] integer tensor, any device. Read on the host.
        """
        self._placement.observe(loads, layout)

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        """Plan one layer and microbatch.

        loads: [num_ranks, num_experts] int64, any device. Assignments per source rank and logical expert.
        Returns a plan on ``loads.device`` with the periodic placement and LP quotas.
        """
        even_plan = self._placement.plan(loads, layout)
        replica_expert_ids = even_plan.replica_expert_ids.cpu()
        expert_load = loads.sum(dim=0).cpu()  # [num_experts]
        quota = _lp_quotas(expert_load, replica_expert_ids, layout)
        if quota is None:
            return even_plan
        plan = Plan(layout, replica_expert_ids, quota)
        if int(plan.rank_load().max()) > int(even_plan.rank_load().max()):
            logger.debug("lp_reroute: rounding lifted the max rank load above the even split; keeping the even split")
            return even_plan
        return plan.to(loads.device)


def _lp_quotas(expert_load: torch.Tensor, replica_expert_ids: torch.Tensor, layout: ExpertLayout) -> torch.Tensor | None:
    """Return [num_slots] int64 LP quotas on the CPU, or None when no expert has a replica or the LP fails.

    expert_load: [num_experts] int64, CPU. Current load of each logical expert.
    replica_expert_ids: [num_ranks, redundant_slots_per_rank] int64, CPU; -1 = empty.
    """
    num_ranks, experts_per_rank, slots = layout.num_ranks, layout.experts_per_rank, layout.redundant_slots_per_rank
    load = expert_load.numpy().astype(np.int64)
    replicas = replica_expert_ids.numpy()

    # Step 1: instances of the experts that have replicas (master first, then slots by id).
    replicated = sorted({int(e) for e in replicas.reshape(-1) if e >= 0 and load[e] > 0})
    if not replicated:
        return None
    instance_expert, instance_rank, instance_slot = [], [], []
    for expert in replicated:
        rank = expert // experts_per_rank
        instance_expert.append(expert)
        instance_rank.append(rank)
        instance_slot.append(rank * layout.slots_per_rank + expert % experts_per_rank)
    for rank in range(num_ranks):
        for slot_idx in range(slots):
            expert = int(replicas[rank, slot_idx])
            if expert >= 0 and load[expert] > 0:
                instance_expert.append(expert)
                instance_rank.append(rank)
                instance_slot.append(rank * layout.slots_per_rank + experts_per_rank + slot_idx)
    order = np.lexsort((np.array(instance_slot), np.array(instance_expert)))  # by expert, then slot id
    instance_expert = np.array(instance_expert)[order]
    instance_rank = np.array(instance_rank)[order]
    instance_slot = np.array(instance_slot)[order]
    num_vars = instance_expert.size

    # Step 2: fixed rank loads from experts without replicas.
    fixed = load.copy()
    fixed[replicated] = 0
    fixed_rank_load = fixed.reshape(num_ranks, experts_per_rank).sum(axis=1).astype(np.float64)

    # Step 3: the LP over [x_0 .. x_{num_vars-1}, t].
    expert_row = {expert: row for row, expert in enumerate(replicated)}
    eq_rows = np.array([expert_row[int(e)] for e in instance_expert])
    a_eq = csr_matrix((np.ones(num_vars), (eq_rows, np.arange(num_vars))), shape=(len(replicated), num_vars + 1))
    b_eq = load[replicated].astype(np.float64)
    ub_rows = np.concatenate([instance_rank, np.arange(num_ranks)])
    ub_cols = np.concatenate([np.arange(num_vars), np.full(num_ranks, num_vars)])
    ub_vals = np.concatenate([np.ones(num_vars), -np.ones(num_ranks)])
    a_ub = csr_matrix((ub_vals, (ub_rows, ub_cols)), shape=(num_ranks, num_vars + 1))
    b_ub = -fixed_rank_load
    cost = np.zeros(num_vars + 1)
    cost[-1] = 1.0
    result = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if result.status != 0:
        logger.warning("lp_reroute: HiGHS returned status %d (%s); using the even split", result.status, result.message)
        return None

    # Step 4: largest-remainder rounding per expert, deterministic.
    x = np.clip(result.x[:num_vars], 0.0, None)
    floor = np.floor(x + 1e-9).astype(np.int64)
    fraction = x - floor
    quota = np.zeros(layout.num_slots, dtype=np.int64)
    start = 0
    while start < num_vars:
        expert = int(instance_expert[start])
        stop = start
        while stop < num_vars and int(instance_expert[stop]) == expert:
            stop += 1
        group_floor = floor[start:stop]
        leftover = int(load[expert] - group_floor.sum())
        # Over-rounding (leftover < 0) can only come from floating-point noise; take it back from the largest.
        group_quota = group_floor.copy()
        if leftover >= 0:
            ranked = sorted(range(stop - start), key=lambda i: (-fraction[start + i], instance_slot[start + i]))
            for i in ranked[:leftover]:
                group_quota[i] += 1
        else:
            ranked = sorted(range(stop - start), key=lambda i: (-group_quota[i], instance_slot[start + i]))
            for i in ranked[:-leftover]:
                group_quota[i] -= 1
        quota[instance_slot[start:stop]] = group_quota
        start = stop

    # Step 5: masters of experts without replicas keep their whole load.
    for expert in range(layout.num_experts):
        if expert not in expert_row:
            rank = expert // experts_per_rank
            quota[rank * layout.slots_per_rank + expert % experts_per_rank] = load[expert]
    return torch.from_numpy(quota)
