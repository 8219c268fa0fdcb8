"""Triton quota planner: the whole threshold ladder, every matching round and the choice of plan in one launch.

Reference: :func:`ultraep.planners.quota.plan_reference` (``_match_rounds``, ``_select_candidate``,
``_local_assignments``). The kernel gives the same plan bit for bit.

The reference tries every (donor drain, receiver order, receiver anchor, threshold) combination as a
candidate, and then the best-fit receivers on their own thresholds. Each program of the launch runs a
tile of ``T_P2`` thresholds of one family (drain, order and anchor, or best fit) side by side, as the
reference batches them:
its tensors are ``[T_P2, ...]`` with every dim padded to a power of two. Padded ranks carry no load
and no spare, padded master slots carry quota 0, and padded candidates are never chosen. Each
program writes its candidates' scores and state to scratch and takes a ticket from an atomic
counter. The program that draws the last ticket picks the best candidate and writes the plan, so
the launch needs no second kernel and no host round trip.

Where the reference uses ``torch.sort(...).indices``, the kernel sorts the same unique keys
(``value * width + tiebreak``) and decodes the index from the key, so both orders agree. Scatters
become gathers through inverse permutations, and searchsorted becomes a binary search over
``tl.gather``. All arithmetic is int64 on non-negative values, so truncating and floor division agree.

Outputs match the reference on load matrices that pass ``check_load_matrix(check_values=True)``
(non-negative, total at most ``MAX_TOTAL_LOAD``); other inputs give unspecified plans.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners.base import masters_only_plan
from ultraep.planners.quota import (
    _ANCHORS,
    _BEST_FIT_STEPS_Q,
    _FRACTION_SCALE,
    _COSTED_PEAK_LIMIT,
    _GAP_STEPS_Q,
    _MEAN_STEPS_Q,
    _BY_MASTER_QUOTA,
    _OVER_DRAIN_Q,
    _RECEIVER_ORDERS,
    _ROTATION_ANCHORS,
    QuotaConfig,
    _num_drains,
    _num_rotations,
    _to_fixed_point,
    default_num_rounds,
    relay_send_table,
    _relay_units,
)

__all__ = ["plan_quota_triton"]

# Sentinel above any load, quota or count the kernel compares (all stay below 2**62).
_BIG = tl.constexpr(2**62)
# Words per candidate in the summary scratch (see the kernel's summary_ptr).
SUMMARY_WORDS = tl.constexpr(5)
COSTED_PEAK_LIMIT = tl.constexpr(_COSTED_PEAK_LIMIT)
BY_MASTER_QUOTA = tl.constexpr(_BY_MASTER_QUOTA)


@triton.jit
def _count_not_above(sorted_values, probes, LENGTH: tl.constexpr, LOG_LENGTH: tl.constexpr):
    """Count, per probe, the entries of its row of ``sorted_values`` that are ``<= probe``.

    sorted_values: [rows, LENGTH], non-decreasing along dim 1. probes: [rows, num_probes].
    Returns [rows, num_probes] int32 in [0, LENGTH]: searchsorted(..., right=True) by binary lifting.
    """
    count = tl.zeros(probes.shape, tl.int32)
    for i in tl.static_range(LOG_LENGTH + 1):
        candidate = count + (LENGTH >> i)
        value = tl.gather(sorted_values, tl.minimum(candidate - 1, LENGTH - 1), 1)
        count = tl.where((candidate <= LENGTH) & (value <= probes), candidate, count)
    return count


@triton.jit
def _sort_rows(x, LOG_N: tl.constexpr, DESCENDING: tl.constexpr, INTERPRETED: tl.constexpr):
    """Sort each row of ``x`` ([rows, 2**LOG_N], integer) along dim 1.

    Compiled kernels use ``tl.sort``. The interpreter runs ``tl.sort``'s reductions one element at a
    time, so there rows are sorted by counting (small tiles) or by a bitonic network of ``tl.gather``
    exchanges. A sorted row is unique, so every path gives the same result.
    """
    N: tl.constexpr = 2**LOG_N
    if not INTERPRETED:
        x = tl.sort(x, dim=1, descending=DESCENDING)
    elif x.shape[0] * N * N <= 2**20:
        # Position of each entry = entries that sort before it (ties by index); then select by position.
        i_idx = tl.arange(0, N)[None, :, None]
        j_idx = tl.arange(0, N)[None, None, :]
        x_i = x[:, :, None]
        x_j = x[:, None, :]
        if DESCENDING:
            before = (x_j > x_i) | ((x_j == x_i) & (j_idx < i_idx))
        else:
            before = (x_j < x_i) | ((x_j == x_i) & (j_idx < i_idx))
        position = tl.sum(before.to(tl.int32), axis=2)  # [rows, N]
        x = tl.sum(tl.where(position[:, None, :] == i_idx, x_j, 0), axis=2)
    else:
        idx = tl.broadcast_to(tl.arange(0, N)[None, :], x.shape)
        for k in tl.static_range(1, LOG_N + 1):
            # Blocks of 2**k entries alternate direction by bit k of the index; the last merge is one block.
            block_flip = (idx >> k) & 1 if k < LOG_N else idx * 0
            for step in tl.static_range(k):
                j: tl.constexpr = k - 1 - step
                partner = tl.gather(x, idx ^ (1 << j), 1)
                keep_larger = (((idx >> j) & 1) ^ block_flip ^ DESCENDING) == 1
                x = tl.where((x < partner) == keep_larger, partner, x)
    return x


@triton.jit
def _best_fit_choice(
    rank_load,  # [T_P2, R_P2] int64
    threshold_col,  # [T_P2, 1] int64
    master_quota,  # [T_P2, R_P2, M_P2] int64, drain order
    recv_spare,  # [T_P2, R_P2] int64, receiver line order
    min_quota,
    flat_position,  # [T_P2, R_P2, M_P2]: drain position r * M_P2 + p
    line_idx,  # [1, R_P2]
    T_P2: tl.constexpr,
    R_P2: tl.constexpr,
    Q_P2: tl.constexpr,
    LOG_R: tl.constexpr,
    LOG_Q: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Return one best-fit round (reference: _best_fit_round) in receiver line order.

    The bins are the donors' masters that still hold quota, sorted by quota, then drain position.
    Each receiver takes the first bin whose quota covers its spare, or the fullest bin when none does.
    A bin serves its receivers in line order with whole spares while they fit. When the first one's
    spare does not fit, it takes the whole bin. Returns (drain position [T_P2, R_P2] int32, amount
    [T_P2, R_P2] int64, and the keys bin * R_P2 + line index of the receivers sorted ascending,
    [T_P2, R_P2] int64 with _BIG for receivers without a bin).
    """
    donor = (rank_load > threshold_col)[:, :, None]
    bin_key = tl.where(donor & (master_quota > 0), master_quota * Q_P2 + flat_position, _BIG)
    bin_key = _sort_rows(tl.reshape(bin_key, [T_P2, Q_P2]), LOG_Q, False, INTERPRETED)  # [T_P2, Q_P2] ascending
    num_bins = tl.sum((bin_key < _BIG).to(tl.int32), axis=1)[:, None]  # [T_P2, 1]
    first_fit = _count_not_above(bin_key, recv_spare * Q_P2 - 1, Q_P2, LOG_Q)  # bins whose quota is below the spare
    pick = tl.maximum(tl.where(first_fit < num_bins, first_fit, num_bins - 1), 0)
    fit_key = tl.gather(bin_key, pick, 1)  # [T_P2, R_P2]
    active = (recv_spare > 0) & (num_bins > 0)
    position = tl.where(active, fit_key % Q_P2, 0).to(tl.int32)
    bin_quota = tl.where(active, fit_key // Q_P2, 0)
    offered = tl.where(active, recv_spare, 0)
    before, bin_line_sorted = _offered_before_in_bin(position, active, offered, line_idx, R_P2, LOG_R, INTERPRETED)
    amount = tl.where(before == 0, tl.minimum(offered, bin_quota), tl.where(before + offered <= bin_quota, offered, 0))
    amount = tl.where(amount >= min_quota, amount, 0)
    return position, amount, bin_line_sorted


@triton.jit
def _offered_before_in_bin(position, active, offered, line_idx, R_P2: tl.constexpr, LOG_R: tl.constexpr, INTERPRETED: tl.constexpr):
    """Return (before, bin_line_sorted) for receivers grouped by bin (drain position).

    before: [T_P2, R_P2] int64, what the active receivers before each one on the line offered to its
    bin. bin_line_sorted: [T_P2, R_P2] int64, the keys bin * R_P2 + line index sorted ascending, _BIG
    for inactive receivers; _sum_by_bin reads them.
    """
    bin_line_key = tl.where(active, position.to(tl.int64) * R_P2 + line_idx, _BIG)
    bin_line_sorted = _sort_rows(bin_line_key, LOG_R, False, INTERPRETED)  # [T_P2, R_P2]
    sorted_line = (bin_line_sorted % R_P2).to(tl.int32)
    offered_through = tl.cumsum(tl.where(bin_line_sorted < _BIG, tl.gather(offered, sorted_line, 1), 0), axis=1)
    sorted_index = _count_not_above(bin_line_sorted, bin_line_key - 1, R_P2, LOG_R)  # receivers sorted before
    group_index = _count_not_above(bin_line_sorted, position.to(tl.int64) * R_P2 - 1, R_P2, LOG_R)
    through_before = tl.where(sorted_index > 0, tl.gather(offered_through, tl.maximum(sorted_index - 1, 0), 1), 0)
    group_before = tl.where(group_index > 0, tl.gather(offered_through, tl.maximum(group_index - 1, 0), 1), 0)
    return through_before - group_before, bin_line_sorted


@triton.jit
def _resident_choice(
    rank_load,  # [T_P2, R_P2] int64
    threshold_col,  # [T_P2, 1] int64
    master_quota,  # [T_P2, R_P2, M_P2] int64, drain order
    recv_spare,  # [T_P2, R_P2] int64, receiver line order
    held_position,  # [T_P2, R_P2] int32, receiver line order: drain position of this round's resident expert, -1 = none
    min_quota,
    line_idx,  # [1, R_P2]
    T_P2: tl.constexpr,
    R_P2: tl.constexpr,
    M_P2: tl.constexpr,
    Q_P2: tl.constexpr,
    LOG_R: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Return one resident round (reference: _resident_round) in receiver line order, as _best_fit_choice does.

    A receiver with spare takes up to its spare from the master of its resident expert when that
    master's rank lies above the threshold and the master has quota left. The receivers of one master
    draw on it in line order.
    """
    safe_position = tl.maximum(held_position, 0)  # a valid index where the receiver has no resident expert
    donor = tl.gather(rank_load, safe_position // M_P2, 1) > threshold_col
    quota_left = tl.gather(tl.reshape(master_quota, [T_P2, Q_P2]), safe_position, 1)
    active = (held_position >= 0) & donor & (quota_left > 0) & (recv_spare > 0)
    position = tl.where(active, safe_position, 0).to(tl.int32)
    offered = tl.where(active, recv_spare, 0)
    before, bin_line_sorted = _offered_before_in_bin(position, active, offered, line_idx, R_P2, LOG_R, INTERPRETED)
    amount = tl.minimum(offered, tl.maximum(quota_left - before, 0))
    amount = tl.where(amount >= min_quota, amount, 0)
    return position, amount, bin_line_sorted


@triton.jit
def _sum_by_bin(bin_line_sorted, values, T_P2: tl.constexpr, R_P2: tl.constexpr, Q_P2: tl.constexpr, LOG_R: tl.constexpr):
    """Return [T_P2, Q_P2] int64: per drain position, the sum of ``values`` ([T_P2, R_P2], receiver line
    order) over the receivers whose keys in ``bin_line_sorted`` (from _best_fit_choice) name that bin."""
    sorted_line = (bin_line_sorted % R_P2).to(tl.int32)
    through = tl.cumsum(tl.where(bin_line_sorted < _BIG, tl.gather(values, sorted_line, 1), 0), axis=1)
    probe = tl.broadcast_to(tl.arange(0, Q_P2)[None, :].to(tl.int64) * R_P2, [T_P2, Q_P2])
    first = _count_not_above(bin_line_sorted, probe - 1, R_P2, LOG_R)  # [T_P2, Q_P2]
    end = _count_not_above(bin_line_sorted, probe + (R_P2 - 1), R_P2, LOG_R)
    upto_end = tl.where(end > 0, tl.gather(through, tl.maximum(end - 1, 0), 1), 0)
    upto_first = tl.where(first > 0, tl.gather(through, tl.maximum(first - 1, 0), 1), 0)
    return upto_end - upto_first


@triton.jit
def _quota_plan_kernel(
    loads_ptr,  # [NUM_RANKS, NUM_RANKS * EXPERTS_PER_RANK] int64, contiguous: the load matrix
    replica_out_ptr,  # [NUM_RANKS, SLOTS] int64 out: logical expert of each redundant slot, -1 = empty
    quota_out_ptr,  # [NUM_RANKS * (EXPERTS_PER_RANK + SLOTS)] int64 out: quota of each physical slot
    summary_ptr,  # [NUM_PROGRAMS * T_P2, SUMMARY_WORDS] int64 scratch: compared peak, replicas, local
    # assignments, max rank load and threshold
    master_scratch_ptr,  # [NUM_PROGRAMS * T_P2, R_P2 * M_P2] int64 scratch: master quotas in drain order
    slot_expert_scratch_ptr,  # [NUM_PROGRAMS * T_P2, R_P2 * S_P2] int32 scratch: expert per redundant slot
    slot_quota_scratch_ptr,  # [NUM_PROGRAMS * T_P2, R_P2 * S_P2] int64 scratch: quota per redundant slot
    ticket_ptr,  # [1] int32, zero on entry: programs that have finished their candidates
    send_table_ptr,  # [NUM_RANKS + 1] int64: relay_send_table(NUM_RANKS, relay_chunks), read with COPY_AWARE
    resident_ptr,  # [NUM_RANKS, SLOTS] int64: logical expert resident in each redundant slot, -1 = none; read with HAS_RESIDENT
    min_replica_quota,  # QuotaConfig.min_replica_quota
    fraction_q,  # QuotaConfig.min_replica_fraction in units of 1 / FRACTION_SCALE
    target_q,  # QuotaConfig.balance_target in units of 1 / FRACTION_SCALE
    num_rounds,  # matching rounds per threshold
    copy_cost,  # QuotaConfig.copy_cost (> 0 only with COPY_AWARE)
    copy_overlap,  # QuotaConfig.copy_overlap as 0 or 1
    copy_chunks,  # QuotaConfig.copy_chunks
    gemm_passes,  # QuotaConfig.gemm_passes
    relay_chunks,  # chunk times per copy in the send table: QuotaConfig.relay_chunks, or 1 for direct copies
    NUM_RANKS: tl.constexpr,
    EXPERTS_PER_RANK: tl.constexpr,
    SLOTS: tl.constexpr,  # redundant slots per rank (>= 1)
    STEPS: tl.constexpr,  # threshold ladder: mean steps, then gap steps, in units of 1 / FRACTION_SCALE
    NUM_MEAN_STEPS: tl.constexpr,
    BEST_FIT_STEPS: tl.constexpr,  # the best-fit family's thresholds, in units of 1 / FRACTION_SCALE of the mean
    ANCHORS: tl.constexpr,  # receiver anchors in quarters of the receiver's interval, or BY_MASTER_QUOTA
    RECEIVER_ORDERS: tl.constexpr,  # receiver orders tried with each anchor
    NUM_DRAINS: tl.constexpr,  # donor drains tried with each receiver family (1, or 2 with one slot)
    ROTATIONS: tl.constexpr,  # rotated receiver lines, rotations 1 .. ROTATIONS (0 for none), on the best-fit steps
    ROTATION_ANCHORS: tl.constexpr,  # anchors each rotation runs with
    OVER_DRAIN: tl.constexpr,  # what the second drain sheds beyond the excess, in 1 / FRACTION_SCALE of the mean
    FRACTION_SCALE: tl.constexpr,
    PREFER_LOCAL: tl.constexpr,
    STOP_AT_TARGET: tl.constexpr,  # QuotaConfig.stop_at_target
    T_P2: tl.constexpr,  # candidates per program: a tile of consecutive thresholds of one receiver family
    P_P2: tl.constexpr,  # programs (receiver families x threshold tiles), padded to a power of two
    R_P2: tl.constexpr,  # ranks, padded
    M_P2: tl.constexpr,  # master slots per rank, padded
    S_P2: tl.constexpr,  # redundant slots per rank, padded
    LOG_R: tl.constexpr,  # log2(R_P2)
    LOG_M: tl.constexpr,  # log2(M_P2)
    LOG_Q: tl.constexpr,  # log2(R_P2 * M_P2)
    SRC_BLOCK: tl.constexpr,  # source ranks summed per step while reading the load matrix
    INTERPRETED: tl.constexpr,  # running under TRITON_INTERPRET=1 (selects the sort; same results)
    COPY_AWARE: tl.constexpr,  # copy_cost > 0: candidates are compared with the weight sync counted
    HAS_RESIDENT: tl.constexpr,  # a resident table is given: its family runs, and resident replicas need no copy
):
    NUM_EXPERTS: tl.constexpr = NUM_RANKS * EXPERTS_PER_RANK
    NUM_THRESHOLDS: tl.constexpr = len(STEPS)
    NUM_ANCHORS: tl.constexpr = len(ANCHORS)
    NUM_BEST_FIT: tl.constexpr = len(BEST_FIT_STEPS)
    MAX_STEPS: tl.constexpr = NUM_THRESHOLDS if NUM_THRESHOLDS > NUM_BEST_FIT else NUM_BEST_FIT
    NUM_TILES: tl.constexpr = (MAX_STEPS + T_P2 - 1) // T_P2  # threshold tiles per family
    # A receiver family is (order, anchor): order 0 takes receivers most spare first, order 1 least first.
    # Each runs with every donor drain, so a family here is (drain, order, anchor). The best-fit
    # receivers are one more family, then one family per (rotation, rotation anchor).
    RECEIVER_FAMILIES: tl.constexpr = RECEIVER_ORDERS * NUM_ANCHORS
    BEST_FIT_FAMILY: tl.constexpr = NUM_DRAINS * RECEIVER_FAMILIES
    NUM_ROTATION_ANCHORS: tl.constexpr = len(ROTATION_ANCHORS)
    ROTATION_FAMILY: tl.constexpr = BEST_FIT_FAMILY + 1  # the first rotated family
    # With a resident table its family comes last, on the first drain's ladder.
    RESIDENT_FAMILY: tl.constexpr = ROTATION_FAMILY + ROTATIONS * NUM_ROTATION_ANCHORS
    NUM_FAMILIES: tl.constexpr = RESIDENT_FAMILY + 1 if HAS_RESIDENT else RESIDENT_FAMILY
    NUM_PROGRAMS: tl.constexpr = NUM_FAMILIES * NUM_TILES
    Q_P2: tl.constexpr = R_P2 * M_P2  # length of the donor piece line (R_P2 donors x M_P2 masters)
    SLOTS_PER_RANK: tl.constexpr = EXPERTS_PER_RANK + SLOTS

    pid = tl.program_id(0)
    ranks = tl.arange(0, R_P2)  # [R_P2]
    local_idx = tl.arange(0, M_P2)  # [M_P2]
    slot_idx_range = tl.arange(0, S_P2)  # [S_P2]
    tile_idx = tl.arange(0, T_P2)  # [T_P2]: candidate within this program
    candidates = (pid % NUM_TILES) * T_P2 + tile_idx  # [T_P2]: threshold index of each candidate
    line_idx = tl.arange(0, R_P2)[None, :]  # [1, R_P2]: index along a donor or receiver line
    rank_ok = ranks < NUM_RANKS
    master_ok = rank_ok[:, None] & (local_idx[None, :] < EXPERTS_PER_RANK)  # [R_P2, M_P2]
    slot_ok = rank_ok[:, None] & (slot_idx_range[None, :] < SLOTS)  # [R_P2, S_P2]
    expert_ids = ranks[:, None] * EXPERTS_PER_RANK + local_idx[None, :]  # [R_P2, M_P2]

    # Step 1: expert loads (column sums), rank loads, thresholds and the minimum replica quota.
    src_rows = tl.arange(0, SRC_BLOCK)
    expert_load = tl.zeros([R_P2, M_P2], tl.int64)
    for src0 in range(0, NUM_RANKS, SRC_BLOCK):
        rows = src0 + src_rows  # [SRC_BLOCK]
        ptrs = loads_ptr + rows[:, None, None] * NUM_EXPERTS + expert_ids[None, :, :]  # [SRC_BLOCK, R_P2, M_P2]
        mask = (rows < NUM_RANKS)[:, None, None] & master_ok[None, :, :]
        expert_load += tl.sum(tl.load(ptrs, mask=mask, other=0).to(tl.int64), axis=0)
    master_rank_load = tl.sum(expert_load, axis=1)  # [R_P2]
    total = tl.sum(master_rank_load, axis=0)
    # Load floor (reference: _load_floor). A rank's capacity is its masters' load plus the SLOTS
    # largest experts of other ranks, taken one slot at a time by unique key.
    expert_key = tl.where(master_ok, expert_load * NUM_EXPERTS + (NUM_EXPERTS - 1 - expert_ids), -1)[None, :, :]
    other_rank = (ranks[:, None] != ranks[None, :])[:, :, None]  # [R_P2 (rank), R_P2 (owner), 1]
    counted_from = tl.full([R_P2], _BIG, tl.int64)  # keys at or above this are already counted
    extra = tl.zeros([R_P2], tl.int64)
    for _ in tl.static_range(SLOTS):
        candidate_key = tl.where(other_rank & (expert_key < counted_from[:, None, None]), expert_key, -1)
        counted_from = tl.max(tl.max(candidate_key, axis=2), axis=1)  # [R_P2]
        extra += tl.maximum(counted_from, 0) // NUM_EXPERTS
    capacity = master_rank_load + extra
    # The capacities below each rank's in ascending order (lower rank first on ties): their sum and count.
    before = rank_ok[None, :] & (
        (capacity[None, :] < capacity[:, None])
        | ((capacity[None, :] == capacity[:, None]) & (ranks[None, :] < ranks[:, None]))
    )  # [R_P2, R_P2]
    below = tl.sum(tl.where(before, capacity[None, :], 0), axis=1)
    rest = tl.maximum(NUM_RANKS - tl.sum(before.to(tl.int64), axis=1), 1)
    floor_load = tl.max(tl.where(rank_ok & (total > below), (total - below + rest - 1) // rest, 0), axis=0)
    max_load = tl.max(master_rank_load, axis=0)
    gap = tl.maximum(max_load - floor_load, 0)
    family = pid // NUM_TILES
    best_fit = family == BEST_FIT_FAMILY
    rotated = (family >= ROTATION_FAMILY) & (family < RESIDENT_FAMILY)
    resident_family = family == RESIDENT_FAMILY
    on_best_fit_steps = best_fit | rotated
    step_q = tl.zeros([T_P2], tl.int64)
    for i in tl.static_range(NUM_THRESHOLDS):
        step_q = tl.where((candidates == i) & ~on_best_fit_steps, STEPS[i], step_q)
    for i in tl.static_range(NUM_BEST_FIT):
        step_q = tl.where((candidates == i) & on_best_fit_steps, BEST_FIT_STEPS[i], step_q)
    mean_part = (total * step_q) // (NUM_RANKS * FRACTION_SCALE)
    gap_part = (gap * step_q) // FRACTION_SCALE
    on_mean = on_best_fit_steps | (candidates < NUM_MEAN_STEPS)
    thresholds = tl.minimum(floor_load + tl.where(on_mean, mean_part, gap_part), max_load)
    threshold_col = thresholds[:, None]  # [T_P2, 1]
    min_quota = tl.maximum((total * fraction_q) // (NUM_RANKS * FRACTION_SCALE), min_replica_quota)
    anchor = 0
    for i in tl.static_range(NUM_ANCHORS):
        anchor = tl.where(family % NUM_ANCHORS == i, ANCHORS[i], anchor)
    # After its resident rounds the resident family matches at the first anchor, most spare first.
    anchor = tl.where(resident_family, ANCHORS[0], anchor)
    # A rotated family moves the first `rotation` receivers of the most-spare-first line to its end.
    rotation = 0
    for i in tl.static_range(ROTATIONS * NUM_ROTATION_ANCHORS):
        anchor = tl.where(family == ROTATION_FAMILY + i, ROTATION_ANCHORS[i % NUM_ROTATION_ANCHORS], anchor)
        rotation = tl.where(family == ROTATION_FAMILY + i, i // NUM_ROTATION_ANCHORS + 1, rotation)
    least_spare_first = (family % RECEIVER_FAMILIES >= NUM_ANCHORS) & (family < BEST_FIT_FAMILY)
    # Assignments an over-draining donor sheds beyond its excess. The plain drain sheds none extra.
    plain_drain = best_fit | rotated | resident_family
    over_drain = tl.where((family >= RECEIVER_FAMILIES) & ~plain_drain, (total * OVER_DRAIN) // (NUM_RANKS * FRACTION_SCALE), 0)

    # Drain order: each donor drains its masters by descending load, lower local index first on
    # ties. Sorting the unique key load * m + (m - 1 - j) yields both the load and j.
    drain_key = tl.where(master_ok, expert_load * EXPERTS_PER_RANK + (EXPERTS_PER_RANK - 1 - local_idx)[None, :], -1)
    drain_key = _sort_rows(drain_key, LOG_M, True, INTERPRETED)  # [R_P2, M_P2]; padding (-1) sorts last
    drain_local = tl.where(master_ok, EXPERTS_PER_RANK - 1 - drain_key % EXPERTS_PER_RANK, 0)
    drain_expert = ranks[:, None] * EXPERTS_PER_RANK + drain_local  # [R_P2, M_P2]: logical expert at drain position
    initial_quota = tl.where(master_ok, drain_key // EXPERTS_PER_RANK, 0)  # expert loads in drain order
    # Resident replicas as drain positions, [R_P2, S_P2] int32, -1 = none.
    resident_pos = tl.full([R_P2, S_P2], -1, tl.int32)
    if HAS_RESIDENT:
        resident = tl.load(resident_ptr + ranks[:, None] * SLOTS + slot_idx_range[None, :], mask=slot_ok, other=-1)
        drain_flat = tl.reshape(tl.where(master_ok, drain_expert, -1), [Q_P2])
        position_flat = tl.arange(0, Q_P2)
        matches = (drain_flat[None, None, :] == resident[:, :, None]) & (resident[:, :, None] >= 0)
        resident_pos = tl.max(tl.where(matches, position_flat[None, None, :], -1), axis=2).to(tl.int32)

    # Per-candidate state. Master quotas are kept in drain order. slot_pos is the drain position
    # (donor_rank * M_P2 + p) of the expert in each redundant slot, -1 = empty.
    rank_load = tl.zeros([T_P2, R_P2], tl.int64) + master_rank_load[None, :]
    master_quota = tl.zeros([T_P2, R_P2, M_P2], tl.int64) + initial_quota[None, :, :]
    slot_pos = tl.full([T_P2, R_P2, S_P2], -1, tl.int32)
    slot_quota = tl.zeros([T_P2, R_P2, S_P2], tl.int64)
    slots_used = tl.zeros([T_P2, R_P2], tl.int32)
    fan = tl.zeros([T_P2, R_P2, M_P2], tl.int64)  # replicas of the master at each drain position
    rank_tiebreak = (R_P2 - 1 - ranks)[None, :]  # lower rank first on equal keys

    # Rounds stop early once none of this program's candidates moved anything. The state is then
    # unchanged and every later round would repeat the last one, so the plan is the same.
    round_idx = 0
    moved = 1
    while (round_idx < num_rounds) & (moved > 0):
        # Step 2: donor pieces, hottest master first within a donor, largest excess first.
        excess = tl.maximum(rank_load - threshold_col, 0)  # [T_P2, R_P2]
        drained_before = tl.cumsum(master_quota, axis=2) - master_quota
        shed = excess + tl.where(excess > 0, over_drain, 0)
        pieces = tl.minimum(tl.maximum(shed[:, :, None] - drained_before, 0), master_quota)
        donor_key = _sort_rows(excess * R_P2 + rank_tiebreak, LOG_R, True, INTERPRETED)
        donor_rank = (R_P2 - 1 - donor_key % R_P2).to(tl.int32)  # [T_P2, R_P2]: rank at donor line index
        donor_index = tl.broadcast_to(donor_rank[:, :, None], [T_P2, R_P2, M_P2])
        piece_line = tl.gather(pieces, donor_index, 1)  # [T_P2, R_P2, M_P2] in donor order
        piece_end = tl.cumsum(tl.reshape(piece_line, [T_P2, Q_P2]), axis=1)  # [T_P2, Q_P2]

        # Step 3: receivers, most spare first. Each takes the piece under its anchor point, which
        # lies a fixed number of quarters into its interval on the receiver line.
        spare = tl.where(rank_ok[None, :] & (slots_used < SLOTS), tl.maximum(threshold_col - rank_load, 0), 0)
        order_key = tl.where(least_spare_first & (spare > 0), total + 1 - spare, spare)
        recv_key = _sort_rows(order_key * R_P2 + rank_tiebreak, LOG_R, True, INTERPRETED)
        recv_rank = (R_P2 - 1 - recv_key % R_P2).to(tl.int32)  # [T_P2, R_P2]: rank at receiver line index
        if ROTATIONS > 0:
            # Rotation j moves the first j receivers with spare (j mod their count) behind the others.
            # Rotation 0, every other family's, leaves the line as sorted.
            with_spare = tl.maximum(tl.sum((spare > 0).to(tl.int32), axis=1), 1)[:, None]  # [T_P2, 1]
            rotated_index = (line_idx + rotation) % with_spare
            recv_rank = tl.gather(recv_rank, tl.where(line_idx < with_spare, rotated_index, line_idx), 1)
        recv_spare = tl.gather(spare, recv_rank, 1)
        anchor_point = tl.cumsum(recv_spare, axis=1) - recv_spare + (recv_spare * anchor) // 4
        segment = _count_not_above(piece_end, anchor_point, Q_P2, LOG_Q)  # [T_P2, R_P2]: first piece ending past it
        active = (recv_spare > 0) & (segment < Q_P2)
        segment = tl.minimum(segment, Q_P2 - 1)
        segment_donor = tl.gather(donor_rank, segment // M_P2, 1)
        position = segment_donor * M_P2 + segment % M_P2  # [T_P2, R_P2]: drain position of the piece's master

        # By master quota: the j-th receiver takes the j-th positive piece by its master's remaining
        # quota, lower drain position first on ties (padded positions keep that order). Each piece
        # has one receiver, so the receiver's line index serves as its segment.
        # NOTE: the anchor is a run-time value, so every program runs this sort and the taker search
        # below, though only the BY_MASTER_QUOTA programs use them; their GPU cost is not measured.
        flat_position = tl.broadcast_to((ranks[:, None] * M_P2 + local_idx[None, :])[None, :, :], [T_P2, R_P2, M_P2])
        piece_key = tl.where(pieces > 0, master_quota * Q_P2 + (Q_P2 - 1 - flat_position), -1)
        piece_key = _sort_rows(tl.reshape(piece_key, [T_P2, Q_P2]), LOG_Q, True, INTERPRETED)
        ranked_key = tl.gather(piece_key, tl.broadcast_to(line_idx, [T_P2, R_P2]), 1)  # [T_P2, R_P2]
        by_master_quota = anchor == BY_MASTER_QUOTA
        active = tl.where(by_master_quota, (recv_spare > 0) & (ranked_key >= 0), active)
        ranked_position = tl.where(ranked_key >= 0, Q_P2 - 1 - ranked_key % Q_P2, 0).to(position.dtype)
        position = tl.where(by_master_quota, ranked_position, position)
        segment = tl.where(by_master_quota, tl.broadcast_to(line_idx, [T_P2, R_P2]).to(segment.dtype), segment)

        # Best fit (reference: _best_fit_round). The interpreter runs programs one at a time in Python,
        # so there only the best-fit programs run it; compiled, every program does.
        # NOTE: the compiled kernel thus runs these sorts and searches in every program; their GPU cost
        # is not measured.
        if INTERPRETED:
            if best_fit:
                fit_position, fit_amount, bin_line_sorted = _best_fit_choice(
                    rank_load, threshold_col, master_quota, recv_spare, min_quota, flat_position, line_idx,
                    T_P2, R_P2, Q_P2, LOG_R, LOG_Q, INTERPRETED,
                )
            else:
                fit_position = position
                fit_amount = recv_spare * 0
                bin_line_sorted = tl.full([T_P2, R_P2], _BIG, tl.int64)
        else:
            fit_position, fit_amount, bin_line_sorted = _best_fit_choice(
                rank_load, threshold_col, master_quota, recv_spare, min_quota, flat_position, line_idx,
                T_P2, R_P2, Q_P2, LOG_R, LOG_Q, INTERPRETED,
            )
        position = tl.where(best_fit, fit_position.to(position.dtype), position)
        # Resident rounds (reference: _resident_round): in round k each receiver draws on the expert in
        # its k-th resident slot. As with best fit, only its own programs run it under the interpreter.
        if HAS_RESIDENT:
            resident_round = resident_family & (round_idx < SLOTS)
            column = tl.max(tl.where(slot_idx_range[None, :] == round_idx, resident_pos, -1), axis=1)  # [R_P2]
            held_position = tl.gather(tl.broadcast_to(column[None, :], [T_P2, R_P2]), recv_rank, 1)
            if INTERPRETED:
                if resident_round:
                    res_position, res_amount, res_bins = _resident_choice(
                        rank_load, threshold_col, master_quota, recv_spare, held_position, min_quota, line_idx,
                        T_P2, R_P2, M_P2, Q_P2, LOG_R, INTERPRETED,
                    )
                else:
                    res_position = position
                    res_amount = recv_spare * 0
                    res_bins = tl.full([T_P2, R_P2], _BIG, tl.int64)
            else:
                res_position, res_amount, res_bins = _resident_choice(
                    rank_load, threshold_col, master_quota, recv_spare, held_position, min_quota, line_idx,
                    T_P2, R_P2, M_P2, Q_P2, LOG_R, INTERPRETED,
                )
            position = tl.where(resident_round, res_position.to(position.dtype), position)

        # Receivers of one piece are adjacent on the line (pieces ascend along it), so counting
        # receivers per piece locates each receiver's group: served[q] = receivers of pieces <= q.
        segment_key = tl.where(active, segment, Q_P2)  # [T_P2, R_P2], non-decreasing along the line
        piece_idx = tl.broadcast_to(tl.arange(0, Q_P2)[None, :], [T_P2, Q_P2])
        served = _count_not_above(segment_key, piece_idx, R_P2, LOG_R)  # [T_P2, Q_P2]
        group_first = tl.where(segment > 0, tl.gather(served, tl.maximum(segment - 1, 0), 1), 0)

        # Step 4: fill each receiver up to the threshold, capped by the master's remaining quota.
        # Receivers served by one piece draw from it in line order.
        offered = tl.where(active, recv_spare, 0)
        offered_before = tl.cumsum(offered, axis=1) - offered
        group_base = tl.gather(offered_before, group_first, 1)  # offered before the group's first receiver
        quota_at = tl.gather(tl.reshape(master_quota, [T_P2, Q_P2]), position, 1)
        amount = tl.minimum(tl.maximum(quota_at - offered_before + group_base, 0), offered)
        amount = tl.where(amount >= min_quota, amount, 0)  # [T_P2, R_P2] in receiver order
        amount = tl.where(best_fit, fit_amount, amount)
        if HAS_RESIDENT:
            amount = tl.where(resident_round, res_amount, amount)
        take = amount > 0

        # Step 5: pick the redundant slot; a receiver that already holds the expert grows that replica.
        used = tl.gather(slots_used, recv_rank, 1)
        receiver_slot_pos = tl.gather(slot_pos, tl.broadcast_to(recv_rank[:, :, None], [T_P2, R_P2, S_P2]), 1)
        is_same_expert = receiver_slot_pos == position[:, :, None]
        first_match = tl.min(tl.where(is_same_expert, slot_idx_range[None, None, :], S_P2), axis=2)
        chosen_slot = tl.where(first_match < S_P2, first_match, tl.minimum(used, SLOTS - 1))
        new_slot = (take & (first_match >= S_P2)).to(tl.int32)
        # New replicas that need a copy: those of experts not resident on their receiver.
        new_copy = new_slot
        if HAS_RESIDENT:
            receiver_resident = tl.gather(
                tl.broadcast_to(resident_pos[None, :, :], [T_P2, R_P2, S_P2]),
                tl.broadcast_to(recv_rank[:, :, None], [T_P2, R_P2, S_P2]), 1,
            )
            is_resident = tl.max((receiver_resident == position[:, :, None]).to(tl.int32), axis=2) > 0
            new_copy = tl.where(is_resident, 0, new_slot)
        moved = tl.max(tl.max(take.to(tl.int32), axis=1), axis=0)
        if HAS_RESIDENT:
            # A resident round is followed by rounds that match differently, so it never ends the loop.
            moved = tl.maximum(moved, resident_round.to(tl.int32))

        # Receiver line back to rank order through the inverse permutation, then write the slots.
        recv_line = _sort_rows(recv_rank * R_P2 + line_idx, LOG_R, False, INTERPRETED) % R_P2  # line index of each rank
        amount_r = tl.gather(amount, recv_line, 1)
        chosen_r = tl.gather(chosen_slot, recv_line, 1)
        position_r = tl.gather(position, recv_line, 1)
        new_slot_r = tl.gather(new_slot, recv_line, 1)
        hit = slot_idx_range[None, None, :] == chosen_r[:, :, None]  # [T_P2, R_P2, S_P2]
        slot_pos = tl.where(hit & (amount_r > 0)[:, :, None], position_r[:, :, None], slot_pos)
        slot_quota += tl.where(hit, amount_r[:, :, None], 0)
        slots_used += new_slot_r
        rank_load += amount_r

        # Donors: sum the amounts per piece, then map the donor line back to rank-major drain positions.
        amount_end = tl.cumsum(amount, axis=1)
        taken_through = tl.where(served > 0, tl.gather(amount_end, tl.maximum(served - 1, 0), 1), 0)
        donor_line = _sort_rows(donor_rank * R_P2 + line_idx, LOG_R, False, INTERPRETED) % R_P2  # donor line index of each rank
        line_pos = tl.reshape(donor_line[:, :, None] * M_P2 + local_idx[None, None, :], [T_P2, Q_P2])
        taken_before = tl.where(line_pos > 0, tl.gather(taken_through, tl.maximum(line_pos - 1, 0), 1), 0)
        drained = tl.reshape(tl.gather(taken_through, line_pos, 1) - taken_before, [T_P2, R_P2, M_P2])
        # By master quota, receivers are not grouped along the donor line, but each drain position has
        # at most one taker. So the takers are sorted by position, and a search finds each position's taker.
        taker_key = _sort_rows(tl.where(take, position.to(tl.int64) * R_P2 + line_idx, _BIG), LOG_R, False, INTERPRETED)
        position_key = tl.broadcast_to(tl.arange(0, Q_P2)[None, :].to(tl.int64) * R_P2, [T_P2, Q_P2])
        takers_before = _count_not_above(taker_key, position_key - 1, R_P2, LOG_R)  # [T_P2, Q_P2] rank-major
        has_taker = _count_not_above(taker_key, position_key + (R_P2 - 1), R_P2, LOG_R) > takers_before
        taker = (tl.gather(taker_key, tl.minimum(takers_before, R_P2 - 1), 1) % R_P2).to(tl.int32)
        taken_by_position = tl.reshape(tl.where(has_taker, tl.gather(amount, taker, 1), 0), [T_P2, R_P2, M_P2])
        drained = tl.where(by_master_quota, taken_by_position, drained)
        # Best fit: a bin may have several takers, adjacent in the (bin, line index) order.
        if INTERPRETED:
            if best_fit:
                drained = tl.reshape(_sum_by_bin(bin_line_sorted, amount, T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
        else:
            fit_drained = tl.reshape(_sum_by_bin(bin_line_sorted, amount, T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
            drained = tl.where(best_fit, fit_drained, drained)
        if HAS_RESIDENT:
            # A resident round groups its receivers by bin, as best fit does.
            if INTERPRETED:
                if resident_round:
                    drained = tl.reshape(_sum_by_bin(res_bins, amount, T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
            else:
                res_drained = tl.reshape(_sum_by_bin(res_bins, amount, T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
                drained = tl.where(resident_round, res_drained, drained)
        master_quota -= drained
        rank_load -= tl.sum(drained, axis=2)
        if COPY_AWARE:
            # New replicas per piece, counted the way the amounts are: receivers of pieces <= q made
            # new_through[q] of them.
            new_end = tl.cumsum(new_copy.to(tl.int64), axis=1)
            new_through = tl.where(served > 0, tl.gather(new_end, tl.maximum(served - 1, 0), 1), 0)
            new_before = tl.where(line_pos > 0, tl.gather(new_through, tl.maximum(line_pos - 1, 0), 1), 0)
            new_by_line = tl.reshape(tl.gather(new_through, line_pos, 1) - new_before, [T_P2, R_P2, M_P2])
            new_by_position = tl.reshape(tl.where(has_taker, tl.gather(new_copy, taker, 1), 0), [T_P2, R_P2, M_P2])
            new_by_master = tl.where(by_master_quota, new_by_position, new_by_line)
            if INTERPRETED:
                if best_fit:
                    new_by_master = tl.reshape(_sum_by_bin(bin_line_sorted, new_copy.to(tl.int64), T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
            else:
                new_by_fit = tl.reshape(_sum_by_bin(bin_line_sorted, new_copy.to(tl.int64), T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
                new_by_master = tl.where(best_fit, new_by_fit, new_by_master)
            if HAS_RESIDENT:
                if INTERPRETED:
                    if resident_round:
                        new_by_master = tl.reshape(_sum_by_bin(res_bins, new_copy.to(tl.int64), T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
                else:
                    new_by_resident = tl.reshape(_sum_by_bin(res_bins, new_copy.to(tl.int64), T_P2, R_P2, Q_P2, LOG_R), [T_P2, R_P2, M_P2])
                    new_by_master = tl.where(resident_round, new_by_resident, new_by_master)
            fan += new_by_master
        round_idx += 1

    # Logical expert of each redundant slot, per candidate.
    drain_expert_line = tl.zeros([T_P2, Q_P2], tl.int32) + tl.reshape(drain_expert, [Q_P2])[None, :]
    slot_expert = tl.gather(drain_expert_line, tl.reshape(tl.maximum(slot_pos, 0), [T_P2, R_P2 * S_P2]), 1)
    slot_expert = tl.where(slot_pos >= 0, tl.reshape(slot_expert, [T_P2, R_P2, S_P2]), -1)

    # Step 6: publish this program's candidates: what the choice needs, and the state to copy out.
    peak = tl.max(rank_load, axis=1)  # [T_P2]
    plain_peak = peak
    copied_slot = slot_pos >= 0  # [T_P2, R_P2, S_P2]: filled, and not with a resident expert
    if HAS_RESIDENT:
        for k in tl.static_range(SLOTS):
            column_k = tl.max(tl.where(slot_idx_range[None, :] == k, resident_pos, -1), axis=1)  # [R_P2]
            copied_slot = copied_slot & (slot_pos != column_k[None, :, None])
    if COPY_AWARE:
        # The peak with the weight sync counted, as _costed_peak in quota.py.
        copies_in = tl.sum(copied_slot.to(tl.int64), axis=2)  # [T_P2, R_P2]
        # fan <= NUM_RANKS - 1 (one replica per other rank), 0 on padding, so the table read stays inside.
        chunks_out = tl.sum(tl.load(send_table_ptr + fan), axis=2)
        busiest = tl.max(tl.maximum(copies_in * relay_chunks, chunks_out), axis=1)
        sync = busiest * copy_cost // relay_chunks  # [T_P2]
        replica_load = rank_load - tl.sum(master_quota, axis=2)
        forward_sync = sync[:, None] * gemm_passes  # in units of one assignment's forward GEMM
        first_chunk = forward_sync // copy_chunks + replica_load
        last_chunk = forward_sync + replica_load * (copy_chunks + 2) // (3 * copy_chunks)
        forward = tl.maximum(rank_load, tl.maximum(first_chunk, last_chunk))
        busy = (rank_load * (gemm_passes - 1) + forward) // gemm_passes
        overlapped_peak = tl.max(tl.where(copies_in > 0, busy, rank_load), axis=1)
        peak = tl.minimum(tl.where(copy_overlap != 0, overlapped_peak, peak + sync), COSTED_PEAK_LIMIT)
    # Replicas that need a copy: with resident slots a plan that reuses them wins a tie.
    num_replicas = tl.sum(tl.sum(copied_slot.to(tl.int64), axis=2), axis=1)
    local = tl.zeros([T_P2], tl.int64)
    if PREFER_LOCAL:
        # Assignments an instance on their own source rank can serve: min(quota, loads[rank, expert]).
        own = tl.load(loads_ptr + ranks[:, None] * NUM_EXPERTS + drain_expert, mask=master_ok, other=0).to(tl.int64)
        master_local = tl.sum(tl.sum(tl.minimum(master_quota, own[None, :, :]), axis=2), axis=1)
        replica_ptrs = loads_ptr + ranks[None, :, None] * NUM_EXPERTS + tl.maximum(slot_expert, 0)
        replica_tokens = tl.load(replica_ptrs, mask=slot_expert >= 0, other=0).to(tl.int64)
        replica_local = tl.where(slot_expert >= 0, tl.minimum(slot_quota, replica_tokens), 0)
        local = master_local + tl.sum(tl.sum(replica_local, axis=2), axis=1)
    rows = pid * T_P2 + tile_idx  # [T_P2]: scratch row of each candidate
    tl.store(summary_ptr + rows * SUMMARY_WORDS + 0, peak)
    tl.store(summary_ptr + rows * SUMMARY_WORDS + 1, num_replicas)
    tl.store(summary_ptr + rows * SUMMARY_WORDS + 2, local)
    tl.store(summary_ptr + rows * SUMMARY_WORDS + 3, plain_peak)
    tl.store(summary_ptr + rows * SUMMARY_WORDS + 4, thresholds)
    master_cols = tl.arange(0, Q_P2)[None, :]
    tl.store(master_scratch_ptr + rows[:, None] * Q_P2 + master_cols, tl.reshape(master_quota, [T_P2, Q_P2]))
    slot_cols = tl.arange(0, R_P2 * S_P2)[None, :]
    tl.store(slot_expert_scratch_ptr + rows[:, None] * (R_P2 * S_P2) + slot_cols, tl.reshape(slot_expert, [T_P2, R_P2 * S_P2]))
    tl.store(slot_quota_scratch_ptr + rows[:, None] * (R_P2 * S_P2) + slot_cols, tl.reshape(slot_quota, [T_P2, R_P2 * S_P2]))

    # The last program to finish chooses. The barrier orders all of this program's stores before its
    # ticket, and the acq_rel ticket orders every other program's stores before the last one's loads.
    # NOTE: this relies on the PTX memory model (bar.sync, then atom.acq_rel.gpu from one thread);
    # the interpreter runs programs one after another, so only tests/gpu exercises it.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == NUM_PROGRAMS - 1:
        # Step 7: choose as the reference does. Plans at or below the balance target, or tied with the
        # lowest peak rank load, qualify. Among them the fewest replicas win, then the most local
        # assignments, then the lowest peak, then the first candidate. Scratch rows run in
        # (family, threshold) order, like the reference's candidate index.
        all_rows = tl.arange(0, P_P2 * T_P2)  # [P_P2 * T_P2]
        row_program = all_rows // T_P2
        row_threshold = (row_program % NUM_TILES) * T_P2 + all_rows % T_P2
        # The second drain's families run on the mean steps only, and the best-fit and rotated families
        # on the best-fit steps, so their other rows are padding.
        row_family = row_program // NUM_TILES
        row_resident = row_family == RESIDENT_FAMILY  # on the first drain's ladder
        row_over = (row_family >= RECEIVER_FAMILIES) & ~row_resident  # second drain, best fit and rotations
        row_best_fit_steps = (row_family >= BEST_FIT_FAMILY) & ~row_resident  # best fit and the rotations
        row_steps = tl.where(row_best_fit_steps, NUM_BEST_FIT, tl.where(row_over, NUM_MEAN_STEPS, NUM_THRESHOLDS))
        row_ok = (row_program < NUM_PROGRAMS) & (row_threshold < row_steps)
        all_peak = tl.load(summary_ptr + all_rows * SUMMARY_WORDS + 0, mask=row_ok, other=0, cache_modifier=".cg")
        all_replicas = tl.load(summary_ptr + all_rows * SUMMARY_WORDS + 1, mask=row_ok, other=0, cache_modifier=".cg")
        all_local = tl.load(summary_ptr + all_rows * SUMMARY_WORDS + 2, mask=row_ok, other=0, cache_modifier=".cg")
        all_plain_peak = tl.load(summary_ptr + all_rows * SUMMARY_WORDS + 3, mask=row_ok, other=0, cache_modifier=".cg")
        all_threshold = tl.load(summary_ptr + all_rows * SUMMARY_WORDS + 4, mask=row_ok, other=0, cache_modifier=".cg")
        # The first drain's steps count in ascending order of threshold (lower step first on ties)
        # while each threshold lies at or below the balance target or the lowest peak of the steps
        # before it (reference: _first_drain_steps). step_rank is a row's step's place in that order.
        first_drain = row_ok & ~row_over & ~row_resident
        step_rank = row_threshold * 0
        for step in tl.static_range(NUM_THRESHOLDS):
            step_threshold = tl.max(tl.where(first_drain & (row_threshold == step), all_threshold, -1), axis=0)
            before = (step_threshold < all_threshold) | ((step_threshold == all_threshold) & (step < row_threshold))
            step_rank += before.to(step_rank.dtype)
        bar = total * 0 + _BIG  # lowest peak of the steps so far
        steps_taking_part = total * 0
        still = total >= 0  # every step so far takes part
        for place in tl.static_range(NUM_THRESHOLDS):
            at_step = first_drain & (step_rank == place)
            step_threshold = tl.max(tl.where(at_step, all_threshold, 0), axis=0)
            takes_part = (step_threshold <= bar) | (step_threshold * (NUM_RANKS * FRACTION_SCALE) <= total * target_q)
            if STOP_AT_TARGET:
                # The ladder ends after a step with a plan at or below the balance target.
                takes_part = takes_part & ((bar == _BIG) | (bar * (NUM_RANKS * FRACTION_SCALE) > total * target_q))
            still = still & takes_part
            steps_taking_part += still.to(tl.int64)
            bar = tl.where(still, tl.minimum(bar, tl.min(tl.where(at_step, all_peak, _BIG), axis=0)), bar)
        row_ok = row_ok & (row_over | (step_rank < steps_taking_part))
        first_drain = first_drain & (step_rank < steps_taking_part)
        # A second-drain, best-fit or rotated candidate counts only below every first-drain plan's max rank load.
        best_first_drain = tl.min(tl.where(first_drain, all_plain_peak, _BIG), axis=0)
        row_ok = row_ok & (~row_over | (all_threshold < best_first_drain))
        if STOP_AT_TARGET:
            # With a good first-drain plan the search stops there.
            first_within = first_drain & (all_peak * (NUM_RANKS * FRACTION_SCALE) <= total * target_q)
            first_good = tl.max(first_within.to(tl.int32), axis=0)
            row_ok = row_ok & (~row_over | (first_good == 0))
        best_peak = tl.min(tl.where(row_ok, all_peak, _BIG), axis=0)
        good = row_ok & ((all_peak == best_peak) | (all_peak * (NUM_RANKS * FRACTION_SCALE) <= total * target_q))
        fewest = tl.min(tl.where(good, all_replicas, _BIG), axis=0)
        good = good & (all_replicas == fewest)
        if PREFER_LOCAL:
            most_local = tl.max(tl.where(good, all_local, -1), axis=0)
            good = good & (all_local == most_local)
        lowest = tl.min(tl.where(good, all_peak, _BIG), axis=0)
        good = good & (all_peak == lowest)
        best = tl.min(tl.where(good, all_rows, P_P2 * T_P2), axis=0)

        # Step 8: copy the chosen candidate out; master quotas go from drain order to local index order.
        inverse_key = tl.where(master_ok, drain_local * M_P2 + local_idx[None, :], M_P2 * M_P2 + local_idx[None, :])
        drain_pos_of_local = _sort_rows(inverse_key, LOG_M, False, INTERPRETED) % M_P2  # [R_P2, M_P2]
        master_src = master_scratch_ptr + best * Q_P2 + ranks[:, None] * M_P2 + drain_pos_of_local
        master_by_local = tl.load(master_src, mask=master_ok, other=0, cache_modifier=".cg")
        slot_src = best * (R_P2 * S_P2) + ranks[:, None] * S_P2 + slot_idx_range[None, :]  # [R_P2, S_P2]
        best_slot_expert = tl.load(slot_expert_scratch_ptr + slot_src, mask=slot_ok, other=-1, cache_modifier=".cg")
        best_slot_quota = tl.load(slot_quota_scratch_ptr + slot_src, mask=slot_ok, other=0, cache_modifier=".cg")
        slot_base = ranks[:, None] * SLOTS_PER_RANK  # [R_P2, 1]
        tl.store(quota_out_ptr + slot_base + local_idx[None, :], master_by_local, mask=master_ok)
        tl.store(quota_out_ptr + slot_base + EXPERTS_PER_RANK + slot_idx_range[None, :], best_slot_quota, mask=slot_ok)
        replica_dst = replica_out_ptr + ranks[:, None] * SLOTS + slot_idx_range[None, :]
        tl.store(replica_dst, best_slot_expert.to(tl.int64), mask=slot_ok)


def _pow2(value: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(value))


def _ladder() -> tuple[int, ...]:
    return _MEAN_STEPS_Q + _GAP_STEPS_Q


@dataclasses.dataclass(frozen=True)
class _LaunchConfig:
    """Grid, warps, scratch sizes and compile-time parameters of one plan kernel launch."""

    num_programs: int
    num_warps: int
    scratch_rows: int  # candidates held in scratch: num_programs * T_P2
    constexprs: dict


def _launch_config(
    layout: ExpertLayout,
    config: QuotaConfig,
    candidates_per_program: int | None,
    interpreted: bool,
    has_resident: bool = False,
) -> _LaunchConfig:
    steps = _ladder()
    r_p2 = _pow2(layout.num_ranks)
    m_p2 = _pow2(layout.experts_per_rank)
    s_p2 = _pow2(layout.redundant_slots_per_rank)
    q_p2 = r_p2 * m_p2
    all_thresholds = _pow2(max(len(steps), len(_BEST_FIT_STEPS_Q)))

    if candidates_per_program is None:
        # Under the interpreter each program costs the same Python overhead, so fewer run faster.
        t_p2 = all_thresholds if interpreted else max(1, min(all_thresholds, 512 // q_p2))
    elif candidates_per_program < 1 or candidates_per_program & (candidates_per_program - 1):
        raise ValueError(f"candidates_per_program must be a power of two >= 1, got {candidates_per_program}")
    else:
        t_p2 = min(all_thresholds, candidates_per_program)
    num_drains = _num_drains(layout.redundant_slots_per_rank)
    # NOTE: with one slot the second drain doubles the programs, and they also plan the gap steps (8 of
    # the 21 thresholds), which the choice ignores. The rotated lines add 16 families with one slot, 33
    # in all then instead of 17. The best-fit family adds one family of programs, and every program
    # plans the longer of the two ladders. The GPU time this costs has not been measured.
    num_tiles = triton.cdiv(max(len(steps), len(_BEST_FIT_STEPS_Q)), t_p2)
    # Families: every (drain, order, anchor), best fit, every (rotation, rotation anchor), and with a
    # resident table the resident family.
    num_rotations = _num_rotations(layout.redundant_slots_per_rank)
    num_families = num_drains * _RECEIVER_ORDERS * len(_ANCHORS) + 1 + num_rotations * len(_ROTATION_ANCHORS)
    num_programs = (num_families + int(has_resident)) * num_tiles

    constexprs = {
        "NUM_RANKS": layout.num_ranks,
        "EXPERTS_PER_RANK": layout.experts_per_rank,
        "SLOTS": layout.redundant_slots_per_rank,
        "STEPS": steps,
        "NUM_MEAN_STEPS": len(_MEAN_STEPS_Q),
        "BEST_FIT_STEPS": _BEST_FIT_STEPS_Q,
        "ANCHORS": tuple(int(a) for a in _ANCHORS),
        "RECEIVER_ORDERS": _RECEIVER_ORDERS,
        "NUM_DRAINS": num_drains,
        "ROTATIONS": num_rotations,
        "ROTATION_ANCHORS": tuple(int(a) for a in _ROTATION_ANCHORS),
        "OVER_DRAIN": _OVER_DRAIN_Q,
        "FRACTION_SCALE": _FRACTION_SCALE,
        "PREFER_LOCAL": bool(config.prefer_local),
        "STOP_AT_TARGET": bool(config.stop_at_target),
        "T_P2": t_p2,
        "P_P2": _pow2(num_programs),
        "R_P2": r_p2,
        "M_P2": m_p2,
        "S_P2": s_p2,
        "LOG_R": r_p2.bit_length() - 1,
        "LOG_M": m_p2.bit_length() - 1,
        "LOG_Q": q_p2.bit_length() - 1,
        "SRC_BLOCK": min(r_p2, _pow2(max(1, 8192 // q_p2))),
        "INTERPRETED": interpreted,
        "COPY_AWARE": config.copy_cost > 0,
        "HAS_RESIDENT": has_resident,
    }
    # NOTE: about 32 tile entries per thread; a guess from ptxas register counts for sm_90, not from timings.
    num_warps = min(16, max(4, (t_p2 * q_p2) // 128))
    return _LaunchConfig(num_programs, num_warps, num_programs * t_p2, constexprs)


def plan_quota_triton(
    loads: torch.Tensor,
    layout: ExpertLayout,
    config: QuotaConfig,
    resident: torch.Tensor | None = None,
    *,
    candidates_per_program: int | None = None,
) -> Plan:
    """Plan one layer and microbatch with the Triton quota planner (one kernel launch).

    loads: [num_ranks, num_experts] integer tensor on a CUDA device (or on the CPU under
      ``TRITON_INTERPRET=1``). Assignments per source rank and logical expert; entries must be
      non-negative with a total of at most ``ultraep.layout.MAX_TOTAL_LOAD`` (not checked here).
    layout: the expert layout. Each program keeps ``[candidates, num_ranks * experts_per_rank]``
      tiles in registers, so very large groups (past 256 ranks x 8 master slots) may spill.
    config: quota planner settings.
    resident: None, or [num_ranks, redundant_slots_per_rank] int64 on ``loads.device``: the logical
      expert whose current weights each redundant slot contains, -1 = none, with its values checked
      (:func:`~ultraep.planners.quota.check_resident`).
    candidates_per_program: thresholds each program plans side by side (a power of two); ``None``
      picks about 512 tile entries per program on a GPU and one program per receiver family under the
      interpreter. The plan does not depend on it.
    Returns the same plan as ``plan_reference(loads, layout, config, resident)``, bit for bit, with its
    tensors on ``loads.device``. One rank or no redundant slots take the masters-only plan (no kernel).
    Reads nothing back to the host, so the call can be captured in a CUDA graph.
    """
    if layout.redundant_slots_per_rank == 0 or layout.num_ranks == 1:
        # Static per layout: no replica can help, and plan_reference returns the same plan.
        return masters_only_plan(loads.to(torch.int64), layout)
    launch = _launch_config(layout, config, candidates_per_program, RUNS_IN_INTERPRETER, resident is not None)
    c = launch.constexprs
    device = loads.device
    loads = loads.to(torch.int64).contiguous()
    num_rounds = default_num_rounds(config, layout.redundant_slots_per_rank)

    replica_expert_ids = torch.empty((layout.num_ranks, layout.redundant_slots_per_rank), dtype=torch.int64, device=device)
    quota = torch.empty(layout.num_slots, dtype=torch.int64, device=device)
    rows = launch.scratch_rows
    summary = torch.empty((rows, SUMMARY_WORDS), dtype=torch.int64, device=device)
    master_scratch = torch.empty((rows, c["R_P2"] * c["M_P2"]), dtype=torch.int64, device=device)
    slot_expert_scratch = torch.empty((rows, c["R_P2"] * c["S_P2"]), dtype=torch.int32, device=device)
    slot_quota_scratch = torch.empty((rows, c["R_P2"] * c["S_P2"]), dtype=torch.int64, device=device)
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    send_table = relay_send_table(layout.num_ranks, config.relay_chunks, device)
    # Without a table the kernel never reads this pointer, so any int64 tensor serves.
    resident = replica_expert_ids if resident is None else resident.to(device=device, dtype=torch.int64).contiguous()

    _quota_plan_kernel[(launch.num_programs,)](
        loads,
        replica_expert_ids,
        quota,
        summary,
        master_scratch,
        slot_expert_scratch,
        slot_quota_scratch,
        ticket,
        send_table,
        resident,
        config.min_replica_quota,
        _to_fixed_point(config.min_replica_fraction),
        _to_fixed_point(config.balance_target),
        num_rounds,
        config.copy_cost,
        int(config.copy_overlap),
        config.copy_chunks,
        config.gemm_passes,
        _relay_units(config),
        **c,
        num_warps=launch.num_warps,
    )
    return Plan(layout, replica_expert_ids, quota)


RUNS_IN_INTERPRETER = isinstance(_quota_plan_kernel, InterpretedFunction)
"""True when ``TRITON_INTERPRET=1`` was set before Triton was imported: kernels then run on CPU tensors."""
