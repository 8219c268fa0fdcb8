"""Expert layout of one EP group: ranks, master slots, redundant slots and id conversions.

Terms:

- rank: one process of the EP group, ``0 .. num_ranks-1``.
- logical expert: an expert of the model, ``0 .. num_experts-1`` with
  ``num_experts = num_ranks * experts_per_rank``.
- master slot: logical expert ``e`` permanently lives on rank ``e // experts_per_rank`` in slot
  ``e % experts_per_rank`` of that rank.
- redundant slot: one of ``redundant_slots_per_rank`` spare slots per rank that may hold a replica of
  any logical expert for one layer and microbatch.
- physical slot id: ``rank * slots_per_rank + j`` with ``slots_per_rank = experts_per_rank +
  redundant_slots_per_rank``; ``j < experts_per_rank`` is a master slot, the rest are redundant slots.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

__all__ = ["ExpertLayout", "check_load_matrix", "as_load_matrix", "check_logical_to_physical", "fold_slot_counts"]

# NOTE: quotas, prefix sums and the quota planner's integer comparisons of
# (load * num_ranks * 2**14) stay inside int64 while the total load of one microbatch is at most
# this value and num_ranks is at most 4096.
MAX_TOTAL_LOAD = 2**35


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Placement of logical experts and redundant slots over the ranks of one EP group.

    The id conversions (``master_rank``, ``master_slot_id``, ``slot_rank``, ``is_redundant_slot``,
    ``redundant_slot_id``) take Python ints or integer tensors of any shape and device and return the
    same kind: an int for ints, a tensor of the input's shape and device for tensors.
    """

    num_ranks: int
    """Ranks in the EP group (>= 1)."""
    experts_per_rank: int
    """Master slots per rank (>= 1); each holds one logical expert permanently."""
    redundant_slots_per_rank: int = 0
    """Spare slots per rank (>= 0) that may hold replicas of hot experts."""

    def __post_init__(self) -> None:
        for name in ("num_ranks", "experts_per_rank", "redundant_slots_per_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"ExpertLayout.{name} must be an int, got {type(value).__name__} {value!r}")
            # A NumPy integer becomes an int, so equal layouts have equal reprs and fingerprints.
            object.__setattr__(self, name, int(value))
        if self.num_ranks < 1:
            raise ValueError(f"ExpertLayout.num_ranks must be >= 1, got {self.num_ranks}")
        if self.experts_per_rank < 1:
            raise ValueError(f"ExpertLayout.experts_per_rank must be >= 1, got {self.experts_per_rank}")
        if self.redundant_slots_per_rank < 0:
            raise ValueError(
                "ExpertLayout.redundant_slots_per_rank must be >= 0, "
                f"got {self.redundant_slots_per_rank}; use 0 to disable replicas"
            )

    @classmethod
    def from_num_experts(cls, num_experts: int, num_ranks: int, redundant_slots_per_rank: int = 0) -> ExpertLayout:
        """Build the layout for ``num_experts`` logical experts spread evenly over ``num_ranks`` ranks.

        Raises ``ValueError`` naming both numbers and the nearest valid rank counts when
        ``num_experts`` is not a multiple of ``num_ranks``.
        """
        if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, numbers.Integral) or num_ranks < 1:
            raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
        num_experts, num_ranks = int(num_experts), int(num_ranks)
        if num_experts % num_ranks != 0:
            divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            lower = max(d for d in divisors if d < num_ranks)
            higher = [d for d in divisors if d > num_ranks]
            hint = f"{lower}" + (f" or {higher[0]}" if higher else "")
            raise ValueError(
                f"num_experts={num_experts} is not divisible by num_ranks={num_ranks}: every rank must hold "
                f"the same number of master slots; use num_ranks={hint} (a divisor of {num_experts})"
            )
        return cls(num_ranks, num_experts // num_ranks, redundant_slots_per_rank)

    # Sizes.

    @property
    def num_experts(self) -> int:
        """Logical experts: ``num_ranks * experts_per_rank``."""
        return self.num_ranks * self.experts_per_rank

    @property
    def slots_per_rank(self) -> int:
        """Physical slots per rank: master slots then redundant slots."""
        return self.experts_per_rank + self.redundant_slots_per_rank

    @property
    def num_slots(self) -> int:
        """Physical slots in the EP group: ``num_ranks * slots_per_rank``."""
        return self.num_ranks * self.slots_per_rank

    @property
    def num_redundant_slots(self) -> int:
        """Redundant slots in the EP group: ``num_ranks * redundant_slots_per_rank``."""
        return self.num_ranks * self.redundant_slots_per_rank

    @property
    def max_instances(self) -> int:
        """Upper bound on the instances of one logical expert: one per rank, at most one per redundant slot plus the master."""
        return min(self.num_ranks, 1 + self.num_redundant_slots)

    # Id conversions. Each accepts an int or an integer tensor and returns the same kind.

    def master_rank(self, expert_ids):
        """Rank that holds the master slot of each logical expert."""
        return expert_ids // self.experts_per_rank

    def master_slot_id(self, expert_ids):
        """Physical slot id of each logical expert's master slot."""
        rank = expert_ids // self.experts_per_rank
        return rank * self.slots_per_rank + (expert_ids - rank * self.experts_per_rank)

    def slot_rank(self, slot_ids):
        """Rank that holds each physical slot."""
        return slot_ids // self.slots_per_rank

    def is_redundant_slot(self, slot_ids):
        """True where a physical slot id names a redundant slot."""
        return slot_ids % self.slots_per_rank >= self.experts_per_rank

    def redundant_slot_id(self, rank, redundant_idx):
        """Physical slot id of redundant slot ``redundant_idx`` (``0 .. redundant_slots_per_rank-1``) on ``rank``."""
        return rank * self.slots_per_rank + self.experts_per_rank + redundant_idx

    def master_physical_to_logical(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Return ``[num_slots]`` int64: the logical expert of each master slot, -1 for redundant slots."""
        slot_ids = torch.arange(self.num_slots, device=device)
        rank = slot_ids // self.slots_per_rank
        local_idx = slot_ids % self.slots_per_rank
        expert_ids = rank * self.experts_per_rank + local_idx
        return torch.where(local_idx < self.experts_per_rank, expert_ids, torch.full_like(expert_ids, -1))


def check_load_matrix(loads: torch.Tensor, layout: ExpertLayout, *, name: str = "loads", check_values: bool = True) -> None:
    """Validate a load matrix against ``layout``; raise ``TypeError``/``ValueError`` naming the problem and the fix.

    loads: [num_ranks, num_experts] integer tensor, any device. ``loads[src_rank, expert]`` counts the
      assignments produced on ``src_rank`` for logical ``expert``.

    The shape and dtype checks read metadata only. ``check_values`` also checks that every entry is
    non-negative and the total fits the planner's int64 arithmetic; that reads the tensor on the
    host, so a CUDA-graph hot path passes ``check_values=False``.
    """
    if not isinstance(loads, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(loads).__name__}")
    if loads.dtype.is_floating_point or loads.dtype.is_complex or loads.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor (token-expert assignment counts), got dtype {loads.dtype}; "
            "convert with loads.round().long() after checking the values are whole counts"
        )
    expected = (layout.num_ranks, layout.num_experts)
    if tuple(loads.shape) != expected:
        raise ValueError(
            f"{name} must have shape [num_ranks, num_experts] = {list(expected)} for {layout}, "
            f"got {list(loads.shape)}"
        )
    if not check_values or loads.numel() == 0:
        return
    if loads.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which has no values; pass a tensor with real counts")
    minimum = int(loads.min())
    if minimum < 0:
        src_rank, expert = divmod(int(torch.argmin(loads.reshape(-1))), layout.num_experts)
        raise ValueError(
            f"{name}[{src_rank}, {expert}] = {minimum} is negative; a load counts assignments and must be >= 0"
        )
    # Bound the largest entry first: a sum of huge entries would wrap around in int64.
    maximum = int(loads.max())
    if maximum > MAX_TOTAL_LOAD:
        src_rank, expert = divmod(int(torch.argmax(loads.reshape(-1))), layout.num_experts)
        raise ValueError(
            f"{name}[{src_rank}, {expert}] = {maximum} exceeds {MAX_TOTAL_LOAD}, the most the planner's int64 "
            "arithmetic supports for one microbatch; plan smaller microbatches"
        )
    total = int(loads.sum(dtype=torch.int64))
    if total > MAX_TOTAL_LOAD:
        raise ValueError(
            f"total load {total} of {name} exceeds {MAX_TOTAL_LOAD}, the most the planner's int64 arithmetic "
            "supports; plan smaller microbatches"
        )


def as_load_matrix(loads: torch.Tensor, layout: ExpertLayout, *, src_rank: int = 0) -> torch.Tensor:
    """Return ``loads`` as a ``[num_ranks, num_experts]`` matrix.

    loads: [num_ranks, num_experts] or [num_experts] integer tensor, any device. A vector means all
      assignments come from ``src_rank``; its other rows are zero.
    """
    if loads.dim() == 1:
        if isinstance(src_rank, bool) or not isinstance(src_rank, numbers.Integral) or not 0 <= src_rank < layout.num_ranks:
            raise ValueError(f"src_rank={src_rank!r} must be an int in [0, {layout.num_ranks - 1}] for {layout}")
        if loads.numel() != layout.num_experts:
            raise ValueError(
                f"load vector has {loads.numel()} entries but the layout has {layout.num_experts} logical experts "
                f"({layout.num_ranks} ranks x {layout.experts_per_rank}); pass one load per logical expert, "
                "not one per physical slot (fold slot counts with fold_slot_counts first)"
            )
        matrix = torch.zeros((layout.num_ranks, layout.num_experts), dtype=loads.dtype, device=loads.device)
        matrix[src_rank] = loads
        return matrix
    return loads


def fold_slot_counts(slot_counts: torch.Tensor, physical_to_logical: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sum per-slot counts into per-logical-expert loads.

    slot_counts: [num_slots] integer tensor, any device. Assignments each physical slot processed.
    physical_to_logical: [num_slots] int64, same device. Logical expert of each slot; -1 = empty (its
      count must be 0).
    Returns [num_experts] int64 on the same device.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    for name, tensor in (("slot_counts", slot_counts), ("physical_to_logical", physical_to_logical)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {tensor.dtype}; convert whole counts with .long()")
    if slot_counts.dim() != 1 or physical_to_logical.dim() != 1 or slot_counts.numel() != physical_to_logical.numel():
        raise ValueError(
            f"slot_counts has shape {list(slot_counts.shape)} but physical_to_logical has shape "
            f"{list(physical_to_logical.shape)}; both must be [num_slots] (per physical slot, not per logical expert)"
        )
    bad = (physical_to_logical < -1) | (physical_to_logical >= num_experts)
    if bool(bad.any()):
        slot = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"physical_to_logical[{slot}] = {int(physical_to_logical[slot])} is outside [-1, {num_experts - 1}]; "
            "use -1 for an empty slot and a logical expert id otherwise"
        )
    if bool((slot_counts < 0).any()):
        slot = int(torch.nonzero(slot_counts < 0)[0])
        raise ValueError(f"slot_counts[{slot}] = {int(slot_counts[slot])} is negative; a slot count must be >= 0")
    empty = physical_to_logical < 0
    if bool((slot_counts[empty] != 0).any()):
        slot = int(torch.nonzero(empty & (slot_counts != 0))[0])
        raise ValueError(f"empty physical slot {slot} has count {int(slot_counts[slot])}; an empty slot processes nothing")
    out = torch.zeros(num_experts, dtype=torch.int64, device=slot_counts.device)
    return out.index_add_(0, physical_to_logical[~empty], slot_counts[~empty].to(torch.int64))


def check_logical_to_physical(logical_to_physical: torch.Tensor, physical_to_logical: torch.Tensor) -> None:
    """Check a logical-to-physical table against its physical-to-logical map; raise ``ValueError`` naming the expert.

    logical_to_physical: [num_experts, max_instances] int64. Physical slot ids of each expert's instances,
      padded with -1 after the last real entry (padding before a real entry is rejected, because readers
      that stop at the first -1 would miss an instance).
    physical_to_logical: [num_slots] int64; -1 = empty slot.
    """
    table = logical_to_physical.cpu()
    slot_map = physical_to_logical.cpu()
    num_slots = slot_map.numel()
    for expert, row in enumerate(table.tolist()):
        seen_padding = False
        for slot in row:
            if slot == -1:
                seen_padding = True
                continue
            if seen_padding:
                raise ValueError(
                    f"logical_to_physical row of expert {expert} is {row}: -1 padding stands before slot {slot}; "
                    "put every real slot id first and pad with -1 at the end"
                )
            if not 0 <= slot < num_slots:
                raise ValueError(f"logical_to_physical row of expert {expert} names slot {slot}, outside [0, {num_slots - 1}]")
            if slot_map[slot] != expert:
                raise ValueError(
                    f"logical_to_physical says slot {slot} holds expert {expert} but physical_to_logical[{slot}] = "
                    f"{int(slot_map[slot])}"
                )
    listed = torch.zeros(num_slots, dtype=torch.bool)
    flat = table[table >= 0]
    listed[flat] = True
    missing = (slot_map >= 0) & ~listed
    if bool(missing.any()):
        slot = int(torch.nonzero(missing)[0])
        raise ValueError(f"slot {slot} holds expert {int(slot_map[slot])} but is missing from that expert's logical_to_physical row")
