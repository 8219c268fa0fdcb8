"""The plan: which logical expert each redundant slot holds, and the exact quota of every instance.

A plan is produced by a planner from the load matrix of one layer and microbatch. Every rank computes
the same plan from the same integers, so the plan is never communicated; its fingerprint is compared
instead (see :meth:`Plan.fingerprint`).

Example with 2 ranks, 2 experts per rank and 1 redundant slot per rank (6 physical slots)::

    loads (summed over source ranks) = [10, 2, 2, 2]      # expert 0 is hot
    replica_expert_ids = [[-1], [0]]                       # rank 1's redundant slot holds expert 0
    quota               = [6, 2, 0, 2, 2, 4]               # slot 0 (master of 0) keeps 6, slot 5 gets 4
    physical_to_logical = [0, 1, -1, 2, 3, 0]
    logical_to_physical = [[0, 5], [1, -1], [3, -1], [4, -1]]
    logical_replica_count = [2, 1, 1, 1]
    rank_load = [8, 8]
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from ultraep.layout import ExpertLayout

__all__ = ["Plan", "PlanInvariantError", "check_plan"]


class PlanInvariantError(RuntimeError):
    """A plan breaks one of the plan invariants (exact quotas, capacity, one instance per rank)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Placement of replicas in redundant slots plus the exact quota of every instance.

    Fields:

    - ``layout``: the :class:`~ultraep.layout.ExpertLayout` the plan is for.
    - ``replica_expert_ids``: [num_ranks, redundant_slots_per_rank] int64, same device as the load
      matrix. Logical expert held by each redundant slot; -1 = empty.
    - ``quota``: [num_slots] int64, same device. Exact number of assignments each physical slot
      processes; 0 for an empty redundant slot. A master's quota may be 0 when all its load moved to
      replicas.
    """

    layout: ExpertLayout
    """The expert layout the plan is for."""
    replica_expert_ids: torch.Tensor
    """[num_ranks, redundant_slots_per_rank] int64, same device as the load matrix. Logical expert held
    by each redundant slot; -1 = empty."""
    quota: torch.Tensor
    """[num_slots] int64, same device. Exact number of assignments each physical slot processes; 0 for
    an empty redundant slot. A master's quota may be 0 when all its load moved to replicas."""

    @property
    def device(self) -> torch.device:
        return self.quota.device

    def physical_to_logical(self) -> torch.Tensor:
        """Return [num_slots] int64: logical expert of each physical slot, -1 for an empty redundant slot."""
        layout = self.layout
        master_ids = torch.arange(layout.num_experts, device=self.device).view(layout.num_ranks, layout.experts_per_rank)
        table = torch.cat([master_ids, self.replica_expert_ids.to(torch.int64)], dim=1)  # [num_ranks, slots_per_rank]
        return table.reshape(-1)

    def logical_to_physical(self, max_instances: int | None = None) -> torch.Tensor:
        """Return [num_experts, max_instances] int64: physical slot ids of each expert's instances.

        The master comes first, then replicas by ascending physical slot id; rows are padded with -1.
        ``max_instances`` defaults to ``layout.max_instances`` (a static bound, so no host sync);
        :meth:`to_dict` trims the padding.
        """
        layout = self.layout
        width = layout.max_instances if max_instances is None else max_instances
        slot_to_expert = self.physical_to_logical()
        slot_ids = torch.arange(layout.num_slots, device=self.device)
        is_master = ~layout.is_redundant_slot(slot_ids)
        # Sort key: expert first, master before replicas, then slot id; empty slots go last.
        order_in_expert = torch.where(is_master, torch.zeros_like(slot_ids), slot_ids + 1)
        expert_key = torch.where(slot_to_expert >= 0, slot_to_expert, torch.full_like(slot_to_expert, layout.num_experts))
        key = expert_key * (layout.num_slots + 1) + order_in_expert
        sorted_key, sorted_slot_ids = torch.sort(key)
        sorted_expert = sorted_key // (layout.num_slots + 1)
        counts = torch.bincount(expert_key, minlength=layout.num_experts + 1)
        group_start = torch.cumsum(counts, 0) - counts
        position = torch.arange(layout.num_slots, device=self.device) - group_start[sorted_expert]
        table = torch.full((layout.num_experts + 1, max(width, 1)), -1, dtype=torch.int64, device=self.device)
        keep = position < width
        table[sorted_expert[keep], position[keep]] = sorted_slot_ids[keep]
        return table[: layout.num_experts, :width]

    def logical_replica_count(self) -> torch.Tensor:
        """Return [num_experts] int64: instances of each logical expert (master plus replicas)."""
        replicas = self.replica_expert_ids.reshape(-1)
        extra = torch.bincount(replicas[replicas >= 0], minlength=self.layout.num_experts)
        return extra[: self.layout.num_experts] + 1

    def num_replicas(self) -> torch.Tensor:
        """Return a 0-dim int64 tensor: redundant slots that hold a replica."""
        return (self.replica_expert_ids >= 0).sum()

    def rank_load(self) -> torch.Tensor:
        """Return [num_ranks] int64: sum of the quotas of the instances on each rank."""
        return self.quota.view(self.layout.num_ranks, self.layout.slots_per_rank).sum(dim=1)

    def expert_load(self) -> torch.Tensor:
        """Return [num_experts] int64: quotas summed per logical expert (equals the load matrix's column sums)."""
        slot_to_expert = self.physical_to_logical()
        valid = slot_to_expert >= 0
        return torch.zeros(self.layout.num_experts, dtype=torch.int64, device=self.device).index_add_(
            0, slot_to_expert[valid], self.quota[valid]
        )

    def imbalance(self) -> float:
        """Return max rank load / mean rank load (1.0 when there is no load). Reads the plan on the host."""
        rank_load = self.rank_load()
        total = int(rank_load.sum())
        if total == 0:
            return 1.0
        return int(rank_load.max()) * self.layout.num_ranks / total

    def fingerprint(self) -> str:
        """Return a short hex digest of the placement and quotas; equal plans give equal digests on any device."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(repr(self.layout).encode())
        digest.update(self.replica_expert_ids.to(device="cpu", dtype=torch.int64).numpy().tobytes())
        digest.update(self.quota.to(device="cpu", dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def to(self, device: torch.device | str) -> Plan:
        """Return the same plan with its tensors on ``device``."""
        return Plan(self.layout, self.replica_expert_ids.to(device), self.quota.to(device))

    def to_dict(self) -> dict:
        """Return the plan as plain Python values: the stable JSON format written by ``ultraep plan``.

        Keys: ``num_ranks``, ``experts_per_rank``, ``redundant_slots_per_rank``, ``physical_to_logical``
        [num_slots], ``logical_to_physical`` [num_experts][max instances of any expert] padded with -1,
        ``logical_replica_count`` [num_experts], ``quota`` [num_slots], ``rank_load`` [num_ranks],
        ``imbalance``.
        """
        counts = self.logical_replica_count()
        width = int(counts.max()) if counts.numel() else 1
        return {
            "num_ranks": self.layout.num_ranks,
            "experts_per_rank": self.layout.experts_per_rank,
            "redundant_slots_per_rank": self.layout.redundant_slots_per_rank,
            "physical_to_logical": self.physical_to_logical().tolist(),
            "logical_to_physical": self.logical_to_physical(width).tolist(),
            "logical_replica_count": counts.tolist(),
            "quota": self.quota.tolist(),
            "rank_load": self.rank_load().tolist(),
            "imbalance": self.imbalance(),
        }

    @classmethod
    def from_dict(cls, data: dict, device: torch.device | str = "cpu") -> Plan:
        """Rebuild a plan from :meth:`to_dict` output; raises ``ValueError`` on inconsistent maps."""
        layout = ExpertLayout(
            int(data["num_ranks"]), int(data["experts_per_rank"]), int(data["redundant_slots_per_rank"])
        )
        physical_to_logical = torch.tensor(data["physical_to_logical"], dtype=torch.int64, device=device)
        if physical_to_logical.shape != (layout.num_slots,):
            raise ValueError(
                f"physical_to_logical has {physical_to_logical.numel()} entries, expected num_slots={layout.num_slots}"
            )
        table = physical_to_logical.view(layout.num_ranks, layout.slots_per_rank)
        expected_masters = torch.arange(layout.num_experts, device=device).view(layout.num_ranks, layout.experts_per_rank)
        if not torch.equal(table[:, : layout.experts_per_rank], expected_masters):
            raise ValueError(
                "physical_to_logical moves a master: master slot j of rank r must hold logical expert "
                "r * experts_per_rank + j"
            )
        quota = torch.tensor(data["quota"], dtype=torch.int64, device=device)
        plan = cls(layout, table[:, layout.experts_per_rank :].contiguous(), quota)
        return plan


def check_plan(plan: Plan, loads: torch.Tensor, *, min_replica_quota: int = 0) -> None:
    """Check every plan invariant against the load matrix; raise :class:`PlanInvariantError` naming the first break.

    loads: [num_ranks, num_experts] integer tensor, same device as the plan.

    Invariants: quotas are non-negative; the quotas of each expert's instances sum to its load; an
    empty redundant slot has quota 0; no rank holds two instances of one expert; replica ids are valid
    logical expert ids; every replica has quota >= ``min_replica_quota``. Reads the plan on the host.
    """
    layout = plan.layout
    if tuple(plan.replica_expert_ids.shape) != (layout.num_ranks, layout.redundant_slots_per_rank):
        raise PlanInvariantError(
            f"replica_expert_ids has shape {list(plan.replica_expert_ids.shape)}, expected "
            f"[{layout.num_ranks}, {layout.redundant_slots_per_rank}]"
        )
    if tuple(plan.quota.shape) != (layout.num_slots,):
        raise PlanInvariantError(f"quota has shape {list(plan.quota.shape)}, expected [{layout.num_slots}]")
    replicas = plan.replica_expert_ids.cpu()
    quota = plan.quota.cpu()
    if bool((quota < 0).any()):
        slot = int(torch.nonzero(quota < 0)[0])
        raise PlanInvariantError(f"quota of physical slot {slot} is negative ({int(quota[slot])})")
    bad = (replicas < -1) | (replicas >= layout.num_experts)
    if bool(bad.any()):
        rank, idx = torch.nonzero(bad)[0].tolist()
        raise PlanInvariantError(f"redundant slot {idx} of rank {rank} holds invalid expert id {int(replicas[rank, idx])}")
    slot_quota = quota.view(layout.num_ranks, layout.slots_per_rank)[:, layout.experts_per_rank :]
    empty_with_quota = (replicas < 0) & (slot_quota != 0)
    if bool(empty_with_quota.any()):
        rank, idx = torch.nonzero(empty_with_quota)[0].tolist()
        raise PlanInvariantError(f"empty redundant slot {idx} of rank {rank} has quota {int(slot_quota[rank, idx])}")
    small = (replicas >= 0) & (slot_quota < min_replica_quota)
    if bool(small.any()):
        rank, idx = torch.nonzero(small)[0].tolist()
        raise PlanInvariantError(
            f"replica of expert {int(replicas[rank, idx])} on rank {rank} has quota {int(slot_quota[rank, idx])}, "
            f"below min_replica_quota={min_replica_quota}"
        )
    table = plan.physical_to_logical().cpu().view(layout.num_ranks, layout.slots_per_rank)
    for rank in range(layout.num_ranks):
        held = table[rank][table[rank] >= 0]
        if held.unique().numel() != held.numel():
            raise PlanInvariantError(f"rank {rank} holds two instances of one expert: slots hold {held.tolist()}")
    expected = loads.cpu().to(torch.int64).sum(dim=0)
    got = plan.to("cpu").expert_load()
    if not torch.equal(expected, got):
        expert = int(torch.nonzero(expected != got)[0])
        raise PlanInvariantError(
            f"quotas of expert {expert} sum to {int(got[expert])} but its load is {int(expected[expert])}"
        )
