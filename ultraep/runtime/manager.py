"""The replica manager: owns the redundant-slot buffers and runs every phase of balancing per layer.

One :class:`ReplicaManager` serves all MoE layers of a model on one rank. It allocates once:

- ``replica_weights`` [num_buffer_sets, redundant_slots_per_rank, numel]: weights of the replicas in
  this rank's redundant slots, one flat row per slot (packed by :class:`~ultraep.comm.WeightSpec`).
  By default one set serves every layer (``num_buffer_sets`` = 1); with
  ``ManagerConfig.buffer_layers = N`` each of the layers 0..N-1 keeps its own set, so the backward
  finds the layer's replicas still in place and a replica that stays on the same rank in the next
  microbatch is not copied again while the weights are unchanged;
- ``replica_grads`` [redundant_slots_per_rank, numel]: their gradients, zero between layers;
- ``reduce_scratch`` [redundant_slots_per_rank, numel]: where a master or relay rank receives replica
  gradients, up to ``redundant_slots_per_rank`` pieces of each chunk per grad reduce step.

Per layer and microbatch the state (plan, load matrix, weight versions) is kept under the key
``(layer_id, microbatch_id)`` from the forward until grad reduce, so several microbatches can be in
flight at once (pipeline parallelism).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import hashlib
import logging
import numbers
import threading
import time
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from ultraep.comm import (
    SYNC_MODES,
    CommunicationError,
    SyncPlan,
    WeightSpec,
    execute_weight_sync,
    plan_grad_reduce,
    plan_weight_sync,
    communication_errors,
    reduce_replica_grads,
    wait_all,
)
from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners import Planner, QuotaPlanner, masters_only_plan
from ultraep.planners.quota import QuotaConfig
from ultraep.reroute import count_local_load, reroute, source_quota
from ultraep.runtime.replicate import Replicate, ResyncOnBackward
from ultraep.runtime.slot_cache import cached_slot_order

__all__ = ["LayerStats", "ManagerConfig", "RankAgreementError", "ReplicaManager", "Routing"]

logger = logging.getLogger(__name__)

# Words appended to each rank's load row in the one all-gather of ``route``.
_CONFIG_WORD, _CALL_WORD, _CACHE_WORD, _VERSION_WORD, _STATUS_WORD = range(5)
# torch.optim steps taken in this process. A fused step changes the weights without changing their
# _version, so the weight version counts steps too: after any optimizer step no cached replica is reused.
_optimizer_steps = 0
_optimizer_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _watch_optimizer_steps() -> None:
    """Register the process-wide optimizer step counter once."""
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def _inside_backward() -> bool:
    """Return whether the calling thread runs inside an autograd backward (False where torch cannot tell)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# The longest ManagerConfig.timeout_s, about 31 years; datetime.timedelta overflows far above it.
_MAX_TIMEOUT_S = 1e9
_NUM_EXTRA_WORDS = 5
# Status word values: the rank's own input checks passed, or failed (the rank raises the details).
_STATUS_OK, _STATUS_REJECTED = 0, 1


class RankAgreementError(RuntimeError):
    """Ranks disagree (configuration, call order, load matrix, plan) or one rank rejected its input.

    Raised on every rank with the same message, which names the ranks that differ.
    """


@dataclasses.dataclass(frozen=True)
class ManagerConfig:
    """Settings of the replica manager; every rank must use the same values."""

    sync_mode: str = "auto"
    """Weight sync and grad reduce mode. ``"direct"``: masters send every copy and receive every replica
    gradient. ``"relay"``: experts with several replicas go through relay trees, whose ranks forward
    copies and add up gradients. ``"auto"``: relay only where a master rank's fan-out exceeds the
    busiest receiver's intake."""
    num_chunks: int = 4
    """Chunks per expert copy or gradient row when relaying (relays forward chunk ``c`` while chunk
    ``c + 1`` arrives) and, with ``pipeline_replicas``, for every forward copy."""
    check_plans: bool = True
    """After planning, all-gather a fingerprint of the plan and the load matrix (2 int64 per rank)
    and raise on every rank if any rank differs. One small collective per layer and microbatch;
    turn off only once the planner is trusted to be deterministic."""
    check_values: bool = True
    """Check ``topk_ids`` values (range) on the host before counting."""
    reuse_cached_weights: bool = True
    """Skip copying into a redundant slot that already contains the same layer's expert at the same
    weight version. With two or more redundant slots per rank, a rank's planned replicas are also
    placed in the slots that contain their weights, and new ones in the least recently used free
    slots (:func:`~ultraep.runtime.slot_cache.cached_slot_order`). That changes no rank load. A
    layer's version changes when its master weights get an in-place update visible to autograd, when
    they accumulate a gradient, or on :meth:`ReplicaManager.invalidate_cached_weights`."""
    plan_with_resident: bool = False
    """Give the planner, a :class:`~ultraep.planners.quota.QuotaPlanner`, the table of experts whose
    current weights the layer's redundant slots already contain (its ``resident`` argument). It then
    also tries plans that keep replicas where their weights are, counts no copy for them, and among
    equally good plans keeps the one with the fewest copies. So a hot expert that stays hot mostly
    stays where its weights are. This pays in inference with per-layer buffers (``buffer_layers``).
    In training each backward that accumulates gradients changes the weight version, so after it the
    table is empty. Needs ``reuse_cached_weights``. The table is built on the host in every call (about
    50 us at 64 ranks x 4 slots on the development CPU)."""
    timeout_s: float | None = None
    """Seconds to wait for one step of weight sync, grad reduce or the all-gathers before raising
    :class:`~ultraep.comm.CommunicationError`; ``None`` uses the process group's timeout."""
    buffer_layers: int = 0
    """0: one set of redundant-slot weight buffers shared by every layer, the least memory; the
    backward re-syncs a layer's replicas because later layers overwrote them. N > 0: one set per layer
    for layer ids 0..N-1 (N times the memory): the backward re-sync finds the replicas in place and
    copies nothing, and with ``reuse_cached_weights`` a slot that contains the same expert at the same
    weight version in the next microbatch (inference) is not copied again. A backward that accumulates
    into the masters' gradients changes the version, so training microbatches copy again."""
    overlap_sync: bool = False
    """Run the forward weight sync on a background thread over a second process group, so it overlaps
    the dispatch all-to-all and the master experts' compute. Code that reads replica weights calls
    :meth:`ReplicaManager.wait_replicas` first, as :class:`~ultraep.runtime.MoELayer` does. The backward
    re-sync and the grad reduce stay on the calling thread.

    NOTE: tested with gloo on CPU only. With NCCL the copies are queued on the sync thread's CUDA
    stream, and nothing here yet makes the compute stream wait for that stream."""
    pipeline_replicas: bool = False
    """With ``overlap_sync``: send every forward copy in ``num_chunks`` chunks, one chunk per step. A
    chunk is the same block of first-dimension rows of each weight tensor. Replicas then compute chunk
    by chunk as the chunks arrive (:meth:`ReplicaManager.wait_replicas` with ``chunk``), so a replica's
    compute overlaps its own copy. :class:`~ultraep.runtime.MoELayer` runs a replica's gate and up
    projections chunk by chunk (a chunk is a block of intermediate rows) and its down projection once
    the copy is complete. The chunked GEMMs may round differently from whole ones, so outputs match
    the unchunked path to float rounding; tested with gloo on CPU, like ``overlap_sync``."""
    overlap_grad_reduce: bool = False
    """Run grad reduce on the background thread after the layer's backward, so it overlaps the backward
    of the layers below. The reduced gradients are added to the master weights' ``.grad`` when the
    backward pass ends (an autograd end-of-backward callback), in layer order. Needs leaf master
    weights that require grad; other layers reduce on the calling thread. Tested with gloo on CPU.

    NOTE: the reduced part reaches only ``.grad``, so ``torch.autograd.grad`` (which returns gradients
    instead of accumulating them) misses it; use ``backward()`` with this setting. For the same reason
    a master's ``register_post_accumulate_grad_hook`` (gradient bucketing, optimizer-in-backward,
    gradient-norm hooks) runs before the replica part is added; read ``.grad`` after ``backward()``
    returns instead. If a backward raises, call ``release_all()`` on every rank: it drops that
    backward's queued reduces, so the next backward starts clean."""
    record_timings: bool = False
    """Record host wall time of each phase per layer in ``ReplicaManager.timings[phase][layer_id]``
    (phases ``count``, ``gather``, ``plan``, ``plan_check``, ``reroute``, ``sync_forward``,
    ``sync_backward``, ``reduce``; with the background thread also ``sync_wait``, one entry per layer
    and microbatch that adds up its chunk waits, and ``reduce_wait``). Synchronizes CUDA around each
    phase, so only for profiling."""

    def __post_init__(self) -> None:
        if self.sync_mode not in SYNC_MODES:
            raise ValueError(f"ManagerConfig.sync_mode must be one of {SYNC_MODES}, got {self.sync_mode!r}")
        # At most 1024, the most QuotaConfig.relay_chunks and copy_chunks take, so a planner can model any setting.
        if isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int) or not 1 <= self.num_chunks <= 1024:
            raise ValueError(f"ManagerConfig.num_chunks must be an int in [1, 1024], got {self.num_chunks!r}")
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, numbers.Real)
            or not 0 < self.timeout_s <= _MAX_TIMEOUT_S
        ):
            raise ValueError(
                f"ManagerConfig.timeout_s must be None or a number of seconds in (0, {_MAX_TIMEOUT_S:g}], got {self.timeout_s!r}"
            )
        for name in ("overlap_sync", "overlap_grad_reduce", "pipeline_replicas", "check_plans", "check_values", "record_timings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ManagerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.pipeline_replicas and self.num_chunks < 2:
            raise ValueError(
                f"ManagerConfig.pipeline_replicas=True needs num_chunks >= 2 to split the copies, got num_chunks={self.num_chunks}"
            )
        if self.pipeline_replicas and not self.overlap_sync:
            raise ValueError(
                "ManagerConfig.pipeline_replicas=True needs overlap_sync=True: chunks can only be used while later "
                "ones arrive when the sync runs in the background"
            )
        for name in ("reuse_cached_weights", "plan_with_resident"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ManagerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.plan_with_resident and not self.reuse_cached_weights:
            raise ValueError(
                "ManagerConfig.plan_with_resident=True needs reuse_cached_weights=True: without it every replica is "
                "copied, so none is resident; set reuse_cached_weights=True or plan_with_resident=False"
            )
        if isinstance(self.buffer_layers, bool) or not isinstance(self.buffer_layers, int) or self.buffer_layers < 0:
            raise ValueError(
                f"ManagerConfig.buffer_layers must be an int >= 0 (0 = one buffer set shared by all layers, "
                f"N = one set for each of the layers 0..N-1), got {self.buffer_layers!r}"
            )


@dataclasses.dataclass(frozen=True)
class Routing:
    """Result of :meth:`ReplicaManager.route` for one layer and microbatch on this rank.

    Example with 2 ranks, 2 experts per rank and 1 redundant slot per rank (3 slots per rank), seen
    on rank 0. Rank 0 sent 3 assignments to its own slots and 1 to rank 1, and received 2 from rank 1::

        send_counts      = (3, 1)            # to rank 0, to rank 1
        recv_counts      = (3, 2)            # from rank 0, from rank 1
        recv_slot_counts = [[2, 1, 0],       # from rank 0 into slots 0, 1, 2 of rank 0
                            [0, 0, 2]]       # from rank 1: both go to rank 0's redundant slot
    """

    layer_id: int
    """Layer the routing is for."""
    microbatch_id: int
    """Microbatch the routing is for."""
    balance: bool
    """False when the masters-only plan was used."""
    plan: Plan
    """The plan, identical on every rank."""
    loads: torch.Tensor
    """[num_ranks, num_experts] int64 on the manager's device: the load matrix."""
    slot_ids: torch.Tensor
    """[num_tokens, topk] int64, same device as ``topk_ids``: physical slot id per assignment; -1 stays -1."""
    send_counts: tuple[int, ...]
    """Per destination rank, this rank's assignments sent there (all-to-all input split sizes). Entries
    of -1 in ``topk_ids`` are not counted: drop them before dispatch."""
    recv_counts: tuple[int, ...]
    """Per source rank, assignments this rank receives from it (all-to-all output split sizes)."""
    recv_slot_counts: torch.Tensor
    """[num_ranks, slots_per_rank] int64 on the host: assignments from each source rank per local slot,
    in the order they arrive (source rank, then slot)."""

    @property
    def key(self) -> tuple[int, int]:
        """``(layer_id, microbatch_id)``."""
        return (self.layer_id, self.microbatch_id)


@dataclasses.dataclass
class LayerStats:
    """Facts about the latest microbatch of one layer, identical on every rank (computed from the plans)."""

    imbalance_before: float = 1.0
    """Imbalance (max / mean rank load) of the masters-only plan."""
    imbalance_after: float = 1.0
    """Imbalance of the plan used."""
    num_replicas: int = 0
    """Redundant slots holding a replica."""
    forward_sync_bytes: int = 0
    """Bytes all ranks together sent in the forward weight sync."""
    backward_sync_bytes: int = 0
    """Bytes all ranks together sent re-syncing before the backward."""
    reduce_bytes: int = 0
    """Bytes all ranks together sent in grad reduce."""
    forward_sync_link_time: float = 0.0
    """Forward weight sync schedule's link time in expert copies (see ``SyncPlan.link_time``)."""


@dataclasses.dataclass
class _InFlight:
    """State of one layer and microbatch between its forward and its grad reduce."""

    routing: Routing
    master_weights: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]  # weight version of each rank's masters of this layer, from the all-gather
    expects_reduce: bool  # Replicate.backward will run grad reduce and release the state


class _StepProgress:
    """Steps of a background weight sync finished so far on this rank; waiters block on a condition."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._steps_done = 0
        self._stopped = False

    def step_done(self, step: int) -> None:
        with self._condition:
            self._steps_done = step + 1
            self._condition.notify_all()

    def stop(self) -> None:
        """Mark the sync as over (finished or failed), so no waiter blocks on steps that will not come."""
        with self._condition:
            self._stopped = True
            self._condition.notify_all()

    def wait(self, steps: int) -> bool:
        """Block until ``steps`` steps are done (True) or the sync stopped short of them (False)."""
        with self._condition:
            self._condition.wait_for(lambda: self._steps_done >= steps or self._stopped)
            return self._steps_done >= steps


@dataclasses.dataclass
class _PendingSync:
    """The forward weight sync running on the background thread."""

    key: tuple[int, int]
    future: concurrent.futures.Future
    sync_plan: SyncPlan
    progress: _StepProgress
    waited_s: float = 0.0  # time spent in chunk waits so far


@dataclasses.dataclass
class _LayerVersion:
    """This rank's bookkeeping behind the weight version of one layer's master weights."""

    tensors: tuple[weakref.ref, ...] = ()
    hooks: tuple = ()
    epoch: int = 0  # bumped by invalidate_cached_weights and when the tensors change
    grad_events: int = 0  # post-accumulate-grad hook calls
    volatile_calls: int = 0  # bumped every route when the weights cannot be versioned


def _digest64(*parts) -> int:
    """Return a signed 64-bit digest of the ``repr`` of ``parts``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _split_ranks(values: Sequence[int]) -> tuple[list[int], list[int]]:
    """Return (ranks holding the most common value, the other ranks); ties go to rank 0's value."""
    counts: dict[int, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    reference = max(counts, key=lambda v: (counts[v], v == values[0]))
    agree = [r for r, v in enumerate(values) if v == reference]
    return agree, [r for r, v in enumerate(values) if v != reference]


def _warn_on_copy_model_mismatch(planner: Planner, config: ManagerConfig) -> None:
    """Log a warning when a copy-cost quota planner assumes another weight sync than the manager runs."""
    quota = getattr(planner, "config", None)
    if not isinstance(quota, QuotaConfig) or quota.copy_cost == 0:
        return
    chunks = config.num_chunks if config.overlap_sync and config.pipeline_replicas else 1
    if (quota.copy_overlap, quota.copy_chunks) != (config.overlap_sync, chunks):
        logger.warning(
            "ReplicaManager: the quota planner compares plans as if copy_overlap=%s, copy_chunks=%d, but this manager "
            "runs overlap_sync=%s with %d chunk(s) per replica; build the planner with QuotaConfig(copy_overlap=%s, "
            "copy_chunks=%d) so its copy costs match",
            quota.copy_overlap, quota.copy_chunks, config.overlap_sync, chunks, config.overlap_sync, chunks,
        )
    relay_chunks = 0 if config.sync_mode == "direct" else config.num_chunks
    if quota.relay_chunks != relay_chunks:
        logger.warning(
            "ReplicaManager: the quota planner times copies with relay_chunks=%d, but this manager runs sync_mode=%r with "
            "num_chunks=%d; build the planner with QuotaConfig(relay_chunks=%d) so its copy costs match (0 means direct copies)",
            quota.relay_chunks, config.sync_mode, config.num_chunks, relay_chunks,
        )


class ReplicaManager:
    """Balances the expert-parallel MoE layers of one model on one rank.

    Phases per layer and microbatch, in order:

    1. count (:meth:`route`): this rank's load per logical expert from ``topk_ids``.
    2. gather (:meth:`route`): one all-gather of the load rows plus fingerprints of the configuration,
       the call (layer, microbatch) and the slot cache, this rank's weight version and its input status.
       Every rank then checks that all ranks agree.
    3. plan (:meth:`route`): the planner (or the masters-only plan for ``balance=False``); with
       ``check_plans`` one more small all-gather confirms that every rank computed the same plan.
    4. reroute (:meth:`route`): logical ids to physical slot ids and the all-to-all split sizes.
    5. weight sync (:meth:`replicate`, forward of :class:`~ultraep.runtime.replicate.Replicate`).
    6. re-sync (backward of :class:`~ultraep.runtime.replicate.ResyncOnBackward`, before the expert
       backward), skipped per slot when the slot still holds this layer's weights.
    7. grad reduce (backward of ``Replicate``), then the layer and microbatch's state is released.

    Every rank of the EP group must call these in the same order with the same configuration;
    disagreements are detected in phases 2 and 3 and raised on every rank as
    :class:`RankAgreementError`.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        weight_shapes: Sequence[Sequence[int]],
        *,
        planner: Planner | None = None,
        config: ManagerConfig | None = None,
        group: dist.ProcessGroup | None = None,
        sync_group: dist.ProcessGroup | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """Allocate the shared buffers.

        layout: the EP group's layout; ``num_ranks`` must equal the size of ``group``.
        weight_shapes: shape of each weight tensor of one expert, in the order layers pass their master
          weights (for SwiGLU: three ``(ffn, hidden)`` shapes, see ``swiglu_weight_shapes``); shared by all layers.
        planner: the balancing planner; ``None`` means :class:`~ultraep.planners.QuotaPlanner` defaults.
        group: the EP process group; ``None`` is the default group, which must be initialized.
        sync_group: with ``config.overlap_sync`` or ``config.overlap_grad_reduce``, a second process group
          over the same ranks in the same order, used only by the background thread. ``None`` creates one with
          ``torch.distributed.new_group``, which every process of the default group must enter, so
          build the managers on every process in the same order.
        dtype, device: of the expert weights and of every buffer.
        """
        if not isinstance(layout, ExpertLayout):
            raise TypeError(f"layout must be an ExpertLayout, got {type(layout).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized; call torch.distributed.init_process_group "
                "(gloo on CPU, nccl on GPUs) before building a ReplicaManager"
            )
        world_size = dist.get_world_size(group)
        if world_size != layout.num_ranks:
            raise ValueError(
                f"layout.num_ranks={layout.num_ranks} but the process group has {world_size} ranks; build the "
                "layout with ExpertLayout.from_num_experts(num_experts, num_ranks=group size)"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
        self.layout = layout
        try:
            shapes = tuple(tuple(shape) for shape in weight_shapes)
        except TypeError as error:
            raise TypeError(
                f"weight_shapes must be a sequence of shapes, one per expert weight tensor, e.g. [(ffn, hidden)] * 3; "
                f"got {weight_shapes!r}"
            ) from error
        self.spec = WeightSpec(shapes)
        if planner is not None and not isinstance(planner, Planner):
            raise TypeError(
                f"planner must be a Planner instance such as QuotaPlanner(), got {type(planner).__name__} {planner!r}; "
                "build one with ultraep.planners.make_planner(name)"
            )
        if config is not None and not isinstance(config, ManagerConfig):
            raise TypeError(f"config must be a ManagerConfig, got {type(config).__name__}; pass ManagerConfig(...)")
        if planner is not None and type(planner).observe is not Planner.observe:
            raise TypeError(
                f"{type(planner).__name__} places replicas from a history of past loads that it records in observe(), "
                "but ReplicaManager plans every layer and microbatch from its current loads with one planner; "
                "use QuotaPlanner, or make_planner('pairing') or make_planner('none')"
            )
        self.planner = planner if planner is not None else QuotaPlanner()
        self.config = config if config is not None else ManagerConfig()
        _watch_optimizer_steps()
        if self.config.plan_with_resident and not isinstance(self.planner, QuotaPlanner):
            raise ValueError(
                f"ManagerConfig.plan_with_resident=True needs a QuotaPlanner, which takes the resident table; got "
                f"{type(self.planner).__name__}. Use a QuotaPlanner or set plan_with_resident=False"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Tensors report "cuda:N"; compare against the same form.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout = None if self.config.timeout_s is None else datetime.timedelta(seconds=self.config.timeout_s)
        _warn_on_copy_model_mismatch(self.planner, self.config)

        slots = layout.redundant_slots_per_rank
        numel = self.spec.numel
        self.num_buffer_sets = max(1, self.config.buffer_layers)
        # [num_buffer_sets, redundant_slots_per_rank, numel]
        self.replica_weights = torch.empty(self.num_buffer_sets, slots, numel, dtype=dtype, device=self.device)
        self.replica_grads = torch.zeros(slots, numel, dtype=dtype, device=self.device)  # [redundant_slots_per_rank, numel]
        self.reduce_scratch = torch.empty(slots, numel, dtype=dtype, device=self.device)  # [redundant_slots_per_rank, numel]

        # held[set][rank][j]: (layer_id, expert_id, version) in redundant slot j of rank in buffer set
        # `set`, or None. The same table on every rank, because every rank applies the same sync plans
        # in the same order.
        self._held: list[list[list[tuple[int, int, int] | None]]] = self._empty_held()
        # last_use[set][rank][j]: the route call that last placed a replica in that slot (-1 = never).
        self._slot_last_use: list[list[list[int]]] = self._empty_slot_table(-1)
        self._route_calls = 0
        self._in_flight: dict[tuple[int, int], _InFlight] = {}
        # The forward sync running in the background.
        self._pending_sync: _PendingSync | None = None
        self._sync_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.sync_group: dist.ProcessGroup | None = None
        # Reduces started in the background: (layer_id, microbatch_id), future, master weights.
        self._pending_reduces: list[tuple[tuple[int, int], concurrent.futures.Future, tuple[torch.Tensor, ...]]] = []
        self._reduce_callback_queued = False
        if self.config.overlap_sync or self.config.overlap_grad_reduce:
            if sync_group is None:
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world_size))
                sync_group = dist.new_group(ranks=ranks)
            elif dist.get_world_size(sync_group) != world_size:
                raise ValueError(
                    f"sync_group has {dist.get_world_size(sync_group)} ranks but the EP group has {world_size}; "
                    "build it over the same ranks in the same order, or pass None to create one"
                )
            self.sync_group = sync_group
            self._sync_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ultraep-sync")
        self._versions: dict[int, _LayerVersion] = {}
        self.stats: dict[int, LayerStats] = {}
        self.timings: dict[str, dict[int, list[float]]] = {}  # phase -> layer_id -> seconds per call
        self._config_word = _digest64(
            layout, type(self.planner).__qualname__, repr(getattr(self.planner, "config", None)),
            self.spec, str(dtype), dataclasses.astuple(self.config), world_size,
        )
        if self.rank == 0:
            logger.info(
                "ReplicaManager: %s, weight spec %s, %s, %.1f MiB of redundant-slot buffers, planner %s, %s",
                layout, self.spec.shapes, dtype, self.extra_memory_bytes / 2**20, type(self.planner).__name__, self.config,
            )

    # ------------------------------------------------------------------------------------------
    # Public API.

    @property
    def extra_memory_bytes(self) -> int:
        """Bytes of the three buffers (replica weights of every set, replica gradients, reduce scratch)."""
        return sum(t.numel() * t.element_size() for t in (self.replica_weights, self.replica_grads, self.reduce_scratch))

    def route(
        self,
        layer_id: int,
        microbatch_id: int,
        topk_ids: torch.Tensor,
        master_weights: Sequence[torch.Tensor],
        *,
        balance: bool = True,
    ) -> Routing:
        """Count, gather, plan and reroute one layer and microbatch (phases 1 to 4).

        layer_id, microbatch_id: ints >= 0; the pair must not be in flight already.
        topk_ids: [num_tokens, topk] integer tensor on the manager's device. Logical expert per
          assignment; -1 = unused. ``num_tokens`` may be 0 and may differ between ranks.
        master_weights: this layer's master weights on this rank, per weight tensor
          ``[experts_per_rank, *shape]`` in ``weight_shapes`` order.
        balance: ``False`` uses the masters-only plan through the same path (no replicas).

        Collective over the EP group: every rank calls it for the same layer and microbatch. With 2
        ranks each rank passes its own ``topk_ids`` and gets the same plan and load matrix, plus its
        own ``slot_ids`` and split sizes.

        Raises :class:`RankAgreementError` on every rank when ranks disagree or any rank rejected its
        input; the rejecting rank raises its own ``TypeError``/``ValueError``/``RuntimeError`` instead.
        """
        self._finish_pending_sync()
        layout = self.layout
        key = (layer_id, microbatch_id)
        start = self._clock()

        # Step 1: local checks and count. A failure is reported through the all-gather, so every
        # rank raises instead of the others waiting forever.
        local_error: Exception | None = None
        try:
            self._check_call(layer_id, microbatch_id, topk_ids, master_weights)
            local_load = count_local_load(topk_ids, layout.num_experts, check_values=self.config.check_values)
            version = self._local_version(layer_id, master_weights)
        except (TypeError, ValueError, RuntimeError) as err:
            local_error = err
            local_load = torch.zeros(layout.num_experts, dtype=torch.int64, device=self.device)
            version = 0
        self._record("count", layer_id, start)

        # Step 2: one all-gather of the load rows and the agreement words.
        start = self._clock()
        payload = torch.empty(layout.num_experts + _NUM_EXTRA_WORDS, dtype=torch.int64, device=self.device)
        payload[: layout.num_experts] = local_load.to(device=self.device, dtype=torch.int64)
        # Only this layer's buffer set decides its copies and slot placement. A rejected call may have
        # an invalid layer_id, and its status word already makes every rank raise.
        cache_word = 0
        if local_error is None:
            buffer_set = self._buffer_set(layer_id)
            cache_word = _digest64(self._held[buffer_set], self._slot_last_use[buffer_set])
        extra = (
            self._config_word,
            _digest64(layer_id, microbatch_id, bool(balance)),
            cache_word,
            version,
            _STATUS_OK if local_error is None else _STATUS_REJECTED,
        )
        payload[layout.num_experts :] = torch.tensor(extra, dtype=torch.int64)
        gathered = self._all_gather(payload, f"load all-gather of layer {layer_id} microbatch {microbatch_id}")
        self._check_route_agreement(gathered[:, layout.num_experts :], key, local_error)
        loads = gathered[:, : layout.num_experts].to(self.device)  # [num_ranks, num_experts]
        versions = tuple(int(v) for v in gathered[:, layout.num_experts + _VERSION_WORD])
        self._record("gather", layer_id, start)

        # Step 3: plan, then optionally confirm that every rank computed the same plan.
        start = self._clock()
        resident = self._resident(layer_id, versions) if balance and self.config.plan_with_resident else None
        plan = self._make_plan(loads, balance, resident)
        self._record("plan", layer_id, start)
        if self.config.check_plans:
            start = self._clock()
            self._check_plan_agreement(plan, loads, key)
            self._record("plan_check", layer_id, start)
        self._route_calls += 1
        if self.config.reuse_cached_weights and layout.redundant_slots_per_rank > 1:
            plan = self._place_in_cached_slots(plan, layer_id, versions)

        # Step 4: reroute and split sizes.
        start = self._clock()
        slot_ids = reroute(topk_ids, plan, loads, self.rank, check_values=False)
        per_source = source_quota(plan, loads, check_values=False).cpu()  # [num_ranks, num_slots]
        spr = layout.slots_per_rank
        send_counts = per_source[self.rank].view(layout.num_ranks, spr).sum(dim=1)  # [num_ranks]
        recv_slot_counts = per_source[:, self.rank * spr : (self.rank + 1) * spr].contiguous()  # [num_ranks, slots_per_rank]
        routing = Routing(
            layer_id, microbatch_id, bool(balance), plan, loads, slot_ids,
            tuple(send_counts.tolist()), tuple(recv_slot_counts.sum(dim=1).tolist()), recv_slot_counts,
        )
        self._record("reroute", layer_id, start)

        # Grad reduce runs (and releases the state) only when the masters need gradients and replicas exist.
        expects_reduce = (
            torch.is_grad_enabled() and any(w.requires_grad for w in master_weights) and layout.redundant_slots_per_rank > 0
        )
        self._in_flight[key] = _InFlight(routing, tuple(master_weights), versions, expects_reduce)
        stats = self.stats.setdefault(layer_id, LayerStats())
        stats.imbalance_before = _masters_only_imbalance(loads, layout)
        stats.imbalance_after = plan.imbalance()
        stats.num_replicas = int(plan.num_replicas())
        logger.debug(
            "rank %d layer %d microbatch %d: imbalance %.4f -> %.4f with %d replicas",
            self.rank, layer_id, microbatch_id, stats.imbalance_before, stats.imbalance_after, stats.num_replicas,
        )
        return routing

    def replicate(self, routing: Routing) -> tuple[torch.Tensor, ...]:
        """Sync the redundant slots for ``routing`` and return their weights (phase 5).

        Returns per weight tensor a ``[redundant_slots_per_rank, *shape]`` view of the shared buffer.
        Autograd: gradients flowing into these views are reduced into the master weights (phase 7).
        Every returned view must feed the output that passes through :meth:`resync_on_backward`.
        The views stay valid until another layer or microbatch is synced; the backward re-syncs them.

        Collective over the EP group, like :meth:`route`. With ``ManagerConfig.overlap_sync`` the copies
        run in the background after this returns: call :meth:`wait_replicas` before reading the views.
        """
        self._finish_pending_sync()
        state = self._state(routing.key, "replicate")
        if state.expects_reduce:
            return Replicate.apply(self, routing.key, *state.master_weights)
        # No gradient reaches the masters (or there are no redundant slots): no autograd bookkeeping.
        if self.layout.redundant_slots_per_rank > 0:
            self._sync(routing.key, phase="forward", background=self.config.overlap_sync)
        return self.spec.row_views(self.slot_weights(routing.layer_id))

    @property
    def replica_chunks(self) -> int:
        """Chunks a replica's weights arrive in: ``config.num_chunks`` with ``pipeline_replicas``, else 1."""
        return self.config.num_chunks if self.config.pipeline_replicas else 1

    def wait_replicas(self, routing: Routing, chunk: int | None = None) -> None:
        """Block until the forward weight sync started by :meth:`replicate` for ``routing`` has delivered.

        chunk: ``None`` waits for the whole sync. An int in ``[0, replica_chunks)`` waits only until
          chunk ``chunk`` of every replica on this rank has arrived. That chunk is rows
          ``chunk_bounds(shape[0], chunk, replica_chunks)`` of each weight tensor
          (:func:`~ultraep.comm.chunk_bounds`), and later chunks may still be in flight. Chunks arrive
          in order, so waiting for chunk ``c`` also covers chunks ``0..c``, and waiting for the last
          one waits for the whole sync.
        Returns at once when no sync runs in the background (``overlap_sync`` off, or already done).
        Raises the sync's :class:`~ultraep.comm.CommunicationError` if it failed. Local: the copies
        themselves are collective and were started on every rank by :meth:`replicate`.
        """
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < self.replica_chunks):
            raise ValueError(
                f"chunk must be None or an int in [0, {self.replica_chunks - 1}] (replica_chunks), got {chunk!r}; "
                "chunked waits need ManagerConfig.pipeline_replicas=True and num_chunks > 1"
            )
        pending = self._pending_sync
        if pending is not None and pending.key != routing.key:
            raise RuntimeError(
                f"wait_replicas for layer {routing.layer_id} microbatch {routing.microbatch_id}, but the sync in "
                f"flight is for layer {pending.key[0]} microbatch {pending.key[1]}; call it after that layer's replicate()"
            )
        if pending is None or chunk is None or chunk == self.replica_chunks - 1:
            self._finish_pending_sync()
            return
        plan = pending.sync_plan
        if plan.num_steps == 0:
            return
        start = self._clock()
        if not pending.progress.wait(plan.ready_step(chunk) + 1):
            self._finish_pending_sync()  # the sync stopped early: raise its error
            return
        pending.waited_s += self._clock() - start  # recorded with the final wait

    def slot_weights(self, layer_id: int) -> torch.Tensor:
        """Return the [redundant_slots_per_rank, numel] buffer of ``layer_id``'s replicas on this rank."""
        return self.replica_weights.data[self._buffer_set(layer_id)]

    def resync_on_backward(self, routing: Routing, expert_output: torch.Tensor) -> torch.Tensor:
        """Return ``expert_output`` unchanged; its backward re-syncs the redundant slots first (phase 6).

        expert_output: output of the experts that used :meth:`replicate`'s weights, any shape.
        Call it once per :meth:`route`, after :meth:`replicate`. When ``expert_output`` needs no
        gradient, no backward will run for this layer and microbatch, so its state is released here.
        """
        self._finish_pending_sync()
        self._state(routing.key, "resync_on_backward")
        if expert_output.requires_grad and torch.is_grad_enabled():
            return ResyncOnBackward.apply(self, routing.key, expert_output)
        self._in_flight.pop(routing.key, None)
        return expert_output

    def release(self, layer_id: int, microbatch_id: int) -> None:
        """Drop the state of a layer and microbatch whose backward will not run. Local, no communication."""
        self._finish_pending_sync()
        self._in_flight.pop((layer_id, microbatch_id), None)

    def release_all(self) -> None:
        """Drop the state of every layer and microbatch in flight. Local, no communication.

        Also drops the background grad reduces of a backward that raised, after they finish, so they
        are never added to a later backward's gradients.
        """
        self._finish_pending_sync()
        self._discard_pending_reduces()
        self._in_flight.clear()

    def in_flight(self) -> list[tuple[int, int]]:
        """Return the ``(layer_id, microbatch_id)`` keys whose backward has not finished."""
        return sorted(self._in_flight)

    def invalidate_cached_weights(self) -> None:
        """Forget what every redundant slot holds, so the next sync copies everything.

        Call it on every rank after changing master weights in a way autograd does not see:
        assigning ``.data``, writing through a detached alias, or receiving them in place with a
        collective (``dist.broadcast`` or ``dist.scatter`` into the weights, as when loading a
        checkpoint from one rank). A ``torch.optim`` step is detected without it, fused or not. Local, no
        communication.
        """
        self._finish_pending_sync()
        self._forget_cached_weights()

    def _forget_cached_weights(self) -> None:
        self._held = self._empty_held()
        for version in self._versions.values():
            version.epoch += 1

    def _finish_pending_sync(self) -> None:
        """Wait for the background forward sync, if any; every other phase runs after it."""
        if self._pending_sync is None:
            return
        pending = self._pending_sync
        self._pending_sync = None
        start = self._clock() - pending.waited_s  # the chunk waits count toward this wait
        pending.future.result()
        self._record("sync_wait", pending.key[0], start)

    # ------------------------------------------------------------------------------------------
    # Phases run from the autograd functions.

    def _sync(self, key: tuple[int, int], *, phase: str, background: bool = False) -> None:
        """Fill the redundant slots of all ranks for ``key``, skipping slots that hold current weights.

        background: run the transfers on the sync thread over ``sync_group`` and return at once;
        :meth:`_finish_pending_sync` waits for them.
        """
        self._finish_pending_sync()
        start = self._clock()
        state = self._state(key, f"weight sync ({phase})")
        layout = self.layout
        plan = state.routing.plan
        replica_ids = plan.replica_expert_ids.cpu().tolist()
        held = self._held[self._buffer_set(key[0])]

        # Step 1: which slots need a copy. A replica with quota 0 processes nothing and needs none.
        needs_copy, targets = [], {}
        for rank, row_targets in enumerate(self._slot_targets(plan, key[0], state.versions)):
            flags = []
            for idx, target in enumerate(row_targets):
                cached = self.config.reuse_cached_weights and held[rank][idx] == target
                flags.append(target is not None and not cached)
                if target is not None and not cached:
                    targets[(rank, idx)] = target
            needs_copy.append(flags)

        # Step 2: plan the transfers, then run them here or on the sync thread.
        sync_plan = plan_weight_sync(
            layout,
            replica_ids,
            needs_copy=needs_copy,
            mode=self.config.sync_mode,
            num_chunks=self.config.num_chunks,
            pipeline=background and self.config.pipeline_replicas,
        )
        group = self.sync_group if background else self.group
        progress = _StepProgress() if background else None
        run = functools.partial(self._run_sync, key, phase, group, state.master_weights, sync_plan, targets, held, start, progress)
        if background:
            self._pending_sync = _PendingSync(key, self._sync_executor.submit(run), sync_plan, progress)
        else:
            run()

    def _run_sync(self, key, phase, group, master_weights, sync_plan, targets, held, start, progress=None) -> None:
        """Run one sync plan over ``group`` and record what the slots now contain.

        On failure nothing in the slots can be trusted, so every cached record is dropped.
        progress: receives every finished step and a stop at the end, for chunk waiters.
        """
        try:
            self._execute_sync(key, phase, group, master_weights, sync_plan, targets, held, start, progress)
        finally:
            if progress is not None:
                progress.stop()

    def _execute_sync(self, key, phase, group, master_weights, sync_plan, targets, held, start, progress) -> None:
        try:
            execute_weight_sync(
                sync_plan,
                layout=self.layout,
                spec=self.spec,
                rank=self.rank,
                master_weights=master_weights,
                replica_buffer=self.slot_weights(key[0]),
                group=group,
                timeout=self.timeout,
                description=f"weight sync ({phase}) of layer {key[0]} microbatch {key[1]}",
                on_step=None if progress is None else progress.step_done,
            )
        except CommunicationError:
            self._forget_cached_weights()
            raise
        for (rank, idx), target in targets.items():
            held[rank][idx] = target

        stats = self.stats.setdefault(key[0], LayerStats())
        moved = sync_plan.elements_moved(self.spec.numel) * self.replica_weights.element_size()
        if phase == "forward":
            stats.forward_sync_bytes = moved
            stats.forward_sync_link_time = sync_plan.link_time()
        else:
            stats.backward_sync_bytes = moved
        self._record(f"sync_{phase}", key[0], start)

    def _resync_for_backward(self, key: tuple[int, int]) -> None:
        state = self._state(key, "re-sync before backward")
        if self.layout.redundant_slots_per_rank > 0:
            self._sync(key, phase="backward")
        if not state.expects_reduce:
            # Replicate.backward will not run, so this is the layer and microbatch's last phase.
            self._in_flight.pop(key, None)

    def _reduce(self, key: tuple[int, int], replica_grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Grad reduce for ``key`` (phase 7); returns this rank's master gradients (``None`` = zero)."""
        self._finish_pending_sync()
        return self._reduce_body(key, replica_grads, self.group)

    def _reduces_in_background(self, key: tuple[int, int]) -> bool:
        """Return whether ``key``'s grad reduce may run on the background thread (see ``overlap_grad_reduce``)."""
        if not self.config.overlap_grad_reduce:
            return False
        weights = self._state(key, "grad reduce").master_weights
        return all(w.is_leaf and w.requires_grad for w in weights)

    def _start_reduce(self, key: tuple[int, int], replica_grads: Sequence[torch.Tensor | None]) -> None:
        """Queue ``key``'s grad reduce on the background thread; the backward's end adds its result."""
        weights = self._state(key, "grad reduce").master_weights
        future = self._sync_executor.submit(self._reduce_body, key, tuple(replica_grads), self.sync_group)
        self._pending_reduces.append((key, future, weights))
        if not self._reduce_callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_reduces)
            self._reduce_callback_queued = True

    def _discard_pending_reduces(self) -> None:
        """Wait for and drop the reduces of a backward whose end-of-backward callback never ran (it raised)."""
        if not self._reduce_callback_queued and not self._pending_reduces:
            return
        pending, self._pending_reduces = self._pending_reduces, []
        self._reduce_callback_queued = False
        logger.warning(
            "rank %d: a backward ended without adding its %d background grad reduce(s) (it raised?); they are "
            "dropped, so the next backward starts clean",
            self.rank,
            len(pending),
        )
        for key, future, _ in pending:
            try:
                future.result()  # let the collective finish so the ranks stay in step
            except Exception as error:  # the backward already failed; report and go on
                logger.warning("rank %d: dropped grad reduce of layer %d microbatch %d failed: %s", self.rank, key[0], key[1], error)

    def _finish_reduces(self) -> None:
        """Wait for the background reduces and add their master gradients to ``.grad``, oldest first."""
        pending, self._pending_reduces = self._pending_reduces, []
        self._reduce_callback_queued = False
        start = self._clock()
        with torch.no_grad():
            for key, future, weights in pending:
                for weight, grad in zip(weights, future.result(), strict=True):
                    if grad is None:
                        continue
                    if weight.grad is None:
                        weight.grad = grad
                    else:
                        weight.grad.add_(grad)
        if pending:
            self._record("reduce_wait", pending[-1][0][0], start)

    def _reduce_body(
        self, key: tuple[int, int], replica_grads: Sequence[torch.Tensor | None], group: dist.ProcessGroup | None
    ) -> list[torch.Tensor | None]:
        start = self._clock()
        state = self._state(key, "grad reduce")
        layout = self.layout
        plan = state.routing.plan
        replica_ids = plan.replica_expert_ids.cpu().tolist()
        replica_quota = plan.quota.cpu().view(layout.num_ranks, layout.slots_per_rank)[:, layout.experts_per_rank :].tolist()

        # Step 1: pack this rank's replica gradients. Rows of replicas with quota 0 are neither
        # written nor read, so whatever those rows held cannot leak into a master gradient.
        grad_views = self.spec.row_views(self.replica_grads)
        for idx, expert in enumerate(replica_ids[self.rank]):
            if expert < 0 or replica_quota[self.rank][idx] == 0:
                continue
            for view, grad in zip(grad_views, replica_grads, strict=True):
                if grad is None:
                    view[idx].zero_()
                else:
                    view[idx].copy_(grad[idx])

        # Step 2: send up the relay trees, or straight to the masters, and add in plan order. The call
        # zeroes the buffer afterwards.
        reduce_plan = plan_grad_reduce(
            layout,
            replica_ids,
            replica_quota=replica_quota,
            scratch_rows=self.reduce_scratch.shape[0] or 1,
            mode=self.config.sync_mode,
            num_chunks=self.config.num_chunks,
        )
        receives = any(t.dst_rank == self.rank and not layout.is_redundant_slot(t.dst_slot_id) for t in reduce_plan.transfers)
        master_grads = [torch.zeros_like(w) for w in state.master_weights] if receives else None
        reduce_replica_grads(
            reduce_plan,
            layout=layout,
            spec=self.spec,
            rank=self.rank,
            replica_grad_buffer=self.replica_grads,
            master_grads=master_grads,
            scratch=self.reduce_scratch,
            group=group,
            timeout=self.timeout,
            description=f"grad reduce of layer {key[0]} microbatch {key[1]}",
        )
        self._in_flight.pop(key, None)
        self.stats.setdefault(key[0], LayerStats()).reduce_bytes = (
            reduce_plan.elements_moved(self.spec.numel) * self.replica_grads.element_size()
        )
        self._record("reduce", key[0], start)
        return master_grads if master_grads is not None else [None] * len(state.master_weights)

    # ------------------------------------------------------------------------------------------
    # Helpers.

    def _buffer_set(self, layer_id: int) -> int:
        return layer_id if self.config.buffer_layers else 0

    def _place_in_cached_slots(self, plan: Plan, layer_id: int, versions: Sequence[int]) -> Plan:
        """Permute each rank's redundant slots so replicas land where their weights already are.

        The same tables on every rank give the same plan everywhere; rank loads do not change.
        """
        layout = self.layout
        buffer_set = self._buffer_set(layer_id)
        held, last_use = self._held[buffer_set], self._slot_last_use[buffer_set]
        masters = layout.experts_per_rank
        quota = plan.quota.view(layout.num_ranks, layout.slots_per_rank).cpu()
        replica_ids = plan.replica_expert_ids.cpu().tolist()
        new_ids, new_quota = [], quota.clone()
        for rank, row_targets in enumerate(self._slot_targets(plan, layer_id, versions)):
            order, _ = cached_slot_order(row_targets, held[rank], last_use[rank])
            new_ids.append([replica_ids[rank][j] for j in order])
            new_quota[rank, masters:] = quota[rank, masters:][order]
            for k, j in enumerate(order):
                if row_targets[j] is not None:
                    last_use[rank][k] = self._route_calls
        device = plan.quota.device
        return Plan(
            layout,
            torch.tensor(new_ids, dtype=torch.int64, device=device).view_as(plan.replica_expert_ids),
            new_quota.reshape(-1).to(device),
        )

    def _slot_targets(self, plan: Plan, layer_id: int, versions: Sequence[int]) -> list[list[tuple[int, int, int] | None]]:
        """Return per rank and redundant slot the (layer, expert, version) its replica needs, or None.

        None marks an empty slot or a replica with quota 0, which processes nothing and needs no weights.
        """
        layout = self.layout
        replica_ids = plan.replica_expert_ids.cpu().tolist()
        quota = plan.quota.cpu().view(layout.num_ranks, layout.slots_per_rank)[:, layout.experts_per_rank :].tolist()
        return [
            [
                (layer_id, expert, versions[layout.master_rank(expert)]) if expert >= 0 and q > 0 else None
                for expert, q in zip(row, row_quota, strict=True)
            ]
            for row, row_quota in zip(replica_ids, quota, strict=True)
        ]

    def _empty_slot_table(self, fill):
        """Return a [num_buffer_sets][num_ranks][redundant_slots_per_rank] nested list filled with ``fill``."""
        slots = self.layout.redundant_slots_per_rank
        return [[[fill] * slots for _ in range(self.layout.num_ranks)] for _ in range(self.num_buffer_sets)]

    def _empty_held(self) -> list[list[list[tuple[int, int, int] | None]]]:
        return self._empty_slot_table(None)

    def _state(self, key: tuple[int, int], what: str) -> _InFlight:
        state = self._in_flight.get(key)
        if state is None:
            raise RuntimeError(
                f"{what}: layer {key[0]} microbatch {key[1]} is not in flight on rank {self.rank}; call route() "
                "first, and run each forward's backward once (retain_graph and recomputing forwards are "
                "not supported)"
            )
        return state

    def _check_call(self, layer_id, microbatch_id, topk_ids, master_weights) -> None:
        for name, value in (("layer_id", layer_id), ("microbatch_id", microbatch_id)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.config.buffer_layers and layer_id >= self.config.buffer_layers:
            raise ValueError(
                f"layer_id={layer_id} has no buffer set: ManagerConfig.buffer_layers={self.config.buffer_layers} "
                "gives layers 0..buffer_layers-1 their own sets; raise buffer_layers to the number of MoE layers"
            )
        if not isinstance(topk_ids, torch.Tensor):
            raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
        if topk_ids.device != self.device:
            raise ValueError(
                f"topk_ids is on {topk_ids.device} but the manager runs on {self.device}; move topk_ids "
                "or build the manager with that device"
            )
        self.spec.check_master_weights(master_weights, self.layout.experts_per_rank)
        if master_weights[0].dtype != self.dtype or master_weights[0].device != self.device:
            raise TypeError(
                f"master_weights are {master_weights[0].dtype} on {master_weights[0].device} but the manager's "
                f"buffers are {self.dtype} on {self.device}; build the manager with the experts' dtype and device"
            )
        if (layer_id, microbatch_id) in self._in_flight:
            if _inside_backward():
                raise RuntimeError(
                    f"layer {layer_id} microbatch {microbatch_id} was routed again during a backward on rank {self.rank}, "
                    "as recomputing activations does (torch.utils.checkpoint with use_reentrant=False). Recomputing an "
                    "MoE layer's forward inside its backward is not supported: checkpoint around the MoE layer, or pass "
                    "use_reentrant=True"
                )
            raise RuntimeError(
                f"layer {layer_id} microbatch {microbatch_id} is still in flight on rank {self.rank}: its backward "
                "has not run. Run the backward, give each in-flight microbatch its own microbatch_id, call "
                "release(layer_id, microbatch_id) for a forward without backward, or run it under torch.no_grad()"
            )

    def _local_version(self, layer_id: int, master_weights: Sequence[torch.Tensor]) -> int:
        """Return a signed 64-bit version of this rank's master weights of ``layer_id``.

        It changes when the tensors are replaced, on any in-place update autograd counts
        (``_version``), when a gradient is accumulated into them, after any ``torch.optim`` step in
        the process (fused optimizers leave ``_version`` unchanged), and on
        :meth:`invalidate_cached_weights`.
        """
        state = self._versions.setdefault(layer_id, _LayerVersion())
        current = tuple(state_ref() for state_ref in state.tensors)
        if len(current) != len(master_weights) or any(a is not b for a, b in zip(current, master_weights, strict=False)):
            for handle in state.hooks:
                handle.remove()
            hooks = []
            for weight in master_weights:
                if weight.is_leaf and weight.requires_grad:
                    hooks.append(weight.register_post_accumulate_grad_hook(lambda _w, s=state: _count_grad_event(s)))
            state.tensors = tuple(weakref.ref(w) for w in master_weights)
            state.hooks = tuple(hooks)
            state.epoch += 1
        try:
            in_place = sum(w._version for w in master_weights)
        except RuntimeError:  # inference tensors carry no version counter
            in_place = None
        if in_place is None or any(w.requires_grad and not w.is_leaf for w in master_weights):
            # Computed or unversioned weights may change on every call: never reuse them across calls.
            state.volatile_calls += 1
        return _digest64(state.epoch, state.grad_events, in_place, state.volatile_calls, _optimizer_steps)

    def _make_plan(self, loads: torch.Tensor, balance: bool, resident: torch.Tensor | None = None) -> Plan:
        if not balance:
            return masters_only_plan(loads, self.layout)
        if resident is not None:
            return self.planner(loads, self.layout, check_values=self.config.check_values, resident=resident)
        return self.planner(loads, self.layout, check_values=self.config.check_values)

    def _resident(self, layer_id: int, versions: Sequence[int]) -> torch.Tensor:
        """Return [num_ranks, redundant_slots_per_rank] int64 on the manager's device: the expert whose
        current weights of ``layer_id`` each slot contains, -1 = none. The same on every rank."""
        layout = self.layout
        per_rank = layout.experts_per_rank
        # One flat pass over the slots: the table is built on the critical path of every call.
        flat = [
            key[1] if key is not None and key[0] == layer_id and key[2] == versions[key[1] // per_rank] else -1
            for row in self._held[self._buffer_set(layer_id)]
            for key in row
        ]
        table = torch.tensor(flat, dtype=torch.int64).view(layout.num_ranks, layout.redundant_slots_per_rank)
        return table.to(self.device)

    def _all_gather(self, payload: torch.Tensor, description: str) -> torch.Tensor:
        """All-gather a 1-D int64 payload; returns [num_ranks, len(payload)] on the host."""
        out = torch.empty(self.layout.num_ranks * payload.numel(), dtype=payload.dtype, device=payload.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        peers = [r for r in range(self.layout.num_ranks) if r != self.rank]
        with communication_errors(description, rank=self.rank, peer_ranks=peers):
            wait_all([gather(out, payload, group=self.group, async_op=True)], self.timeout)
        return out.view(self.layout.num_ranks, payload.numel()).cpu()  # [num_ranks, payload words]

    def _check_route_agreement(self, words: torch.Tensor, key: tuple[int, int], local_error: Exception | None) -> None:
        """Raise on every rank if any rank rejected its input or disagrees (words: [num_ranks, 5] int64)."""
        where = f"layer {key[0]} microbatch {key[1]}"
        rejected = [r for r, status in enumerate(words[:, _STATUS_WORD].tolist()) if status != _STATUS_OK]
        if rejected:
            if local_error is not None:
                logger.error("rank %d rejected its input for %s: %s", self.rank, where, local_error)
                if hasattr(local_error, "add_note"):  # Python >= 3.11
                    local_error.add_note(f"every rank of the EP group raises: ranks {rejected} rejected their input for {where}")
                raise local_error
            raise RankAgreementError(
                f"ranks {rejected} rejected their input for {where} (see the error raised on those ranks); "
                f"rank {self.rank} raises too so no rank waits in a collective"
            )
        checks = (
            (_CONFIG_WORD, "the manager configuration (layout, planner and its config, weight shapes, dtype, "
             "ManagerConfig) differs", "build the ReplicaManager with the same arguments on every rank"),
            (_CALL_WORD, "ranks are at different layers, microbatches or balance settings",
             "call every MoE layer in the same order with the same microbatch_id and balance on every rank"),
            (_CACHE_WORD, "the record of which expert each redundant slot holds differs",
             "a failed weight sync on some rank can cause this; call invalidate_cached_weights() on every rank"),
        )
        for column, problem, fix in checks:
            agree, differ = _split_ranks(words[:, column].tolist())
            if differ:
                message = f"{where}: {problem}: ranks {differ} differ from ranks {agree}; {fix}"
                logger.error(message)
                raise RankAgreementError(message)

    def _check_plan_agreement(self, plan: Plan, loads: torch.Tensor, key: tuple[int, int]) -> None:
        words = torch.tensor(
            [_digest64(loads.cpu().numpy().tobytes()), int.from_bytes(bytes.fromhex(plan.fingerprint()), "little", signed=True)],
            dtype=torch.int64, device=self.device,
        )
        where = f"layer {key[0]} microbatch {key[1]}"
        gathered = self._all_gather(words, f"plan check all-gather of {where}")
        for column, what, fix in (
            (0, "the load matrix", "the load matrix must come from the all-gather of count_local_load on every rank"),
            (1, "the plan", "the planner must be a deterministic function of the load matrix and its config"),
        ):
            agree, differ = _split_ranks(gathered[:, column].tolist())
            if differ:
                message = f"{where}: {what} differs on ranks {differ} from ranks {agree}; {fix}"
                logger.error(message)
                raise RankAgreementError(message)

    def _clock(self) -> float:
        if not self.config.record_timings:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _record(self, phase: str, layer_id: int, start: float) -> None:
        if self.config.record_timings:
            self.timings.setdefault(phase, {}).setdefault(layer_id, []).append(self._clock() - start)


def _count_grad_event(state: _LayerVersion) -> None:
    state.grad_events += 1


def _masters_only_imbalance(loads: torch.Tensor, layout: ExpertLayout) -> float:
    rank_load = loads.sum(dim=0).view(layout.num_ranks, layout.experts_per_rank).sum(dim=1)
    total = int(rank_load.sum())
    return 1.0 if total == 0 else int(rank_load.max()) * layout.num_ranks / total
