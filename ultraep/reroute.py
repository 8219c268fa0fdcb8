"""Count and reroute: turn logical ``topk_ids`` into physical slot ids that meet the plan's quotas exactly.

Every rank has the whole load matrix and the plan, so every rank can compute, without further
communication, how many of its assignments each instance takes (:func:`source_quota`). The split is
a pure function of integers:

1. Local first: an instance on rank ``r`` takes ``min(quota, loads[r, e])`` assignments of its own
   rank ``r``, so those assignments never leave the rank.
2. The rest of each expert's assignments, ordered by source rank, fill the rest of its instances'
   quotas, ordered master first and then by physical slot id (two prefix sums and an overlap).

On one source rank, :func:`reroute` then hands the assignments of expert ``e`` out in token order:
the first ones to the local instance, the next ones to the other instances in table order.
Which assignment goes where depends only on token order (a stable sort, no atomics).
"""

from __future__ import annotations

import numbers

import torch

from ultraep.layout import ExpertLayout, check_load_matrix
from ultraep.plan import Plan, PlanInvariantError, check_plan

__all__ = ["count_local_load", "reroute", "source_quota"]


def _check_topk_ids(topk_ids: torch.Tensor, num_experts: int, check_values: bool) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"topk_ids must hold integer expert ids, got dtype {topk_ids.dtype}; convert with .long()")
    if topk_ids.dim() != 2:
        raise ValueError(
            f"topk_ids must have shape [num_tokens, topk], got {list(topk_ids.shape)}; "
            "flatten extra leading dims with topk_ids.reshape(-1, topk)"
        )
    if check_values and topk_ids.numel() > 0:
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < -1 or high >= num_experts:
            bad = low if low < -1 else high
            token = int(torch.nonzero(topk_ids == bad)[0, 0])
            raise ValueError(
                f"topk_ids[{token}] contains expert id {bad}, outside [0, {num_experts - 1}] "
                "(use -1 for unused entries)"
            )


def count_local_load(topk_ids: torch.Tensor, num_experts: int, *, check_values: bool = True) -> torch.Tensor:
    """Count this rank's assignments per logical expert.

    topk_ids: [num_tokens, topk] integer tensor, any device. Logical expert per assignment; -1 = unused
      (padding rows, dropped tokens), never counted. A token that names one expert twice counts twice.
    num_experts: logical experts of the layer (a positive int).
    check_values: check that every id lies in [-1, num_experts) (reads the ids on the host). Without
      it, ids outside that range are neither checked nor counted.
    Returns [num_experts] int64 on ``topk_ids.device``; all-gather it to build the load matrix.
    """
    _check_topk_ids(topk_ids, num_experts, check_values)
    num_experts = int(num_experts)
    flat = topk_ids.reshape(-1).to(torch.int64)
    # -1 goes to an extra bin that is dropped, so it can never wrap around to the last expert.
    bins = torch.where(flat >= 0, flat, num_experts)
    return torch.bincount(bins, minlength=num_experts + 1)[:num_experts]


def _local_take(plan: Plan, loads: torch.Tensor):
    """Return (slot_to_expert, slot_rank, local_take) for all physical slots; local_take is 0 for empty slots."""
    layout = plan.layout
    slot_to_expert = plan.physical_to_logical()  # [num_slots]
    slot_ids = torch.arange(layout.num_slots, device=loads.device)
    slot_rank = layout.slot_rank(slot_ids)
    valid = slot_to_expert >= 0
    own_load = loads[slot_rank, slot_to_expert.clamp(min=0)]  # [num_slots]: loads[r, e] of the slot's rank
    local_take = torch.where(valid, torch.minimum(plan.quota, own_load), 0)
    return slot_to_expert, slot_rank, local_take


def _check_plan_fits(plan: Plan, loads: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``plan`` breaks an invariant or was not made from ``loads``."""
    try:
        check_plan(plan, loads)
    except PlanInvariantError as error:
        raise ValueError(
            f"the plan does not fit this load matrix: {error}; reroute with the plan made from the same loads"
        ) from error


def source_quota(plan: Plan, loads: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """Split every instance's quota over the source ranks, local assignments first.

    plan: the plan for ``loads``.
    loads: [num_ranks, num_experts] integer tensor, same device as the plan; the load matrix the plan was made from.
    check_values: check the load matrix's values and that the plan's quotas sum to its column sums
      (``check_plan``; reads both on the host). Without it only shapes and dtypes are checked, and a
      plan made from other loads gives a split whose rows do not sum to ``loads.sum(1)``.
    Returns [num_ranks, num_slots] int64: ``out[src_rank, slot]`` assignments produced on ``src_rank``
    that the instance in ``slot`` processes. Rows sum to ``loads.sum(1)``; columns sum to
    ``plan.quota``; entries of empty slots are 0.
    """
    layout = plan.layout
    if check_values:
        _check_plan_fits(plan, loads)  # check_plan checks the load matrix too
    else:
        check_load_matrix(loads, layout, check_values=False)
    loads = loads.to(torch.int64)

    # Step 1: local assignments first.
    slot_to_expert, slot_rank, local_take = _local_take(plan, loads)
    valid = slot_to_expert >= 0
    expert_of_slot = slot_to_expert.clamp(min=0)
    local_matrix = torch.zeros_like(loads)
    # One instance per (rank, expert), so these positions never collide.
    local_matrix.index_put_((slot_rank[valid], slot_to_expert[valid]), local_take[valid])
    remaining_load = loads - local_matrix  # [num_ranks, num_experts]
    remaining_quota = plan.quota - local_take  # [num_slots]

    # Step 2: the rest, as the overlap of two lines per expert: source ranks in rank order and
    # instances in logical_to_physical order (master first, then by slot id).
    load_end = remaining_load.cumsum(dim=0)  # [num_ranks, num_experts]
    load_start = load_end - remaining_load
    table = plan.logical_to_physical()  # [num_experts, max_instances]
    table_quota = torch.where(table >= 0, remaining_quota[table.clamp(min=0)], 0)
    table_end = table_quota.cumsum(dim=1)
    quota_end = torch.zeros(layout.num_slots, dtype=torch.int64, device=loads.device)
    quota_end[table[table >= 0]] = table_end[table >= 0]
    quota_start = quota_end - remaining_quota
    overlap = torch.minimum(load_end[:, expert_of_slot], quota_end) - torch.maximum(load_start[:, expert_of_slot], quota_start)
    out = torch.where(valid, overlap.clamp(min=0), 0)  # [num_ranks, num_slots]
    out[slot_rank, torch.arange(layout.num_slots, device=loads.device)] += local_take
    return out


def reroute(
    topk_ids: torch.Tensor,
    plan: Plan,
    loads: torch.Tensor,
    src_rank: int,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Map this rank's logical expert ids to physical slot ids so every instance gets exactly its quota.

    topk_ids: [num_tokens, topk] integer tensor on ``src_rank``, same device as the plan. Logical expert
      per assignment; -1 = unused. A token may name one expert twice; each entry is routed on its own.
    plan: the plan made from ``loads``.
    loads: [num_ranks, num_experts] integer tensor, same device. Row ``src_rank`` must equal
      ``count_local_load(topk_ids)``.
    src_rank: this rank's index in the EP group.
    check_values: check ids, the load matrix, that the plan was made from it (its quotas sum to the
      column sums, :func:`~ultraep.plan.check_plan`) and that row ``src_rank`` matches ``topk_ids``
      (reads values on the host); pass ``False`` on a CUDA-graph hot path.
    Returns [num_tokens, topk] int64 physical slot ids on the same device; -1 entries stay -1.

    Summed over all source ranks, every physical slot receives exactly ``plan.quota[slot]``
    assignments, each of its own logical expert.
    """
    layout: ExpertLayout = plan.layout
    num_experts = layout.num_experts
    if isinstance(src_rank, bool) or not isinstance(src_rank, numbers.Integral):
        raise TypeError(f"src_rank must be an int, got {type(src_rank).__name__} {src_rank!r}")
    if not 0 <= src_rank < layout.num_ranks:
        raise ValueError(f"src_rank={src_rank} is outside [0, {layout.num_ranks - 1}] for {layout}")
    src_rank = int(src_rank)
    _check_topk_ids(topk_ids, num_experts, check_values)
    if check_values:
        _check_plan_fits(plan, loads)  # check_plan checks the load matrix too
    else:
        check_load_matrix(loads, layout, check_values=False)
    loads = loads.to(torch.int64)
    flat = topk_ids.reshape(-1).to(torch.int64)
    if check_values:
        counted = count_local_load(topk_ids, num_experts, check_values=False)
        if not torch.equal(counted, loads[src_rank]):
            expert = int(torch.nonzero(counted != loads[src_rank])[0])
            raise ValueError(
                f"loads[{src_rank}, {expert}] = {int(loads[src_rank, expert])} but topk_ids on rank {src_rank} "
                f"hold {int(counted[expert])} assignments of expert {expert}; build the load matrix from "
                "count_local_load(topk_ids) on every rank"
            )

    # Step 1: per expert, this rank's count for each instance, local instance first.
    counts = source_quota(plan, loads, check_values=False)[src_rank]  # [num_slots]
    table = plan.logical_to_physical()  # [num_experts, max_instances]
    table_slot = table.clamp(min=0)
    is_local = (table >= 0) & (layout.slot_rank(table_slot) == src_rank)
    table_count = torch.where(table >= 0, counts[table_slot], 0)
    local_count = torch.where(is_local, table_count, 0).sum(dim=1)  # [num_experts]
    # Ends of the remote instances' ranges among this rank's assignments of the expert: the local
    # instance's range is [0, local_count), the others follow in table order.
    remote_end = local_count[:, None] + torch.where(is_local, 0, table_count).cumsum(dim=1)  # [num_experts, max_instances]

    # Step 2: rank of each assignment among this rank's assignments of the same expert (token order).
    bins = torch.where(flat >= 0, flat, num_experts)
    sorted_bins, order = torch.sort(bins, stable=True)
    bin_counts = torch.bincount(bins, minlength=num_experts + 1)
    bin_start = bin_counts.cumsum(0) - bin_counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - bin_start[sorted_bins]

    # Step 3: pick the instance whose range holds the position: local range first, then the first
    # remote instance whose end exceeds the position. Rows are searched as one sorted line by
    # offsetting row e by e * stride.
    # Ends never exceed this rank's assignment count, so rows cannot overlap.
    stride = flat.numel() + 1
    expert = bins.clamp(max=num_experts - 1)
    remote_line = (remote_end + torch.arange(num_experts, device=flat.device)[:, None] * stride).reshape(-1)
    remote_line = torch.where((table >= 0) & ~is_local, remote_line.view(num_experts, -1), -1)
    # Masked entries must keep the line sorted: repeat the previous end instead of -1.
    remote_line = torch.cummax(remote_line.reshape(-1), dim=0).values
    index = torch.searchsorted(remote_line, expert * stride + position, right=True)
    index = index.clamp(max=table.numel() - 1)
    remote_slot = table.reshape(-1)[index]
    local_slot = torch.where(is_local, table, -1).max(dim=1).values  # [num_experts], -1 if none
    use_local = position < local_count[expert]
    slot = torch.where(use_local, local_slot[expert], remote_slot)
    return torch.where(flat >= 0, slot, -1).view(topk_ids.shape)
