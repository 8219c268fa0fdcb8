"""Grad reduce: add each replica's weight gradient into its master's gradient, in a fixed order.

Replication copies a master's weights into redundant slots, a linear map; grad reduce is its adjoint.
Each replica sends its gradient row to the master's rank, which adds the rows of one expert in
ascending physical slot id order. The order never depends on timing, so the sums are bitwise
reproducible from run to run.

As with weight sync, :func:`plan_grad_reduce` is pure and :func:`reduce_replica_grads` runs the plan
with point-to-point operations. A master rank receives into a small scratch buffer of
``scratch_rows`` flat rows, so a rank whose experts have many replicas takes several steps instead
of a larger buffer.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ultraep.comm.weight_sync import WeightSpec, _as_int_table, check_replica_placement, exchange
from ultraep.layout import ExpertLayout

__all__ = ["GradReducePlan", "GradReduceTransfer", "plan_grad_reduce", "reduce_replica_grads"]


@dataclasses.dataclass(frozen=True)
class GradReduceTransfer:
    """One replica's gradient row sent to its expert's master rank."""

    step: int
    """Step of the schedule; all transfers of a step run in one ``batch_isend_irecv``."""
    expert_id: int
    """Logical expert of the replica."""
    src_rank: int
    """Rank holding the replica."""
    src_slot_id: int
    """Physical slot id of the replica (a redundant slot on ``src_rank``)."""
    dst_rank: int
    """Master rank of ``expert_id``."""
    scratch_row: int
    """Row of the master rank's scratch buffer that receives the gradient."""


@dataclasses.dataclass(frozen=True)
class GradReducePlan:
    """Every replica gradient transfer of one layer and microbatch, in the order both ends post them.

    Example: 2 ranks, 2 experts per rank, 1 redundant slot per rank, a replica of expert 0 in slot 5
    (rank 1)::

        transfers = (GradReduceTransfer(step=0, expert_id=0, src_rank=1, src_slot_id=5,
                                        dst_rank=0, scratch_row=0),)
        num_steps = 1, scratch_rows = 1
    """

    transfers: tuple[GradReduceTransfer, ...]
    """Sorted by (step, dst_rank, src_slot_id); per master rank, ascending replica slot id."""
    num_steps: int
    """Steps of the schedule (0 when no replica has a gradient)."""
    scratch_rows: int
    """Rows of the receive buffer each master rank needs."""
    num_ranks: int
    """Ranks of the EP group the plan is for."""


def plan_grad_reduce(
    layout: ExpertLayout,
    replica_expert_ids,
    *,
    replica_quota=None,
    scratch_rows: int | None = None,
) -> GradReducePlan:
    """List the gradient transfers from replicas to master ranks. Pure, no communication.

    replica_expert_ids: [num_ranks, redundant_slots_per_rank] int tensor (any device, read on the host)
      or nested sequence. Logical expert of each redundant slot; -1 = empty.
    replica_quota: [num_ranks, redundant_slots_per_rank] int tensor or nested sequence, or ``None``.
      Quota of each redundant slot. A replica with quota 0 processed no assignment, so its gradient is
      exactly zero and it sends nothing. ``None`` sends every replica.
    scratch_rows: receive rows per master rank and step (>= 1); ``None`` means
      ``max(1, redundant_slots_per_rank)``.

    The k-th replica (ascending slot id) of any expert on master rank ``r`` arrives in step
    ``k // scratch_rows``, row ``k % scratch_rows``, counting all of rank ``r``'s incoming replicas.
    """
    width = layout.redundant_slots_per_rank
    if scratch_rows is None:
        scratch_rows = max(1, width)
    if isinstance(scratch_rows, bool) or not isinstance(scratch_rows, int) or scratch_rows < 1:
        raise ValueError(f"scratch_rows must be a positive int, got {scratch_rows!r}")
    table = check_replica_placement(layout, replica_expert_ids)
    quota = None if replica_quota is None else _as_int_table(replica_quota, "replica_quota", layout.num_ranks, width)

    # Step 1: incoming replicas of each master rank, ascending slot id.
    incoming: list[list[tuple[int, int, int]]] = [[] for _ in range(layout.num_ranks)]
    for rank in range(layout.num_ranks):
        for idx in range(width):
            expert = table[rank][idx]
            if expert < 0 or (quota is not None and quota[rank][idx] == 0):
                continue
            incoming[layout.master_rank(expert)].append((layout.redundant_slot_id(rank, idx), rank, expert))

    # Step 2: the k-th incoming replica lands in step k // scratch_rows.
    transfers = []
    for dst_rank, items in enumerate(incoming):
        for position, (slot_id, src_rank, expert) in enumerate(sorted(items)):
            transfers.append(
                GradReduceTransfer(position // scratch_rows, expert, src_rank, slot_id, dst_rank, position % scratch_rows)
            )
    transfers.sort(key=lambda t: (t.step, t.dst_rank, t.src_slot_id))
    num_steps = max((t.step + 1 for t in transfers), default=0)
    return GradReducePlan(tuple(transfers), num_steps, scratch_rows, layout.num_ranks)


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
    """Run ``reduce_plan`` on this rank: send replica gradients, add received ones into master gradients.

    reduce_plan: from :func:`plan_grad_reduce`; every rank of ``group`` passes the same plan.
    replica_grad_buffer: [redundant_slots_per_rank, spec.numel] tensor on this rank. Row ``j`` contains the
      gradient of redundant slot ``j``; only rows named as sources in the plan are read. Every row is
      zero when this returns, ready for the next layer.
    master_grads: per weight tensor, ``[experts_per_rank, *shape]``, same dtype and device as the
      buffer; received gradients are added in place, per expert in ascending replica slot id. May be
      ``None`` when no transfer targets this rank.
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
    if master_grads is None and any(t.dst_rank == rank for t in reduce_plan.transfers):
        raise ValueError(f"master_grads is None but the plan sends replica gradients to rank {rank}")
    scratch_views = spec.row_views(scratch) if reduce_plan.num_steps else ()
    bytes_sent = 0

    for step in range(reduce_plan.num_steps):
        # Step 1: post this step's sends and receives; tags are positions in the shared list.
        ops, peers, arrivals = [], [], []
        for tag, transfer in enumerate((t for t in reduce_plan.transfers if t.step == step), start=1):
            if transfer.src_rank == rank:
                row = transfer.src_slot_id % layout.slots_per_rank - layout.experts_per_rank
                tensor = replica_grad_buffer[row]
                ops.append(dist.P2POp(dist.isend, tensor, group=group, tag=tag, group_peer=transfer.dst_rank))
                peers.append(transfer.dst_rank)
                bytes_sent += tensor.numel() * tensor.element_size()
            elif transfer.dst_rank == rank:
                ops.append(dist.P2POp(dist.irecv, scratch[transfer.scratch_row], group=group, tag=tag, group_peer=transfer.src_rank))
                peers.append(transfer.src_rank)
                arrivals.append(transfer)
        if not ops:
            continue
        exchange(
            ops,
            timeout=timeout,
            description=f"{description}, step {step + 1} of {reduce_plan.num_steps}",
            rank=rank,
            peer_ranks=peers,
        )

        # Step 2: add in ascending replica slot id; arrivals keep the plan's order.
        for transfer in arrivals:
            local_idx = transfer.expert_id % layout.experts_per_rank
            for master_grad, view in zip(master_grads, scratch_views, strict=True):
                master_grad[local_idx].add_(view[transfer.scratch_row])

    replica_grad_buffer.zero_()
    return bytes_sent
