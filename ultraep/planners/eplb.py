"""The ``eplb`` baseline: periodic replica placement from a window of past loads.

This follows DeepSeek's published description of its Expert Parallelism Load Balancer (EPLB,
https://github.com/deepseek-ai/EPLB, README). It estimates each expert's load from history and gives
extra replicas to the experts with the highest expected load per instance. Then it packs the replicas
onto GPUs so that the expected GPU loads are balanced. Its hierarchical policy keeps replicas inside a
node, and its global policy may place them anywhere. No code was taken from that project.

In this layout masters never move. Logical expert ``e`` always lives in master slot
``e % experts_per_rank`` of rank ``e // experts_per_rank``. EPLB here only decides which logical
expert fills each redundant slot, so the original step that packs expert groups onto nodes has no
counterpart. Each placement runs these steps per replication domain (all ranks for ``global``, each
node for ``hierarchical``):

1. Expected load ``w[e]``: the sum of expert ``e``'s loads over the last ``window`` observed
   microbatches (plus the current one when ``use_current`` is set).
2. Replica counts: while the domain has a free redundant slot, give one more instance to the expert
   with the highest ``w[e] / instances[e]`` (ties: lower expert id). An expert has at most one
   instance per rank of the domain, and experts with ``w[e] == 0`` get no replicas.
3. Packing: the replicas, heaviest ``w[e] / instances[e]`` first (ties: lower expert id), each go to
   the rank with the lowest expected load (ties: lower rank) that has a free redundant slot and does
   not already hold that expert. The original packing can put two instances of one expert on one GPU;
   this one never does. When no rank fits, one swap is tried: a replica already placed on a full
   rank that could take the new one moves to a free slot that fits it.
4. Top-up: a replica that still finds no rank is dropped. The slots left free then go one by one to
   the expert with the highest ``w[e] / instances[e]`` that fits into one of them, on its least
   loaded fitting rank.

Every plan call splits the CURRENT microbatch's load of each expert evenly over its instances,
``load // instances`` each. The first ``load % instances`` instances, master first and then replicas
by ascending physical slot id, get one more. Quotas are therefore exact, and a replica's quota may be 0.
All arithmetic is exact (integers and fractions), so the planner is deterministic.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import math

import torch

from ultraep.layout import ExpertLayout, check_load_matrix
from ultraep.plan import Plan
from ultraep.planners.base import Planner

__all__ = ["EPLB_POLICIES", "EplbConfig", "EplbPlanner"]

logger = logging.getLogger(__name__)

EPLB_POLICIES = ("global", "hierarchical")

# Upper bound on window and interval, far beyond any useful value; it keeps typos such as 10**9 out.
_MAX_WINDOW = 1_000_000


@dataclasses.dataclass(frozen=True)
class EplbConfig:
    """Settings of the EPLB baseline."""

    window: int = 16
    """Number of most recently observed microbatches whose loads estimate each expert's load; in [1, 1e6]."""
    interval: int = 16
    """Re-place on every ``interval``-th plan call (calls 0, interval, 2*interval, ...) and reuse the
    placement in between; in [1, 1e6]. The default equals the default window, so every placement uses
    the microbatches observed since the previous one. Use 1 to re-place on every call."""
    policy: str = "global"
    """``"global"``: replicas may go to any rank. ``"hierarchical"``: replicas stay on the ranks of
    their master's node."""
    num_nodes: int = 1
    """Nodes for the ``hierarchical`` policy; ranks ``n * ranks_per_node .. (n + 1) * ranks_per_node - 1``
    form node ``n``. ``num_ranks`` must be divisible by it. The ``global`` policy ignores it."""
    use_current: bool = False
    """Also count the current microbatch's loads when placing. A periodic balancer cannot have them in
    advance, so this is an oracle for benchmarks only."""

    def __post_init__(self) -> None:
        for name in ("window", "interval", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"EplbConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("window", "interval"):
            value = getattr(self, name)
            if not 1 <= value <= _MAX_WINDOW:
                raise ValueError(f"EplbConfig.{name} must be in [1, {_MAX_WINDOW}], got {value}")
        if self.num_nodes < 1:
            raise ValueError(f"EplbConfig.num_nodes must be >= 1, got {self.num_nodes}")
        if self.policy not in EPLB_POLICIES:
            raise ValueError(f"EplbConfig.policy must be one of {list(EPLB_POLICIES)}, got {self.policy!r}")
        if not isinstance(self.use_current, bool):
            raise TypeError(
                f"EplbConfig.use_current must be a bool, got {type(self.use_current).__name__} {self.use_current!r}"
            )
        if self.policy == "global" and self.num_nodes != 1:
            raise ValueError(
                f"EplbConfig.num_nodes={self.num_nodes} applies to the hierarchical policy only; set "
                "policy='hierarchical' or num_nodes=1"
            )


class EplbPlanner(Planner):
    """Periodic placement from a window of past loads, with exact even quota splits.

    Phases, in the order a training or serving loop calls them:

    1. :meth:`plan` (through ``__call__``) on every microbatch. On calls ``0, interval, 2*interval, ...``
       it computes a new placement from the history; on the other calls it reuses the last one. Then
       it splits the current loads evenly over the instances. With an empty history (and
       ``use_current`` off) the placement is empty, so the plan is masters-only.
    2. :meth:`observe` after the microbatch ran: it appends that microbatch's expert loads to the
       history, which keeps the last ``window`` of them.

    One planner serves one layout. Use one instance per MoE layer, because history and placement
    belong to that layer.
    """

    name = "eplb"

    def __init__(self, config: EplbConfig | None = None, **settings) -> None:
        if config is not None and settings:
            raise TypeError(f"pass either config or settings, not both (got settings {sorted(settings)})")
        self.config = config if config is not None else EplbConfig(**settings)
        self._layout: ExpertLayout | None = None
        # The class that errors name: a planner that places with this one sets its own.
        self._owner = type(self).__name__
        self._history: collections.deque[list[int]] = collections.deque(maxlen=self.config.window)
        # [num_ranks, redundant_slots_per_rank] int64 on CPU, -1 = empty; None before the first placement.
        self._replica_expert_ids: torch.Tensor | None = None
        self._num_plan_calls = 0

    # State.

    def reset(self) -> None:
        """Forget the history, the placement and the call count."""
        self._layout = None
        self._history.clear()
        self._replica_expert_ids = None
        self._num_plan_calls = 0

    @property
    def history_length(self) -> int:
        """Number of observed microbatches currently in the history window."""
        return len(self._history)

    def observe(self, loads: torch.Tensor, layout: ExpertLayout) -> None:
        """Append the load matrix of a microbatch that ran to the history.

        loads: [num_ranks, num_experts] integer tensor, any device. Read on the host.
        """
        check_load_matrix(loads, layout)
        self._bind_layout(layout)
        self._history.append(loads.sum(dim=0, dtype=torch.int64).cpu().tolist())

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        """Plan one layer and microbatch.

        loads: [num_ranks, num_experts] int64, any device. Assignments per source rank and logical expert.
        Returns a plan on ``loads.device``.
        """
        self._bind_layout(layout)
        expert_load = loads.sum(dim=0).cpu()  # [num_experts]
        if self._num_plan_calls % self.config.interval == 0 or self._replica_expert_ids is None:
            self._replica_expert_ids = self._place(expert_load.tolist(), layout)
        self._num_plan_calls += 1
        quota = _split_quotas(expert_load, self._replica_expert_ids, layout)
        return Plan(layout, self._replica_expert_ids.to(loads.device), quota.to(loads.device))

    def _bind_layout(self, layout: ExpertLayout) -> None:
        if self._layout is None:
            if self.config.policy == "hierarchical" and layout.num_ranks % self.config.num_nodes != 0:
                divisors = [d for d in range(1, layout.num_ranks + 1) if layout.num_ranks % d == 0]
                raise ValueError(
                    f"num_ranks={layout.num_ranks} is not divisible by EplbConfig.num_nodes={self.config.num_nodes}: "
                    f"the hierarchical policy needs the same number of ranks on every node; use num_nodes in "
                    f"{divisors} or policy='global'"
                )
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(
                f"{self._owner} got layout {layout} but its history and placement belong to {self._layout}; "
                f"use one {self._owner} per layer and layout, or call reset() first"
            )

    # Placement.

    def _place(self, current_load: list[int], layout: ExpertLayout) -> torch.Tensor:
        """Return [num_ranks, redundant_slots_per_rank] int64 on CPU: the replica placement, -1 = empty."""
        weights = [0] * layout.num_experts
        for past_load in self._history:
            weights = [w + x for w, x in zip(weights, past_load)]
        if self.config.use_current:
            weights = [w + x for w, x in zip(weights, current_load)]

        num_domains = self.config.num_nodes if self.config.policy == "hierarchical" else 1
        ranks_per_domain = layout.num_ranks // num_domains
        replica_expert_ids = torch.full((layout.num_ranks, layout.redundant_slots_per_rank), -1, dtype=torch.int64)
        for domain in range(num_domains):
            rank_ids = range(domain * ranks_per_domain, (domain + 1) * ranks_per_domain)
            rank_replicas = _place_domain(weights, rank_ids, layout)
            for rank in rank_ids:
                for slot_idx, expert in enumerate(sorted(rank_replicas[rank])):
                    replica_expert_ids[rank, slot_idx] = expert
        logger.debug(
            "eplb: placed %d replicas from %d microbatches of history (plan call %d)",
            int((replica_expert_ids >= 0).sum()),
            len(self._history),
            self._num_plan_calls,
        )
        return replica_expert_ids


def _place_domain(weights: list[int], rank_ids: range, layout: ExpertLayout) -> dict[int, set[int]]:
    """Run steps 2 to 4 for the ranks ``rank_ids`` and the experts whose masters live there.

    Returns, per rank, the set of logical experts its redundant slots hold.
    """
    return _DomainPacker(weights, rank_ids, layout).run()


class _DomainPacker:
    """Replica counts and packing for one replication domain.

    Expected loads ``w[e] / instances[e]`` are kept as exact integers scaled by
    ``lcm(1, ..., max_instances)``, which every instance count divides. They are exact, because ties
    must break the same way on every rank. They are integers, because ``fractions.Fraction`` made a
    placement 2x to 9x slower (64 and 16 ranks, one CPU core).
    """

    def __init__(self, weights: list[int], rank_ids: range, layout: ExpertLayout) -> None:
        self.weights = weights
        self.rank_ids = rank_ids
        self.layout = layout
        self.expert_ids = range(rank_ids.start * layout.experts_per_rank, rank_ids.stop * layout.experts_per_rank)
        self.max_instances = len(rank_ids)
        self.scale = math.lcm(*range(1, self.max_instances + 1))
        self.instances = {expert: 1 for expert in self.expert_ids}
        self.rank_replicas: dict[int, set[int]] = {rank: set() for rank in rank_ids}

    def share(self, expert: int) -> int:
        """Return the scaled expected load of one instance of ``expert``."""
        return self.weights[expert] * (self.scale // self.instances[expert])

    def run(self) -> dict[int, set[int]]:
        slots = self.layout.redundant_slots_per_rank

        # Step 2: replica counts, one more instance to the highest expected load per instance.
        heap = [(-self.share(e), e) for e in self.expert_ids if self.weights[e] > 0 and self.max_instances > 1]
        heapq.heapify(heap)
        for _ in range(len(self.rank_ids) * slots):
            if not heap:
                break
            _, expert = heapq.heappop(heap)
            self.instances[expert] += 1
            if self.instances[expert] < self.max_instances:
                heapq.heappush(heap, (-self.share(expert), expert))

        # Step 3: pack the heaviest replicas first onto the least loaded fitting rank.
        replicas = sorted(
            (expert for expert in self.expert_ids for _ in range(self.instances[expert] - 1)),
            key=lambda e: (-self.share(e), e),
        )
        rank_load = self.expected_rank_load()
        dropped = []
        for expert in replicas:
            rank = self.least_loaded_fitting_rank(expert, rank_load)
            if rank is None:
                rank = self.make_room_by_swap(expert, rank_load)
            if rank is None:
                dropped.append(expert)
                continue
            self.rank_replicas[rank].add(expert)
            rank_load[rank] += self.share(expert)

        # Step 4: top up the slots the dropped replicas left free.
        for expert in dropped:
            self.instances[expert] -= 1
        while dropped:
            rank_load = self.expected_rank_load()
            candidates = [
                expert
                for expert in self.expert_ids
                if self.weights[expert] > 0
                and self.instances[expert] < self.max_instances
                and self.least_loaded_fitting_rank(expert, rank_load) is not None
            ]
            if not candidates:
                break
            expert = min(candidates, key=lambda e: (-self.share(e), e))
            rank = self.least_loaded_fitting_rank(expert, rank_load)
            self.rank_replicas[rank].add(expert)
            self.instances[expert] += 1
        return self.rank_replicas

    def expected_rank_load(self) -> dict[int, int]:
        """Return the scaled expected load per rank: the shares of its masters and replicas."""
        experts_per_rank = self.layout.experts_per_rank
        rank_load = {}
        for rank in self.rank_ids:
            masters = range(rank * experts_per_rank, (rank + 1) * experts_per_rank)
            rank_load[rank] = sum(self.share(e) for e in masters) + sum(self.share(e) for e in self.rank_replicas[rank])
        return rank_load

    def least_loaded_fitting_rank(self, expert: int, rank_load: dict[int, int]) -> int | None:
        """Return the rank with the lowest expected load that has a free redundant slot and no instance of ``expert``."""
        master_rank = expert // self.layout.experts_per_rank
        slots = self.layout.redundant_slots_per_rank
        fitting = [
            rank
            for rank in self.rank_ids
            if rank != master_rank and len(self.rank_replicas[rank]) < slots and expert not in self.rank_replicas[rank]
        ]
        if not fitting:
            return None
        return min(fitting, key=lambda rank: (rank_load[rank], rank))

    def make_room_by_swap(self, expert: int, rank_load: dict[int, int]) -> int | None:
        """Move one placed replica to a free slot so that ``expert`` fits where it was; return that rank or None.

        Ranks are tried by expected load (ties: lower rank), their replicas by expert id, and the free
        slots by expected load (ties: lower rank).
        """
        master_rank = expert // self.layout.experts_per_rank
        for rank in sorted(self.rank_ids, key=lambda r: (rank_load[r], r)):
            if rank == master_rank or expert in self.rank_replicas[rank]:
                continue
            for other in sorted(self.rank_replicas[rank]):
                new_rank = self.least_loaded_fitting_rank(other, rank_load)
                if new_rank is None:
                    continue
                self.rank_replicas[rank].remove(other)
                self.rank_replicas[new_rank].add(other)
                rank_load[rank] -= self.share(other)
                rank_load[new_rank] += self.share(other)
                return rank
        return None


def _split_quotas(expert_load: torch.Tensor, replica_expert_ids: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Return [num_slots] int64 on CPU: each expert's load split evenly over its instances.

    expert_load: [num_experts] int64 on CPU. Load of each logical expert in the current microbatch.
    replica_expert_ids: [num_ranks, redundant_slots_per_rank] int64 on CPU, -1 = empty.
    """
    replicas = replica_expert_ids.reshape(-1)  # [num_redundant_slots], ascending physical slot id
    instances = torch.bincount(replicas[replicas >= 0], minlength=layout.num_experts) + 1  # [num_experts]
    base = expert_load // instances
    remainder = expert_load % instances
    master_quota = base + (remainder > 0).to(torch.int64)

    # The master is instance 0; the replicas of an expert are instances 1, 2, ... in slot-id order.
    # Sorting by the unique key expert * num_redundant_slots + slot groups each expert's replicas in
    # slot order, so the position inside its group is the replica's instance index minus 1.
    num_redundant_slots = max(replicas.numel(), 1)
    positions = torch.arange(replicas.numel())
    valid = replicas >= 0
    expert_key = torch.where(valid, replicas, layout.num_experts)
    sorted_key, order = torch.sort(expert_key * num_redundant_slots + positions)
    sorted_expert = sorted_key // num_redundant_slots
    group_start = torch.searchsorted(sorted_key, sorted_expert * num_redundant_slots)
    instance_idx = torch.empty_like(positions)
    instance_idx[order] = positions - group_start + 1  # [num_redundant_slots]
    expert = replicas.clamp(min=0)
    replica_quota = base[expert] + (instance_idx < remainder[expert]).to(torch.int64)
    replica_quota = torch.where(valid, replica_quota, 0)

    quota = torch.cat(
        [
            master_quota.view(layout.num_ranks, layout.experts_per_rank),
            replica_quota.view(layout.num_ranks, layout.redundant_slots_per_rank),
        ],
        dim=1,
    )  # [num_ranks, slots_per_rank]
    return quota.reshape(-1)
