"""Weight sync: fill redundant slots with the planned experts' weights from their master ranks.

Two parts, kept apart so the first can be tested on one process:

- :func:`plan_weight_sync` is pure: from the plan's placement and which redundant slots already hold
  current weights, it lists every transfer as (step, source slot, destination slot, chunk). In
  ``direct`` mode each master sends every copy itself. In ``relay`` mode an expert with several
  receivers is copied along a :class:`~ultraep.comm.relay.RelayTree`: the master sends chunk ``c`` to
  the first level in step ``c``, and a receiver at level ``L`` gets it in step ``c + L - 1``, so
  forwarding overlaps with receiving. ``auto`` relays only the experts whose master rank would
  otherwise send more copies than the busiest receiver takes in. With ``pipeline=True`` every copy,
  relayed or not, goes chunk by chunk, so a receiver can compute with the first chunks while later
  ones arrive.
- :func:`execute_weight_sync` runs one plan with ``torch.distributed`` point-to-point operations, one
  ``batch_isend_irecv`` per step, on any backend that supports them (gloo on CPU, NCCL on GPUs).

One expert's weights are several tensors (for a SwiGLU expert: gate, up and down projections).
:class:`WeightSpec` packs them one after another into a flat row, so each redundant slot is one row
of a ``[redundant_slots_per_rank, numel]`` buffer. Chunk ``c`` of ``n`` is the same block of rows
(first dimension, :func:`chunk_bounds`) of every weight tensor. For a SwiGLU expert whose three
weights all have the intermediate dimension first, chunk ``c`` is a slice of the intermediate
dimension, so its share of the gate and up projections can run before later chunks arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ultraep.comm.relay import copy_edges, plan_relay_trees
from ultraep.layout import ExpertLayout

__all__ = [
    "SYNC_MODES",
    "CommunicationError",
    "SyncPlan",
    "SyncTransfer",
    "WeightSpec",
    "check_replica_placement",
    "chunk_bounds",
    "communication_errors",
    "exchange",
    "execute_weight_sync",
    "plan_weight_sync",
    "wait_all",
]

logger = logging.getLogger(__name__)

SYNC_MODES = ("direct", "relay", "auto")
"""Weight sync modes accepted by :func:`plan_weight_sync`."""


class CommunicationError(RuntimeError):
    """A point-to-point transfer or collective failed or timed out; the message names the step and peer ranks."""


def chunk_bounds(length: int, chunk_idx: int, num_chunks: int) -> tuple[int, int]:
    """Return rows ``[start, end)`` of chunk ``chunk_idx`` when ``length`` rows are split into ``num_chunks``.

    length >= 0, num_chunks >= 1, 0 <= chunk_idx < num_chunks. Chunks differ in size by at most one row
    and may be empty when ``length < num_chunks``. Both ends of a weight sync and
    :class:`~ultraep.runtime.MoELayer`'s chunked replica compute use this split.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
    if isinstance(chunk_idx, bool) or not isinstance(chunk_idx, int) or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be an int in [0, {num_chunks - 1}], got {chunk_idx!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    return chunk_idx * length // num_chunks, (chunk_idx + 1) * length // num_chunks


# ----------------------------------------------------------------------------------------------
# Packing one expert's weights into a flat row.


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Shapes of one expert's weight tensors, packed one after another into a flat row.

    Example for a SwiGLU expert with ``hidden_size=4`` and ``ffn_hidden_size=8``, each weight
    ``(ffn, hidden)`` as ``swiglu_weight_shapes`` gives them, so a chunk of first-dimension rows is a
    slice of the intermediate dimension::

        spec = WeightSpec(((8, 4), (8, 4), (8, 4)))   # gate, up, down
        spec.numels  == (32, 32, 32)
        spec.offsets == (0, 32, 64)
        spec.numel   == 96
        spec.chunk_segments(1, 2) == [(0, 16, 32), (1, 16, 32), (2, 16, 32)]   # rows 4..7 of each
    """

    shapes: tuple[tuple[int, ...], ...]
    """Per weight tensor, its shape for one expert (without the leading slot dim)."""

    def __post_init__(self) -> None:
        if isinstance(self.shapes, torch.Tensor) or not isinstance(self.shapes, Sequence) or len(self.shapes) == 0:
            raise ValueError(f"WeightSpec.shapes must be a non-empty sequence of shapes, got {self.shapes!r}")
        normalized = []
        for idx, shape in enumerate(self.shapes):
            if isinstance(shape, int) or not isinstance(shape, Sequence):
                raise TypeError(f"WeightSpec.shapes[{idx}] must be a sequence of ints, got {shape!r}")
            dims = tuple(shape)
            if not dims:
                raise ValueError(f"WeightSpec.shapes[{idx}] is empty (a 0-d tensor); give each weight at least one dim, e.g. (1,)")
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
                raise ValueError(f"WeightSpec.shapes[{idx}] must hold positive ints, got {shape!r}")
            normalized.append(dims)
        object.__setattr__(self, "shapes", tuple(normalized))

    @property
    def numels(self) -> tuple[int, ...]:
        """Elements of each weight tensor of one expert."""
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each weight tensor inside the flat row."""
        starts, total = [], 0
        for numel in self.numels:
            starts.append(total)
            total += numel
        return tuple(starts)

    @property
    def numel(self) -> int:
        """Elements of one expert's weights: the length of one flat row."""
        return sum(self.numels)

    def row_views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return per weight tensor a view ``[num_rows, *shape]`` of ``buffer``.

        buffer: [num_rows, numel] tensor, any dtype and device; row ``j`` contains one expert's weights.
        The views share memory with ``buffer``; writing them writes the rows.
        """
        if buffer.dim() != 2 or buffer.shape[1] != self.numel:
            raise ValueError(
                f"buffer must have shape [num_rows, {self.numel}] for {self}, got {list(buffer.shape)}"
            )
        views = []
        for shape, offset, numel in zip(self.shapes, self.offsets, self.numels, strict=True):
            views.append(buffer[:, offset : offset + numel].unflatten(1, shape))  # [num_rows, *shape]
        return tuple(views)

    def chunk_segments(self, chunk_idx: int, num_chunks: int) -> list[tuple[int, int, int]]:
        """Return the pieces of chunk ``chunk_idx`` of ``num_chunks``: rows :func:`chunk_bounds` of every weight tensor.

        Returns (weight_idx, begin, end) triples with ``begin``/``end`` counted inside weight tensor
        ``weight_idx`` (flattened, so a block of first-dimension rows is one contiguous range); empty
        pieces are left out. Both ends of a transfer use this split, so their messages match one to one,
        and the chunks of one row cover it exactly once.
        """
        pieces = []
        for weight_idx, (shape, numel) in enumerate(zip(self.shapes, self.numels, strict=True)):
            row_numel = numel // shape[0]
            first, last = chunk_bounds(shape[0], chunk_idx, num_chunks)
            if first < last:
                pieces.append((weight_idx, first * row_numel, last * row_numel))
        return pieces

    def check_master_weights(self, master_weights: Sequence[torch.Tensor], experts_per_rank: int) -> None:
        """Raise ``ValueError``/``TypeError`` unless ``master_weights`` match this spec.

        master_weights: per weight tensor, ``[experts_per_rank, *shape]``; all share one dtype and device.
        """
        if isinstance(master_weights, torch.Tensor) or not isinstance(master_weights, Sequence):
            raise TypeError(f"master_weights must be a sequence of tensors, got {type(master_weights).__name__}")
        if len(master_weights) != len(self.shapes):
            raise ValueError(
                f"master_weights has {len(master_weights)} tensors but the weight spec has {len(self.shapes)} "
                f"shapes {list(self.shapes)}; pass one tensor per expert weight, in spec order"
            )
        first = master_weights[0]
        for idx, (weight, shape) in enumerate(zip(master_weights, self.shapes, strict=True)):
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"master_weights[{idx}] must be a torch.Tensor, got {type(weight).__name__}")
            expected = (experts_per_rank, *shape)
            if tuple(weight.shape) != expected:
                raise ValueError(
                    f"master_weights[{idx}] must have shape [experts_per_rank, *shape] = {list(expected)}, "
                    f"got {list(weight.shape)}"
                )
            if weight.dtype != first.dtype or weight.device != first.device:
                raise TypeError(
                    f"master_weights[{idx}] is {weight.dtype} on {weight.device} but master_weights[0] is "
                    f"{first.dtype} on {first.device}; all expert weights of a layer share one dtype and device"
                )


# ----------------------------------------------------------------------------------------------
# Transfer planning (pure).


@dataclasses.dataclass(frozen=True)
class SyncTransfer:
    """One chunk of one expert's weights sent from one slot to a redundant slot on another rank."""

    step: int
    """Step of the schedule; all transfers of a step run in one ``batch_isend_irecv``."""
    expert_id: int
    """Logical expert whose weights move."""
    src_rank: int
    """Sending rank."""
    src_slot_id: int
    """Physical slot id read on ``src_rank``: the expert's master slot, or a relay's redundant slot."""
    dst_rank: int
    """Receiving rank."""
    dst_slot_id: int
    """Physical slot id of the redundant slot written on ``dst_rank``."""
    chunk_idx: int
    """Chunk of the weight row, ``0 .. num_chunks-1``; see :meth:`WeightSpec.chunk_segments`."""


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    """Every transfer of one weight sync, in the order both ends post them.

    Example: 2 ranks, 2 experts per rank, 1 redundant slot per rank (slots per rank = 3), and the
    plan puts a replica of expert 0 (master slot 0 on rank 0) in rank 1's redundant slot 5::

        transfers = (SyncTransfer(step=0, expert_id=0, src_rank=0, src_slot_id=0,
                                  dst_rank=1, dst_slot_id=5, chunk_idx=0),)
        num_steps = 1, num_chunks = 1, relay_expert_ids = ()
    """

    transfers: tuple[SyncTransfer, ...]
    """Sorted by (step, src_rank, dst_rank, dst_slot_id, chunk_idx)."""
    num_steps: int
    """Steps of the schedule (0 when nothing moves)."""
    num_chunks: int
    """Chunks each copy is split into (:meth:`WeightSpec.chunk_segments`); 1 unless some expert is
    relayed or the plan was made with ``pipeline=True``."""
    relay_expert_ids: tuple[int, ...]
    """Logical experts copied through relays, ascending."""
    num_ranks: int
    """Ranks of the EP group the plan is for."""
    depth: int = 1
    """Levels of the deepest relay tree; 1 when every copy comes straight from its master."""

    @property
    def num_copies(self) -> int:
        """Redundant slots that receive weights."""
        return len({t.dst_slot_id for t in self.transfers})

    def elements_moved(self, numel: int) -> int:
        """Return the elements all transfers move together, for flat weight rows of ``numel`` elements.

        Every receiving slot gets every chunk of its row once, so this is ``num_copies * numel``.
        """
        return self.num_copies * numel

    def ready_step(self, chunk_idx: int) -> int:
        """Return the step after which chunk ``chunk_idx`` is in every receiving slot.

        A direct copy sends chunk ``c`` in step ``c``; a receiver at level ``L`` of a relay tree gets it
        in step ``c + L - 1``, so the deepest level sets the step.
        """
        if not 0 <= chunk_idx < self.num_chunks:
            raise ValueError(f"chunk_idx must be in [0, {self.num_chunks - 1}], got {chunk_idx!r}")
        return chunk_idx + self.depth - 1

    def copies_sent_per_rank(self) -> list[float]:
        """Return per rank the expert copies it sends (chunks / num_chunks)."""
        sent = [0] * self.num_ranks
        for t in self.transfers:
            sent[t.src_rank] += 1
        return [count / self.num_chunks for count in sent]

    def copies_received_per_rank(self) -> list[float]:
        """Return per rank the expert copies it receives (chunks / num_chunks)."""
        received = [0] * self.num_ranks
        for t in self.transfers:
            received[t.dst_rank] += 1
        return [count / self.num_chunks for count in received]

    def link_time(self) -> float:
        """Estimate the schedule's time in units of one expert copy over one rank's link.

        Each step takes as long as its busiest rank, counting a rank's sends and receives apart
        (full-duplex links); per-message latency is ignored.
        """
        total = 0.0
        for step in range(self.num_steps):
            sent = [0] * self.num_ranks
            received = [0] * self.num_ranks
            for t in self.transfers:
                if t.step == step:
                    sent[t.src_rank] += 1
                    received[t.dst_rank] += 1
            total += max(max(sent), max(received)) / self.num_chunks
        return total


def _as_int_table(value, name: str, num_ranks: int, width: int, *, boolean: bool = False) -> list[list[int]]:
    """Read a [num_ranks, width] tensor or nested sequence into lists of Python ints."""
    if isinstance(value, torch.Tensor):
        if boolean and value.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got dtype {value.dtype}")
        if not boolean and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        if tuple(value.shape) != (num_ranks, width):
            raise ValueError(f"{name} must have shape [num_ranks, redundant_slots_per_rank] = [{num_ranks}, {width}], got {list(value.shape)}")
        return [[int(v) for v in row] for row in value.cpu().tolist()]
    rows = [list(row) for row in value]
    if len(rows) != num_ranks or any(len(row) != width for row in rows):
        raise ValueError(
            f"{name} must have shape [num_ranks, redundant_slots_per_rank] = [{num_ranks}, {width}], "
            f"got {len(rows)} rows of lengths {[len(row) for row in rows]}"
        )
    return [[int(v) for v in row] for row in rows]


def check_replica_placement(layout: ExpertLayout, replica_expert_ids) -> list[list[int]]:
    """Validate a placement and return it as lists of ints.

    replica_expert_ids: [num_ranks, redundant_slots_per_rank] int tensor (any device, read on the host)
      or nested sequence. Logical expert held by each redundant slot; -1 = empty.
    Raises ``ValueError`` for ids outside ``[-1, num_experts)``, a replica on its expert's master rank,
    or two replicas of one expert on one rank.
    """
    table = _as_int_table(replica_expert_ids, "replica_expert_ids", layout.num_ranks, layout.redundant_slots_per_rank)
    for rank, row in enumerate(table):
        seen = set()
        for idx, expert in enumerate(row):
            if not -1 <= expert < layout.num_experts:
                raise ValueError(
                    f"replica_expert_ids[{rank}][{idx}] = {expert} is outside [-1, {layout.num_experts - 1}]; "
                    "use -1 for an empty redundant slot"
                )
            if expert < 0:
                continue
            if layout.master_rank(expert) == rank:
                raise ValueError(
                    f"replica_expert_ids[{rank}][{idx}] = {expert} puts a replica on the expert's master rank "
                    f"{rank}; a rank may contain at most one instance of an expert"
                )
            if expert in seen:
                raise ValueError(
                    f"replica_expert_ids puts two replicas of expert {expert} on rank {rank}; a rank may contain at "
                    "most one instance of an expert"
                )
            seen.add(expert)
    return table


def plan_weight_sync(
    layout: ExpertLayout,
    replica_expert_ids,
    *,
    needs_copy=None,
    mode: str = "direct",
    num_chunks: int = 4,
    pipeline: bool = False,
) -> SyncPlan:
    """List the transfers that fill redundant slots with their planned experts' weights. Pure, no communication.

    layout: the expert layout.
    replica_expert_ids: [num_ranks, redundant_slots_per_rank] int tensor (any device, read on the host)
      or nested sequence of ints. Logical expert of each redundant slot (``Plan.replica_expert_ids``);
      -1 = empty.
    needs_copy: [num_ranks, redundant_slots_per_rank] bool tensor or nested sequence, or ``None``.
      Slots that must receive weights; ``False`` for a slot that already contains the expert's current
      weights or whose replica has quota 0. ``None`` means every non-empty slot.
    mode: ``"direct"``, ``"relay"`` or ``"auto"`` (see the module docstring).
    num_chunks: chunks per copy when some expert is relayed or ``pipeline`` is set (>= 1).
    pipeline: send every copy in ``num_chunks`` chunks, chunk ``c`` in step ``c``, so receivers can
      use a chunk before the next arrives (:meth:`SyncPlan.ready_step`). Without it a plan without
      relays uses one chunk and one step.

    Every rank that calls this with the same arguments gets the same plan.
    """
    if mode not in SYNC_MODES:
        raise ValueError(f"mode must be one of {SYNC_MODES}, got {mode!r}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
    if not isinstance(pipeline, bool):
        raise TypeError(f"pipeline must be a bool, got {pipeline!r} ({type(pipeline).__name__})")
    table = check_replica_placement(layout, replica_expert_ids)
    width = layout.redundant_slots_per_rank
    if needs_copy is None:
        copy_table = [[expert >= 0 for expert in row] for row in table]
    else:
        copy_table = [[bool(v) for v in row] for row in _as_int_table(needs_copy, "needs_copy", layout.num_ranks, width, boolean=True)]

    # Step 1: receivers of each expert in ascending slot id order.
    receivers: dict[int, list[tuple[int, int]]] = {}
    for rank in range(layout.num_ranks):
        for idx in range(width):
            expert = table[rank][idx]
            if expert >= 0 and copy_table[rank][idx]:
                receivers.setdefault(expert, []).append((rank, layout.redundant_slot_id(rank, idx)))

    # Step 2: relay trees (see :func:`~ultraep.comm.relay.plan_relay_trees`).
    trees = plan_relay_trees(layout, receivers, mode, num_chunks)

    # Step 3: transfers. A receiver at level L of its tree gets chunk c in step c + L - 1, so a relay
    # forwards chunk c while chunk c + 1 arrives. Direct copies use the same chunk steps.
    chunks = num_chunks if trees or pipeline else 1
    depth = max((tree.depth for tree in trees.values()), default=1)
    transfers = []
    for expert, slots in receivers.items():
        edges = copy_edges(layout, expert, slots, trees.get(expert))
        for chunk in range(chunks):
            for level, (src_rank, src_slot), (dst_rank, dst_slot) in edges:
                transfers.append(SyncTransfer(chunk + level - 1, expert, src_rank, src_slot, dst_rank, dst_slot, chunk))
    transfers.sort(key=lambda t: (t.step, t.src_rank, t.dst_rank, t.dst_slot_id, t.chunk_idx))
    num_steps = chunks + depth - 1 if transfers else 0
    return SyncPlan(tuple(transfers), num_steps, chunks, tuple(sorted(trees)), layout.num_ranks, depth)


# ----------------------------------------------------------------------------------------------
# Execution.


@contextlib.contextmanager
def communication_errors(description: str, *, rank: int, peer_ranks: Sequence[int]):
    """Turn a ``RuntimeError`` from ``torch.distributed`` inside the block into :class:`CommunicationError`.

    description: what runs, for example ``"weight sync (forward) of layer 3 microbatch 0, step 1 of 5"``.
    peer_ranks: ranks this rank exchanges data with in the block, named in the error.
    Wrap only the ``torch.distributed`` calls (posting and waiting): gloo raises on a closed
    connection while posting, and both gloo and NCCL raise ``RuntimeError`` subclasses on timeouts.
    """
    try:
        yield
    except CommunicationError:
        raise
    except RuntimeError as err:
        peers = sorted(set(peer_ranks))
        logger.error("%s failed on rank %d (peers %s): %s", description, rank, peers, err)
        raise CommunicationError(
            f"{description} failed on rank {rank} while exchanging data with ranks {peers}: {err}. Check that "
            "every rank runs the same layers and microbatches in the same order; if a peer is only slow, "
            "raise the timeout"
        ) from err


def wait_all(works: Sequence, timeout: datetime.timedelta | None) -> None:
    """Wait for every work handle; ``timeout=None`` waits as long as the process group's own timeout."""
    for work in works:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)


def exchange(
    ops: Sequence[dist.P2POp],
    *,
    timeout: datetime.timedelta | None,
    description: str,
    rank: int,
    peer_ranks: Sequence[int],
) -> None:
    """Post ``ops`` as one ``batch_isend_irecv`` and wait for all of them; failures raise :class:`CommunicationError`."""
    with communication_errors(description, rank=rank, peer_ranks=peer_ranks):
        wait_all(dist.batch_isend_irecv(list(ops)), timeout)


def _step_pieces(transfers: Sequence, num_steps: int, spec: WeightSpec, num_chunks: int) -> list[list[tuple]]:
    """Split a schedule's transfers into the pieces each step sends, in the order both ends post them.

    transfers: objects with ``step`` and ``chunk_idx`` fields, such as :class:`SyncTransfer`.
    Returns per step a list of ``(tag, transfer, weight_idx, begin, end)``: one piece per segment of
    the transfer's chunk (:meth:`WeightSpec.chunk_segments`), tagged 1, 2, ... in transfer order.
    Every rank derives the same list from the same plan, so a piece's tag matches on both ends.
    """
    pieces: list[list[tuple]] = [[] for _ in range(num_steps)]
    for transfer in transfers:
        step = pieces[transfer.step]
        for weight_idx, begin, end in spec.chunk_segments(transfer.chunk_idx, num_chunks):
            step.append((len(step) + 1, transfer, weight_idx, begin, end))
    return pieces


def _flat_source(
    slot_id: int,
    layout: ExpertLayout,
    master_weights: Sequence[torch.Tensor],
    replica_views: Sequence[torch.Tensor],
    weight_idx: int,
) -> torch.Tensor:
    """Return the flattened weight tensor ``weight_idx`` of the instance in ``slot_id`` on this rank."""
    local_idx = slot_id % layout.slots_per_rank
    if local_idx < layout.experts_per_rank:
        return master_weights[weight_idx].detach()[local_idx].reshape(-1)
    return replica_views[weight_idx][local_idx - layout.experts_per_rank].reshape(-1)


def execute_weight_sync(
    sync_plan: SyncPlan,
    *,
    layout: ExpertLayout,
    spec: WeightSpec,
    rank: int,
    master_weights: Sequence[torch.Tensor],
    replica_buffer: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    timeout: datetime.timedelta | None = None,
    description: str = "weight sync",
    on_step: Callable[[int], None] | None = None,
) -> int:
    """Run ``sync_plan`` on this rank: send from master slots and relays, receive into redundant slots.

    sync_plan: from :func:`plan_weight_sync`; every rank of ``group`` passes the same plan.
    rank: this rank's index in ``group``.
    master_weights: per weight tensor, ``[experts_per_rank, *shape]`` on this rank, one dtype and device;
      read only (sends use ``detach()``).
    replica_buffer: [redundant_slots_per_rank, spec.numel] tensor, same dtype and device as
      ``master_weights``. Row ``j`` is redundant slot ``j`` of this rank; received rows are written in place.
    timeout: per step; ``None`` uses the process group's timeout.
    description: names the layer and microbatch in errors.
    on_step: called with the step index once this rank's transfers of that step have finished (also
      for steps in which it has none), in step order; with :meth:`SyncPlan.ready_step` it tells when a
      chunk can be read.
    Returns the bytes this rank sent.

    Collective: every rank in ``group`` must call this with the same plan. With 2 ranks, 2 experts per
    rank, 1 redundant slot per rank and a replica of expert 0 on rank 1: rank 0 passes its masters and
    gets its buffer unchanged; rank 1 passes its masters and gets row 0 of its buffer = expert 0's
    weights (master row 0 of rank 0, flattened and packed by ``spec``).

    Raises :class:`CommunicationError` naming the step and the peer ranks when a transfer fails or times out.
    """
    if rank < 0 or rank >= layout.num_ranks:
        raise ValueError(f"rank={rank} is outside [0, {layout.num_ranks - 1}]")
    expected = (layout.redundant_slots_per_rank, spec.numel)
    if tuple(replica_buffer.shape) != expected:
        raise ValueError(f"replica_buffer must have shape {list(expected)}, got {list(replica_buffer.shape)}")
    replica_views = spec.row_views(replica_buffer)
    flat_rows = replica_buffer.view(expected)
    bytes_sent = 0

    schedule = _step_pieces(sync_plan.transfers, sync_plan.num_steps, spec, sync_plan.num_chunks)
    for step, pieces in enumerate(schedule):
        # Both ends post the same pieces in the same order, so tags and message order agree.
        ops, peers = [], []
        for tag, transfer, weight_idx, begin, stop in pieces:
            if transfer.src_rank == rank:
                source = _flat_source(transfer.src_slot_id, layout, master_weights, replica_views, weight_idx)
                tensor = source[begin:stop]
                ops.append(dist.P2POp(dist.isend, tensor, group=group, tag=tag, group_peer=transfer.dst_rank))
                peers.append(transfer.dst_rank)
                bytes_sent += tensor.numel() * tensor.element_size()
            elif transfer.dst_rank == rank:
                row = transfer.dst_slot_id % layout.slots_per_rank - layout.experts_per_rank
                offset = spec.offsets[weight_idx]
                tensor = flat_rows[row, offset + begin : offset + stop]
                ops.append(dist.P2POp(dist.irecv, tensor, group=group, tag=tag, group_peer=transfer.src_rank))
                peers.append(transfer.src_rank)
        if ops:
            exchange(
                ops,
                timeout=timeout,
                description=f"{description}, step {step + 1} of {sync_plan.num_steps}",
                rank=rank,
                peer_ranks=peers,
            )
        if on_step is not None:
            on_step(step)
    return bytes_sent
