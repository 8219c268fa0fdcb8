"""Triton sparse reroute: logical ``topk_ids`` to physical slot ids that meet the plan's quotas exactly.

Reference: :func:`ultraep.reroute.reroute` with :func:`ultraep.reroute.source_quota`. Two launches,
identical results bit for bit:

1. ``_reroute_prepare_kernel``. Programs ``0 .. num_blocks-1`` count the assignments of one token
   block per expert (no atomics: each writes its own row). The remaining programs build this rank's
   lookup lists, one tile of experts each. A list starts with the local instance and continues with
   the other instances in table order (master, then replicas by rank). Each entry stores the end of
   the instance's range among this rank's assignments of the expert.
2. ``_reroute_assign_kernel``. Each program ranks its block's assignments among the earlier
   assignments of the same expert (counts of earlier blocks plus a stable in-block rank, so the
   result depends only on token order) and picks the first instance whose range end exceeds it.

The split of quotas over source ranks uses dense ``[num_ranks, experts]`` tiles: a valid plan holds at
most one instance of an expert per rank, so table order (master first, then ascending slot id) is the
master's rank first, then the other ranks in ascending order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ultraep.kernels.plan import _sort_rows
from ultraep.plan import Plan

__all__ = ["reroute_triton"]

# Range end stored after an expert's last instance; above any position.
_NO_INSTANCE_END = tl.constexpr(2**62)


@triton.jit
def _reroute_prepare_kernel(
    topk_ids_ptr,  # [num_assignments] flat topk_ids, any integer dtype; -1 = unused
    block_counts_ptr,  # [num_blocks, NUM_BINS] int32 out: assignments per expert in each token block
    loads_ptr,  # [NUM_RANKS, NUM_EXPERTS] int64, contiguous: the load matrix the plan was made from
    replica_ptr,  # [NUM_RANKS, SLOTS] int64: plan.replica_expert_ids, -1 = empty
    quota_ptr,  # [NUM_RANKS * (EXPERTS_PER_RANK + SLOTS)] int64: plan.quota
    range_end_ptr,  # [NUM_EXPERTS, WIDTH] int64 out: end of each listed instance's range, then _NO_INSTANCE_END
    range_slot_ptr,  # [NUM_EXPERTS, WIDTH] int32 out: physical slot id of each listed instance, then -1
    num_assignments,  # num_tokens * topk
    num_blocks,  # programs that count token blocks; the rest build lookup lists
    src_rank,  # this rank's index in the EP group
    NUM_RANKS: tl.constexpr,
    EXPERTS_PER_RANK: tl.constexpr,
    SLOTS: tl.constexpr,
    NUM_BINS: tl.constexpr,  # NUM_EXPERTS + 1 rounded up to a power of two; bin NUM_EXPERTS = unused
    BLOCK: tl.constexpr,  # assignments per token block
    R_P2: tl.constexpr,  # ranks, padded to a power of two (>= WIDTH)
    EXPERT_TILE: tl.constexpr,  # experts per lookup-list program; tiles are [R_P2, EXPERT_TILE]
    WIDTH: tl.constexpr,  # lookup list length: max instances per expert, padded to a power of two
):
    NUM_EXPERTS: tl.constexpr = NUM_RANKS * EXPERTS_PER_RANK
    SLOTS_PER_RANK: tl.constexpr = EXPERTS_PER_RANK + SLOTS
    pid = tl.program_id(0)
    if pid < num_blocks:
        # Step 1a: per-expert counts of one token block.
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < num_assignments
        ids = tl.load(topk_ids_ptr + offsets, mask=in_range, other=-1)
        valid = in_range & (ids >= 0) & (ids < NUM_EXPERTS)
        expert = tl.where(valid, ids, NUM_EXPERTS).to(tl.int32)
        bins = tl.arange(0, NUM_BINS)
        tl.store(block_counts_ptr + pid * NUM_BINS + bins, tl.histogram(expert, NUM_BINS))
    else:
        # Step 1b: lookup lists for a tile of experts. Rows are ranks, columns experts.
        ranks = tl.arange(0, R_P2)[:, None]  # [R_P2, 1]
        experts = (pid - num_blocks) * EXPERT_TILE + tl.arange(0, EXPERT_TILE)[None, :]  # [1, EXPERT_TILE]
        rank_ok = ranks < NUM_RANKS
        expert_ok = experts < NUM_EXPERTS
        tile_ok = rank_ok & expert_ok
        load = tl.load(loads_ptr + ranks * NUM_EXPERTS + experts, mask=tile_ok, other=0).to(tl.int64)

        # Instance of each expert on each rank: the master on its master rank, and a replica where a
        # redundant slot contains the expert.
        master_rank = experts // EXPERTS_PER_RANK
        master_slot = master_rank * SLOTS_PER_RANK + (experts - master_rank * EXPERTS_PER_RANK)  # [1, EXPERT_TILE]
        is_master = tile_ok & (ranks == master_rank)
        master_quota = tl.load(quota_ptr + master_slot, mask=expert_ok, other=0)
        has = is_master
        instance_quota = tl.where(is_master, master_quota, 0)  # [R_P2, EXPERT_TILE]
        slot = tl.where(is_master, master_slot, -1)
        for k in tl.static_range(SLOTS):
            replica_expert = tl.load(replica_ptr + ranks * SLOTS + k, mask=rank_ok, other=-1)  # [R_P2, 1]
            replica_slot = ranks * SLOTS_PER_RANK + EXPERTS_PER_RANK + k
            replica_quota = tl.load(quota_ptr + replica_slot, mask=rank_ok, other=0)
            hit = tile_ok & (replica_expert == experts)
            has = has | hit
            instance_quota = tl.where(hit, replica_quota, instance_quota)
            slot = tl.where(hit, replica_slot, slot)

        # Step 2: split each instance's quota over source ranks (source_quota, row src_rank). Local
        # assignments go first. The rest of the expert's load, by source rank, then fills the rest
        # of its instances' quotas in table order (master first, then by rank).
        is_src = ranks == src_rank
        local_take = tl.where(has, tl.minimum(instance_quota, load), 0)
        rest_load = load - local_take
        load_start = tl.sum(tl.where(ranks < src_rank, rest_load, 0), axis=0)  # [EXPERT_TILE]
        load_end = load_start + tl.sum(tl.where(is_src, rest_load, 0), axis=0)
        rest_quota = tl.where(has, instance_quota - local_take, 0)
        master_rest = tl.sum(tl.where(is_master, rest_quota, 0), axis=0)  # [EXPERT_TILE]
        other_rest = tl.where(is_master, 0, rest_quota)
        quota_start = tl.where(is_master, 0, master_rest[None, :] + tl.cumsum(other_rest, axis=0) - other_rest)
        overlap = tl.minimum(load_end[None, :], quota_start + rest_quota) - tl.maximum(load_start[None, :], quota_start)
        count = tl.where(has, tl.maximum(overlap, 0), 0) + tl.where(has & is_src, local_take, 0)  # this rank's share

        # Step 3: lookup list: the local instance first, then the others in table order.
        is_local = has & is_src
        remote_master = has & is_master & (ranks != src_rank)
        remote_other = has & (ranks != src_rank) & (ranks != master_rank)
        num_local = tl.sum(is_local.to(tl.int32), axis=0)  # [EXPERT_TILE]: 0 or 1
        local_count = tl.sum(tl.where(is_local, count, 0), axis=0)
        num_remote_master = tl.sum(remote_master.to(tl.int32), axis=0)
        remote_master_count = tl.sum(tl.where(remote_master, count, 0), axis=0)
        other_n = remote_other.to(tl.int32)
        other_count = tl.where(remote_other, count, 0)
        other_idx = (num_local + num_remote_master)[None, :] + tl.cumsum(other_n, axis=0) - other_n
        list_idx = tl.where(is_local, 0, tl.where(is_master, num_local[None, :], other_idx))
        other_end = (local_count + remote_master_count)[None, :] + tl.cumsum(other_count, axis=0)
        range_end = tl.where(is_local, local_count[None, :], tl.where(is_master, local_count[None, :] + count, other_end))
        row = experts * WIDTH  # [1, EXPERT_TILE]
        tl.store(range_end_ptr + row + list_idx, range_end, mask=has)
        tl.store(range_slot_ptr + row + list_idx, slot.to(tl.int32), mask=has)
        # Entries past the last instance: ranks index list positions here (WIDTH <= R_P2).
        num_instances = tl.sum(has.to(tl.int32), axis=0)
        pad = expert_ok & (ranks >= num_instances[None, :]) & (ranks < WIDTH)
        tl.store(range_end_ptr + row + ranks, tl.zeros([R_P2, EXPERT_TILE], tl.int64) + _NO_INSTANCE_END, mask=pad)
        tl.store(range_slot_ptr + row + ranks, tl.full([R_P2, EXPERT_TILE], -1, tl.int32), mask=pad)


@triton.jit
def _reroute_assign_kernel(
    topk_ids_ptr,  # [num_assignments] flat topk_ids, any integer dtype; -1 = unused
    block_counts_ptr,  # [num_blocks, NUM_BINS] int32: per-block expert counts from the prepare kernel
    range_end_ptr,  # [NUM_EXPERTS, WIDTH] int64: lookup lists from the prepare kernel
    range_slot_ptr,  # [NUM_EXPERTS, WIDTH] int32
    out_ptr,  # [num_assignments] int64 out: physical slot id per assignment, -1 = unused
    num_assignments,
    NUM_EXPERTS: tl.constexpr,
    NUM_BINS: tl.constexpr,
    BLOCK: tl.constexpr,  # assignments per program, as in the prepare kernel
    LOG_BLOCK: tl.constexpr,
    PREFIX_ROWS: tl.constexpr,  # earlier blocks' count rows summed per step
    WIDTH: tl.constexpr,
    LOG_WIDTH: tl.constexpr,
    INTERPRETED: tl.constexpr,  # running under TRITON_INTERPRET=1 (selects the sort; same results)
):
    pid = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    offsets = pid.to(tl.int64) * BLOCK + idx
    in_range = offsets < num_assignments
    ids = tl.load(topk_ids_ptr + offsets, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < NUM_EXPERTS)
    expert = tl.where(valid, ids, NUM_EXPERTS).to(tl.int32)  # [BLOCK]; bin NUM_EXPERTS = unused

    # Step 1: assignments of each expert in earlier blocks.
    bins = tl.arange(0, NUM_BINS)
    prefix_rows = tl.arange(0, PREFIX_ROWS)
    before = tl.zeros([NUM_BINS], tl.int32)
    for row0 in range(0, pid, PREFIX_ROWS):
        rows = row0 + prefix_rows
        tile = tl.load(block_counts_ptr + rows[:, None] * NUM_BINS + bins[None, :], mask=(rows < pid)[:, None], other=0)
        before += tl.sum(tile, axis=0)

    # Step 2: stable rank within the block. Sorting expert * BLOCK + index groups each expert's
    # assignments in token order, so subtracting the group start gives the rank. A second sort,
    # keyed by the original index, brings the ranks back to token order.
    key = tl.reshape(expert * BLOCK + idx, [1, BLOCK])
    sorted_key = tl.reshape(_sort_rows(key, LOG_BLOCK, False, INTERPRETED), [BLOCK])
    sorted_expert = sorted_key // BLOCK
    block_counts = tl.histogram(expert, NUM_BINS)  # [NUM_BINS]
    group_start = tl.cumsum(block_counts, 0) - block_counts
    sorted_rank = idx - tl.gather(group_start, sorted_expert, 0)
    back = tl.reshape((sorted_key % BLOCK) * BLOCK + sorted_rank, [1, BLOCK])
    rank_in_block = tl.reshape(_sort_rows(back, LOG_BLOCK, False, INTERPRETED), [BLOCK]) % BLOCK
    position = tl.gather(before, expert, 0) + rank_in_block  # [BLOCK]: rank among this rank's assignments of the expert

    # Step 3: first listed instance whose range end exceeds the position (binary lifting over WIDTH).
    row = tl.where(valid, expert, 0).to(tl.int64) * WIDTH
    found = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(LOG_WIDTH + 1):
        candidate = found + (WIDTH >> i)
        end = tl.load(range_end_ptr + row + tl.minimum(candidate - 1, WIDTH - 1), mask=valid, other=_NO_INSTANCE_END)
        found = tl.where((candidate <= WIDTH) & (end <= position), candidate, found)
    slot = tl.load(range_slot_ptr + row + tl.minimum(found, WIDTH - 1), mask=valid, other=-1)
    tl.store(out_ptr + offsets, tl.where(valid, slot, -1).to(tl.int64), mask=in_range)


def _pow2(value: int) -> int:
    return triton.next_power_of_2(max(1, value))


def _check_tile(name: str, value: int | None) -> None:
    if value is not None and (value < 1 or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= 1, got {value}")


def reroute_triton(
    topk_ids: torch.Tensor,
    plan: Plan,
    loads: torch.Tensor,
    src_rank: int,
    *,
    block_size: int | None = None,
    expert_tile: int | None = None,
) -> torch.Tensor:
    """Map this rank's logical expert ids to physical slot ids with two kernel launches.

    topk_ids: [num_tokens, topk] integer tensor on ``src_rank``, on a CUDA device (or on the CPU under
      ``TRITON_INTERPRET=1``). Logical expert per assignment; -1 = unused. Ids outside
      [-1, num_experts) come back as -1.
    plan: the plan made from ``loads``, on the same device; it must satisfy ``check_plan``.
    loads: [num_ranks, num_experts] integer tensor, same device. Row ``src_rank`` must equal
      ``count_local_load(topk_ids)`` (not checked here; otherwise some assignments come back as -1).
    src_rank: this rank's index in the EP group.
    block_size, expert_tile: assignments per token block and experts per lookup-list program (powers
      of two); ``None`` picks them from the shapes. The result does not depend on them.
    Returns [num_tokens, topk] int64 physical slot ids on the same device, equal to
    ``ultraep.reroute.reroute(topk_ids, plan, loads, src_rank)``. Reads nothing back to the host, so
    the call can be captured in a CUDA graph.
    """
    _check_tile("block_size", block_size)
    _check_tile("expert_tile", expert_tile)
    layout = plan.layout
    device = topk_ids.device
    num_experts = layout.num_experts
    flat = topk_ids.reshape(-1)  # [num_tokens * topk]; a view unless topk_ids is strided
    num_assignments = flat.numel()
    num_bins = _pow2(num_experts + 1)
    r_p2 = _pow2(layout.num_ranks)
    width = _pow2(layout.max_instances)

    # Token blocks: about 64 of them with 256 to 2048 assignments each, so the per-block prefix
    # (program b reads b count rows) stays small. Lookup-list tiles hold about 1024 entries.
    # NOTE: both limits keep ptxas for sm_90 free of spills; they are not tuned by timings.
    # The interpreter pays per program, so it takes blocks of up to 1024 assignments (the largest
    # its sort helper handles by counting) and one expert tile.
    if block_size is None:
        target_blocks = 1 if RUNS_IN_INTERPRETER else 64
        block_size = min(1024 if RUNS_IN_INTERPRETER else 2048, max(256, _pow2(triton.cdiv(num_assignments, target_blocks))))
    if expert_tile is None:
        expert_tile = _pow2(num_experts) if RUNS_IN_INTERPRETER else max(1, min(_pow2(num_experts), 1024 // r_p2))
    block = block_size
    num_blocks = max(1, triton.cdiv(num_assignments, block))
    num_tiles = triton.cdiv(num_experts, expert_tile)

    loads = loads.to(torch.int64).contiguous()
    replica_expert_ids = plan.replica_expert_ids.to(torch.int64).contiguous()
    quota = plan.quota.to(torch.int64).contiguous()
    block_counts = torch.empty((num_blocks, num_bins), dtype=torch.int32, device=device)
    range_end = torch.empty((num_experts, width), dtype=torch.int64, device=device)
    range_slot = torch.empty((num_experts, width), dtype=torch.int32, device=device)
    out = torch.empty(num_assignments, dtype=torch.int64, device=device)

    _reroute_prepare_kernel[(num_blocks + num_tiles,)](
        flat,
        block_counts,
        loads,
        replica_expert_ids,
        quota,
        range_end,
        range_slot,
        num_assignments,
        num_blocks,
        src_rank,
        NUM_RANKS=layout.num_ranks,
        EXPERTS_PER_RANK=layout.experts_per_rank,
        SLOTS=layout.redundant_slots_per_rank,
        NUM_BINS=num_bins,
        BLOCK=block,
        R_P2=r_p2,
        EXPERT_TILE=expert_tile,
        WIDTH=width,
        num_warps=4,
    )
    _reroute_assign_kernel[(num_blocks,)](
        flat,
        block_counts,
        range_end,
        range_slot,
        out,
        num_assignments,
        NUM_EXPERTS=num_experts,
        NUM_BINS=num_bins,
        BLOCK=block,
        LOG_BLOCK=block.bit_length() - 1,
        PREFIX_ROWS=max(1, min(_pow2(num_blocks), 8192 // num_bins)),
        WIDTH=width,
        LOG_WIDTH=width.bit_length() - 1,
        INTERPRETED=RUNS_IN_INTERPRETER,
        num_warps=8 if block > 1024 else 4,
    )
    return out.view(topk_ids.shape)


RUNS_IN_INTERPRETER = isinstance(_reroute_assign_kernel, InterpretedFunction)
"""True when ``TRITON_INTERPRET=1`` was set before Triton was imported: kernels then run on CPU tensors."""
