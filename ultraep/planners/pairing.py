"""The ``pairing`` baseline: fill every underloaded rank to the mean from one overloaded rank.

This baseline follows a published pairing approach. It reaches exact balance (up to integer rounding)
when it has enough redundant slots, but it creates many replicas and ignores locality. It runs Python
loops on the host, because it is a reference for evaluation and not part of the hot path.

Method:

1. Targets. With ``total = num_ranks * q + r`` (``0 <= r < num_ranks``), the ``r`` ranks with the
   largest master load get target ``q + 1`` and the rest get ``q``. Ties go to the lower rank. The
   targets sum to the total, so the max rank load after balancing is ``ceil(mean)``.
2. Pairing. While some rank is below its target, the receiver with the largest deficit takes load
   from the sender with the largest excess. Ties go to the lower rank in both cases. One refill moves
   tokens of ONE logical expert: the sender's master with the largest remaining quota (ties: lower
   expert id). The receiver gets its whole deficit, or everything that master still holds if that
   is less, and it is refilled again later if it is still short. A sender may end below its target.
   It is then refilled like any other receiver, and a master's quota may drop to 0.
3. Slot limit. Each refill uses one redundant slot on the receiver. A receiver never gets two refills
   of one expert, because a refill that falls short of the deficit empties that master. Should it
   happen, the code adds to the existing replica instead of creating a second instance on the rank.
   A rank that ends up with more replicas than redundant slots keeps its largest replicas by quota
   (ties: lower expert id). The quotas of the dropped replicas go back to their masters.

Replicas on a rank fill its redundant slots in ascending expert id order.
"""

from __future__ import annotations

import logging

import torch

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners.base import Planner, masters_only_plan

__all__ = ["PairingPlanner"]

logger = logging.getLogger(__name__)


class PairingPlanner(Planner):
    """Pairing baseline: exact balance from one-to-one refills, many replicas, no locality.

    See the module docstring for the method and its tie-breaks. The plan is a pure function of the
    load matrix and the layout.
    """

    name = "pairing"

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        """Plan one layer and microbatch.

        loads: [num_ranks, num_experts] int64, any device. Assignments per source rank and logical expert.
        Returns a plan on ``loads.device``.
        """
        if layout.redundant_slots_per_rank == 0 or layout.num_ranks == 1:
            return masters_only_plan(loads, layout)
        expert_load = loads.sum(dim=0).cpu().tolist()
        master_quota, replicas = _pair_ranks(expert_load, layout)
        _drop_smallest_replicas(master_quota, replicas, layout)
        return _build_plan(master_quota, replicas, layout, loads.device)


def _pair_ranks(expert_load: list[int], layout: ExpertLayout) -> tuple[list[int], list[dict[int, int]]]:
    """Run steps 1 and 2 with unlimited redundant slots.

    Returns the master quota per logical expert and, per rank, a dict from logical expert to replica quota.
    """
    num_ranks, experts_per_rank, num_experts = layout.num_ranks, layout.experts_per_rank, layout.num_experts
    master_quota = list(expert_load)
    rank_load = [sum(expert_load[rank * experts_per_rank : (rank + 1) * experts_per_rank]) for rank in range(num_ranks)]
    replicas: list[dict[int, int]] = [{} for _ in range(num_ranks)]

    # Step 1: integer targets, ceil(mean) for the heaviest ranks, so fewer assignments move.
    mean_floor, remainder = divmod(sum(expert_load), num_ranks)
    target = [mean_floor] * num_ranks
    for rank in sorted(range(num_ranks), key=lambda r: (-rank_load[r], r))[:remainder]:
        target[rank] = mean_floor + 1

    # Step 2: refills. Each step fills a receiver or empties a master (or both). Every rank finishes as
    # a receiver at most once, so the loop takes at most num_ranks + num_experts steps.
    for _ in range(num_ranks + num_experts + 1):
        deficit = [target[rank] - rank_load[rank] for rank in range(num_ranks)]
        receiver = min(range(num_ranks), key=lambda r: (-deficit[r], r))
        if deficit[receiver] <= 0:
            break
        # NOTE: the targets sum to the total load, so a deficit implies an excess somewhere. A sender
        # never received a replica (receivers stop at their target), so its excess sits in its masters.
        sender = min(range(num_ranks), key=lambda r: (deficit[r], r))
        first_expert = sender * experts_per_rank
        expert = min(range(first_expert, first_expert + experts_per_rank), key=lambda e: (-master_quota[e], e))
        amount = min(deficit[receiver], master_quota[expert])
        assert amount > 0, "a sender with excess load must hold a master with positive quota"
        master_quota[expert] -= amount
        rank_load[sender] -= amount
        rank_load[receiver] += amount
        replicas[receiver][expert] = replicas[receiver].get(expert, 0) + amount
    else:
        raise AssertionError(f"pairing did not converge in {num_ranks + num_experts + 1} refills")

    return master_quota, replicas


def _drop_smallest_replicas(master_quota: list[int], replicas: list[dict[int, int]], layout: ExpertLayout) -> None:
    """Run step 3 in place: keep each rank's largest replicas and return the rest to their masters."""
    slots = layout.redundant_slots_per_rank
    num_dropped = 0
    for rank_replicas in replicas:
        if len(rank_replicas) <= slots:
            continue
        by_size = sorted(rank_replicas.items(), key=lambda item: (-item[1], item[0]))
        for expert, quota in by_size[slots:]:
            master_quota[expert] += quota
            del rank_replicas[expert]
            num_dropped += 1
    if num_dropped:
        logger.debug("pairing: dropped %d replicas that did not fit in %d redundant slots per rank", num_dropped, slots)


def _build_plan(
    master_quota: list[int], replicas: list[dict[int, int]], layout: ExpertLayout, device: torch.device
) -> Plan:
    slots = layout.redundant_slots_per_rank
    replica_expert_ids = torch.full((layout.num_ranks, slots), -1, dtype=torch.int64)
    replica_quota = torch.zeros((layout.num_ranks, slots), dtype=torch.int64)
    for rank, rank_replicas in enumerate(replicas):
        for slot_idx, expert in enumerate(sorted(rank_replicas)):
            replica_expert_ids[rank, slot_idx] = expert
            replica_quota[rank, slot_idx] = rank_replicas[expert]
    masters = torch.tensor(master_quota, dtype=torch.int64).view(layout.num_ranks, layout.experts_per_rank)
    quota = torch.cat([masters, replica_quota], dim=1)  # [num_ranks, slots_per_rank]
    return Plan(layout, replica_expert_ids.to(device), quota.reshape(-1).to(device))
