"""Grad reduce: add each replica's weight gradient into its master's gradient, in a fixed order.

Replication copies a master's weights into redundant slots, a linear map; grad reduce is its adjoint,
and it runs along the same trees as the weight sync. Without a relay tree each replica sends its
gradient row to the master's rank. With one (``mode="relay"`` or ``"auto"``, the trees of
:func:`~ultraep.comm.relay.plan_relay_trees` built over the replicas that have a gradient), each
receiver that forwarded copies adds its children's rows into its own row and sends the sum on to its
parent, chunk by chunk. A row sends chunk ``c`` no earlier than step ``c``, and only after the step in
which its last child's chunk ``c`` arrived. So every rank receives at most the tree's fan-out rows per
expert, where the master received one per replica.

Every receiver adds the rows it receives in the order of the plan, which never depends on timing, so
the sums are bitwise reproducible from run to run. A rank receives into a small scratch buffer of
``scratch_rows`` flat rows: per step it takes at most ``scratch_rows`` pieces of each chunk, and a rank
that has more to receive takes more steps instead of a larger buffer.

As with weight sync, :func:`plan_grad_reduce` is pure and :func:`reduce_replica_grads` runs the plan
with point-to-point operations.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ultraep.comm.relay import copy_edges, plan_relay_trees
from ultraep.comm.weight_sync import (
    SYNC_MODES,
    WeightSpec,
    _as_int_table,
    _step_pieces,
    check_replica_placement,
    exchange,
)
from ultraep.layout import ExpertLayout

__all__ = ["GradReducePlan", "GradReduceTransfer", "plan_grad_reduce", "reduce_replica_grads"]


@dataclasses.dataclass(frozen=True)
class GradReduceTransfer:
    """One chunk of a replica's gradient row (its own gradient plus its relay children's) sent up its tree."""

    step: int
    """Step of the schedule; all transfers of a step run in one ``batch_isend_irecv``."""
    expert_id: int
    """Logical expert of the replica."""
    src_rank: int
    """Rank holding the replica."""
    src_slot_id: int
    """Physical slot id of the replica (a redundant slot on ``src_rank``)."""
    dst_rank: int
    """Rank that adds the chunk: the master rank of ``expert_id``, or a relay's rank."""
    dst_slot_id: int
    """Physical slot id the chunk is added into: the expert's master slot, or the relay's redundant slot."""
    chunk_idx: int
    """Chunk of the row, ``0 .. num_chunks-1`` (:meth:`WeightSpec.chunk_segments`)."""
    scratch_row: int
    """Row of ``dst_rank``'s scratch buffer that receives the chunk."""


@dataclasses.dataclass(frozen=True)
class GradReducePlan:
    """Every replica gradient transfer of one layer and microbatch, in the order both ends post them.

    Example: 2 ranks, 2 experts per rank, 1 redundant slot per rank, a replica of expert 0 in slot 5
    (rank 1)::

        transfers = (GradReduceTransfer(step=0, expert_id=0, src_rank=1, src_slot_id=5,
                                        dst_rank=0, dst_slot_id=0, chunk_idx=0, scratch_row=0),)
        num_steps = 1, num_chunks = 1, scratch_rows = 1, relay_expert_ids = ()
    """

    transfers: tuple[GradReduceTransfer, ...]
    """Sorted by (step, dst_rank, dst_slot_id, src_slot_id, chunk_idx). Each receiver adds its
    arrivals in this order."""
    num_steps: int
    """Steps of the schedule (0 when no replica has a gradient)."""
    num_chunks: int
    """Chunks each row is split into; 1 unless some expert is reduced through a relay tree."""
    scratch_rows: int
    """Rows of the receive buffer each rank needs."""
    relay_expert_ids: tuple[int, ...]
    """Logical experts reduced through relay trees, ascending."""
    num_ranks: int
    """Ranks of the EP group the plan is for."""

    def elements_moved(self, numel: int) -> int:
        """Return the elements all transfers move together, for flat gradient rows of ``numel`` elements.

        Every replica with a gradient sends its row once, whole or in chunks.
        """
        return len({t.src_slot_id for t in self.transfers}) * numel


def plan_grad_reduce(
    layout: ExpertLayout,
    replica_expert_ids,
    *,
    replica_quota=None,
    scratch_rows: int | None = None,
    mode: str = "direct",
    num_chunks: int = 4,
) -> GradReducePlan:
    """List the gradient transfers from replicas up their trees to master ranks. Pure, no communication.

    replica_expert_ids: [num_ranks, redundant_slots_per_rank] int tensor (any device, read on the host)
      or nested sequence. Logical expert of each redundant slot; -1 = empty.
    replica_quota: [num_ranks, redundant_slots_per_rank] int tensor or nested sequence, or ``None``.
      Quota of each redundant slot. A replica with quota 0 processed no assignment, so its gradient is
      exactly zero and it sends nothing. ``None`` sends every replica.
    scratch_rows: receive rows per rank and step (>= 1); ``None`` means
      ``max(1, redundant_slots_per_rank)``. NOTE: with one row, a relay with two children receives
      them in two steps, so a binary tree's reduce takes more steps than its weight sync.
    mode: ``"direct"``, ``"relay"`` or ``"auto"``, as for :func:`~ultraep.comm.plan_weight_sync`; the
      trees span the replicas that send a gradient.
    num_chunks: chunks per row when some expert is reduced through a relay tree (>= 1).

    Schedule: the deepest level of every tree goes first, and within a level the transfers go by
    destination slot, then source slot. A transfer of chunk ``c`` takes the first step that is at or
    after ``c`` and after every step in which its source received chunk ``c`` from its children. Its
    receiver must have a free scratch row for chunk ``c`` in that step, or it waits. Without relay
    trees this puts the k-th replica arriving on a rank (by master slot, then replica slot id) in step
    ``k // scratch_rows``, row ``k % scratch_rows``.
    """
    if mode not in SYNC_MODES:
        raise ValueError(f"mode must be one of {SYNC_MODES}, got {mode!r}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
    width = layout.redundant_slots_per_rank
    if scratch_rows is None:
        scratch_rows = max(1, width)
    if isinstance(scratch_rows, bool) or not isinstance(scratch_rows, int) or scratch_rows < 1:
        raise ValueError(f"scratch_rows must be a positive int, got {scratch_rows!r}")
    table = check_replica_placement(layout, replica_expert_ids)
    quota = None if replica_quota is None else _as_int_table(replica_quota, "replica_quota", layout.num_ranks, width)

    # Step 1: replicas with a gradient, per expert in ascending slot id, and their trees.
    senders: dict[int, list[tuple[int, int]]] = {}
    for rank in range(layout.num_ranks):
        for idx in range(width):
            expert = table[rank][idx]
            if expert >= 0 and (quota is None or quota[rank][idx] != 0):
                senders.setdefault(expert, []).append((rank, layout.redundant_slot_id(rank, idx)))
    trees = plan_relay_trees(layout, senders, mode, num_chunks)
    chunks = num_chunks if trees else 1

    # Step 2: tree edges per level as (expert, source, destination), walked from child to parent.
    edges_by_level: dict[int, list] = {}
    for expert, slots in senders.items():
        for level, parent, child in copy_edges(layout, expert, slots, trees.get(expert)):
            edges_by_level.setdefault(level, []).append((expert, child, parent))

    # Step 3: list-schedule the edges chunk by chunk, deepest level first, then by destination and
    # source slot.
    received_by = {}  # (slot id, chunk) -> last step in which that slot received the chunk from a child
    used_rows: dict[tuple[int, int, int], int] = {}  # (rank, step, chunk) -> scratch rows taken
    transfers = []
    for level in sorted(edges_by_level, reverse=True):
        edges = sorted(edges_by_level[level], key=lambda edge: (edge[2][1], edge[1][1]))
        for chunk in range(chunks):
            for expert, (src_rank, src_slot), (dst_rank, dst_slot) in edges:
                step = max(chunk, received_by.get((src_slot, chunk), -1) + 1)
                while used_rows.get((dst_rank, step, chunk), 0) >= scratch_rows:
                    step += 1
                row = used_rows.get((dst_rank, step, chunk), 0)
                used_rows[(dst_rank, step, chunk)] = row + 1
                received_by[(dst_slot, chunk)] = max(received_by.get((dst_slot, chunk), -1), step)
                transfers.append(GradReduceTransfer(step, expert, src_rank, src_slot, dst_rank, dst_slot, chunk, row))
    transfers.sort(key=lambda t: (t.step, t.dst_rank, t.dst_slot_id, t.src_slot_id, t.chunk_idx))
    num_steps = max((t.step + 1 for t in transfers), default=0)
    return GradReducePlan(tuple(transfers), num_steps, chunks, scratch_rows, tuple(sorted(trees)), layout.num_ranks)


def reduce_replica_grads(
    reduce_plan: GradReducePlan,
    *,
    layout: ExpertLayout,
    spec: WeightSpec,
    rank: int,
    replica_grad_buffer: torch.Tensor,
    master_grads: Sequence[torch.Tensor] | None,
    scratch: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    timeout: datetime.timedelta | None = None,
    description: str = "grad reduce",
) -> int:
    """Run ``reduce_plan`` on this rank: send replica gradients up their trees, add received ones in plan order.

    reduce_plan: from :func:`plan_grad_reduce`; every rank of ``group`` passes the same plan.
    replica_grad_buffer: [redundant_slots_per_rank, spec.numel] tensor on this rank. Row ``j`` contains the
      gradient of redundant slot ``j``; only rows named as sources in the plan are read. A relay's row
      also takes its children's sums before it is sent on. Every row is zero when this returns, ready
      for the next layer.
    master_grads: per weight tensor, contiguous ``[experts_per_rank, *shape]``, same dtype and device as
      the buffer; received gradients are added in place in the plan's order. May be ``None`` when no
      transfer reaches a master slot on this rank.
    scratch: [reduce_plan.scratch_rows, spec.numel] receive buffer; contents on entry are ignored.
    Returns the bytes this rank sent.

    Collective: every rank in ``group`` must call this with the same plan. With 2 ranks, 2 experts per
    rank, 1 redundant slot per rank and a replica of expert 0 on rank 1: rank 0 passes its gradient
    buffer and master gradients and gets ``master_grads[i][0] += rank 1's row 0`` (unpacked per weight);
    rank 1 passes its buffer with row 0 = the replica's gradient and gets that row zeroed.

    Raises :class:`~ultraep.comm.weight_sync.CommunicationError` naming the step and peer ranks.
    """
    if rank < 0 or rank >= layout.num_ranks:
        raise ValueError(f"rank={rank} is outside [0, {layout.num_ranks - 1}]")
    expected = (layout.redundant_slots_per_rank, spec.numel)
    if tuple(replica_grad_buffer.shape) != expected:
        raise ValueError(f"replica_grad_buffer must have shape {list(expected)}, got {list(replica_grad_buffer.shape)}")
    if reduce_plan.num_steps and tuple(scratch.shape) != (reduce_plan.scratch_rows, spec.numel):
        raise ValueError(
            f"scratch must have shape [{reduce_plan.scratch_rows}, {spec.numel}] for this plan, got {list(scratch.shape)}"
        )
    masters = layout.experts_per_rank
    to_master = any(t.dst_rank == rank and not layout.is_redundant_slot(t.dst_slot_id) for t in reduce_plan.transfers)
    if master_grads is None and to_master:
        raise ValueError(f"master_grads is None but the plan sends replica gradients to rank {rank}")
    if master_grads is not None and not all(grad.is_contiguous() for grad in master_grads):
        raise ValueError("master_grads must be contiguous tensors; pass e.g. [g.contiguous() for g in grads] and read the result back")
    bytes_sent = 0

    schedule = _step_pieces(reduce_plan.transfers, reduce_plan.num_steps, spec, reduce_plan.num_chunks)
    for step, pieces in enumerate(schedule):
        # Step 1: post this step's sends and receives. Both ends post the same pieces in the same
        # order, so the tags match.
        ops, peers, arrivals = [], [], []
        for tag, transfer, weight_idx, begin, stop in pieces:
            offset = spec.offsets[weight_idx]
            if transfer.src_rank == rank:
                row = transfer.src_slot_id % layout.slots_per_rank - masters
                tensor = replica_grad_buffer[row, offset + begin : offset + stop]
                ops.append(dist.P2POp(dist.isend, tensor, group=group, tag=tag, group_peer=transfer.dst_rank))
                peers.append(transfer.dst_rank)
                bytes_sent += tensor.numel() * tensor.element_size()
            elif transfer.dst_rank == rank:
                tensor = scratch[transfer.scratch_row, offset + begin : offset + stop]
                ops.append(dist.P2POp(dist.irecv, tensor, group=group, tag=tag, group_peer=transfer.src_rank))
                peers.append(transfer.src_rank)
                arrivals.append((transfer, weight_idx, begin, stop))
        if not ops:
            continue
        exchange(
            ops,
            timeout=timeout,
            description=f"{description}, step {step + 1} of {reduce_plan.num_steps}",
            rank=rank,
            peer_ranks=peers,
        )

        # Step 2: add the arrivals in plan order, into a master gradient or a relay's row.
        for transfer, weight_idx, begin, stop in arrivals:
            offset = spec.offsets[weight_idx]
            piece = scratch[transfer.scratch_row, offset + begin : offset + stop]
            local_idx = transfer.dst_slot_id % layout.slots_per_rank
            if local_idx < masters:
                master_grads[weight_idx][local_idx].view(-1)[begin:stop].add_(piece)
            else:
                replica_grad_buffer[local_idx - masters, offset + begin : offset + stop].add_(piece)

    replica_grad_buffer.zero_()
    return bytes_sent
