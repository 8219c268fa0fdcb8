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
import math
import numbers

import torch

from ultraep.layout import ExpertLayout, check_load_matrix

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
            0, slot_to_expert[valid], self.quota[valid].to(torch.int64)
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
        """Rebuild a plan from :meth:`to_dict` output (for example a file written by ``ultraep plan``).

        Raises ``ValueError`` naming the key and the bad value in these cases: a count is not an int,
        a list has the wrong length or non-integer entries, or a master is moved. Also when the plan
        breaks an invariant that needs no load matrix (see :func:`check_plan`), and when
        ``logical_to_physical``, ``logical_replica_count``, ``rank_load`` or ``imbalance``, where
        present, disagree with the plan.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a plan must be a dict of the keys that Plan.to_dict writes, got {type(data).__name__}")
        missing = [key for key in ("num_ranks", "experts_per_rank", "redundant_slots_per_rank", "physical_to_logical", "quota") if key not in data]
        if missing:
            raise ValueError(f"the plan is missing the key(s) {', '.join(missing)}; write plans with Plan.to_dict or ultraep plan")
        sizes = {}
        for key in ("num_ranks", "experts_per_rank", "redundant_slots_per_rank"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"plan key {key!r} must be an int, got {type(value).__name__} {value!r}")
            sizes[key] = int(value)
        try:
            layout = ExpertLayout(**sizes)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the plan's layout is invalid: {error}") from error
        physical_to_logical = _int_list(data, "physical_to_logical", layout.num_slots, device)
        table = physical_to_logical.view(layout.num_ranks, layout.slots_per_rank)
        expected_masters = torch.arange(layout.num_experts, device=device).view(layout.num_ranks, layout.experts_per_rank)
        if not torch.equal(table[:, : layout.experts_per_rank], expected_masters):
            raise ValueError(
                "physical_to_logical moves a master: master slot j of rank r must hold logical expert "
                "r * experts_per_rank + j"
            )
        quota = _int_list(data, "quota", layout.num_slots, device)
        plan = cls(layout, table[:, layout.experts_per_rank :].contiguous(), quota)
        try:
            _check_structure(plan)
        except PlanInvariantError as error:
            raise ValueError(f"the plan is inconsistent: {error}") from error
        derived = {
            "logical_replica_count": plan.logical_replica_count(),
            "rank_load": plan.rank_load(),
        }
        for key, expected in derived.items():
            if key in data and _int_list(data, key, expected.numel(), device).tolist() != expected.tolist():
                raise ValueError(f"plan key {key!r} is {list(data[key])} but the plan's maps and quotas give {expected.tolist()}")
        if "logical_to_physical" in data:
            rows = data["logical_to_physical"]
            width = len(rows[0]) if isinstance(rows, list) and rows and isinstance(rows[0], list) else 0
            expected = plan.logical_to_physical(max(width, int(derived["logical_replica_count"].max())))
            listed = _int_list(data, "logical_to_physical", layout.num_experts * width, device, rows=layout.num_experts)
            if listed.tolist() != expected.reshape(-1).tolist():
                raise ValueError(
                    f"plan key 'logical_to_physical' is {rows} but physical_to_logical gives {expected.tolist()} "
                    "(master first, then replicas by slot id, padded with -1)"
                )
        if "imbalance" in data:
            value = data["imbalance"]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isclose(value, plan.imbalance(), rel_tol=1e-12):
                raise ValueError(f"plan key 'imbalance' is {value!r} but the plan's quotas give {plan.imbalance()!r}")
        return plan


def _int_list(data: dict, key: str, length: int, device: torch.device | str, rows: int | None = None) -> torch.Tensor:
    """Return ``data[key]`` as a flat int64 tensor of ``length`` entries, or raise ``ValueError`` naming the key.

    rows: the number of equal-length rows of a nested list, or None for a flat list.
    """
    value = data[key]
    items = value
    if rows is not None:
        if not isinstance(value, list) or len(value) != rows or not all(isinstance(row, list) for row in value):
            raise ValueError(f"plan key {key!r} must be a list of {rows} lists, got {value!r}")
        items = [item for row in value for item in row]
        if rows and len(items) != length:
            raise ValueError(f"plan key {key!r} must have {rows} rows of {length // rows} entries, got {value!r}")
    if not isinstance(items, list) or len(items) != length:
        got = len(items) if isinstance(items, list) else type(items).__name__
        raise ValueError(f"plan key {key!r} must be a list of {length} ints, got {got} entries")
    for index, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise ValueError(f"plan key {key!r} entry {index} is {item!r}; every entry must be an int")
    return torch.tensor(items, dtype=torch.int64, device=device)


def check_plan(plan: Plan, loads: torch.Tensor, *, min_replica_quota: int = 0) -> None:
    """Check every plan invariant against the load matrix; raise :class:`PlanInvariantError` naming the first break.

    loads: [num_ranks, num_experts] integer tensor, same device as the plan. A load matrix of the
      wrong type, shape or dtype, or with a negative entry, raises the ``TypeError`` or ``ValueError``
      of :func:`~ultraep.layout.check_load_matrix` instead.

    Invariants: both plan tensors contain integers and have the layout's shapes; quotas are
    non-negative; the quotas of each expert's instances sum to its load; an empty redundant slot has
    quota 0; no rank hosts two instances of one expert; replica ids are valid logical expert ids;
    every replica has quota >= ``min_replica_quota``. Reads the plan on the host.
    """
    layout = plan.layout
    check_load_matrix(loads, layout)
    _check_structure(plan)
    replicas = plan.replica_expert_ids.cpu()
    slot_quota = plan.quota.cpu().view(layout.num_ranks, layout.slots_per_rank)[:, layout.experts_per_rank :]
    small = (replicas >= 0) & (slot_quota < min_replica_quota)
    if bool(small.any()):
        rank, idx = torch.nonzero(small)[0].tolist()
        raise PlanInvariantError(
            f"replica of expert {int(replicas[rank, idx])} on rank {rank} has quota {int(slot_quota[rank, idx])}, "
            f"below min_replica_quota={min_replica_quota}"
        )
    expected = loads.cpu().to(torch.int64).sum(dim=0)
    got = plan.to("cpu").expert_load()
    if not torch.equal(expected, got):
        expert = int(torch.nonzero(expected != got)[0])
        raise PlanInvariantError(
            f"quotas of expert {expert} sum to {int(got[expert])} but its load is {int(expected[expert])}"
        )


def _check_structure(plan: Plan) -> None:
    """Check the invariants that need no load matrix; raise :class:`PlanInvariantError` naming the first break."""
    layout = plan.layout
    for name in ("replica_expert_ids", "quota"):
        tensor = getattr(plan, name)
        if not isinstance(tensor, torch.Tensor):
            raise PlanInvariantError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise PlanInvariantError(f"{name} must be an integer tensor (int64), got dtype {tensor.dtype}")
    if tuple(plan.replica_expert_ids.shape) != (layout.num_ranks, layout.redundant_slots_per_rank):
        raise PlanInvariantError(
            f"replica_expert_ids has shape {list(plan.replica_expert_ids.shape)}, expected "
            f"[{layout.num_ranks}, {layout.redundant_slots_per_rank}]"
        )
    if tuple(plan.quota.shape) != (layout.num_slots,):
        raise PlanInvariantError(f"quota has shape {list(plan.quota.shape)}, expected [{layout.num_slots}]")
    replicas = plan.replica_expert_ids.cpu().to(torch.int64)
    quota = plan.quota.cpu().to(torch.int64)
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
    # Two instances of one expert on one rank share a key rank * num_experts + expert.
    table = Plan(layout, replicas, quota).physical_to_logical().view(layout.num_ranks, layout.slots_per_rank)
    ranks = torch.arange(layout.num_ranks).view(-1, 1).expand_as(table)
    keys = (ranks * layout.num_experts + table)[table >= 0]
    sorted_keys = torch.sort(keys).values
    repeated = sorted_keys[1:] == sorted_keys[:-1]
    if bool(repeated.any()):
        rank, expert = divmod(int(sorted_keys[1:][repeated][0]), layout.num_experts)
        contents = table[rank][table[rank] >= 0].tolist()
        raise PlanInvariantError(f"rank {rank} hosts two instances of expert {expert}; its slots contain {contents}")
