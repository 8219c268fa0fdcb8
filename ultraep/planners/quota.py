"""The default real-time planner: replicate hot experts with exact integer quotas.

For a threshold ``C`` on the rank load, every rank above ``C`` (a donor) must shed its excess and
every rank below ``C`` with a free redundant slot (a receiver) may take up to ``C - rank_load``
assignments. One round of matching runs without loops over experts or ranks:

1. Each donor drains its hottest masters first; the pieces of all donors, largest donor first, are
   laid end to end on a line of length ``sum(excess)``.
2. The receivers, most spare first (or, in a second family of candidates, least spare first), are
   laid end to end on a second line. Each receiver takes the piece under a fixed anchor point of its
   interval (the middle, a quarter or three quarters in), so it uses one redundant slot per round.
   With a fourth anchor, in both receiver orders, the j-th receiver takes instead the piece whose
   master has the j-th largest remaining quota.
3. A receiver is filled up to ``C`` (capped by what the expert's master still holds), not just to the
   piece's size: a donor that gives more than its excess drops below ``C`` and becomes a receiver
   in the next round with its own redundant slot, while a receiver left half-filled would waste its
   only slot. Pieces below the minimum replica quota are not created.

A few rounds repair the pieces that did not fit. With one redundant slot per rank every receiver
family also runs with over-draining donors, which shed half the mean rank load beyond their excess:
a donor just above the threshold then gives a whole hot expert away and takes a piece of another donor
into its own slot in the next round, the swap that a lone slot often needs.

One more family, best fit, packs whole spares. Its bins are the donors' masters that still hold
quota, not the pieces of a fixed drain. Each receiver, most spare first, picks the bin with the least
quota that covers its spare (the fullest bin when none does), and a bin serves the receivers that
picked it in line order while their spares fit. A receiver whose spare did not fit tries again in the
next round. So a donor keeps the ends of several masters instead of whole masters, and the receivers'
spares are filled exactly, which a tight slot budget needs. The second drain and best fit take part
only at thresholds below the lowest max rank load that the plain drain reached.

Rotated receiver lines. With one slot per rank the receivers that share a donor's piece must fill it
almost exactly, and the order of the receiver line decides which receivers share one. Rotation ``j``
moves the first ``j`` receivers with spare of the most-spare-first line behind the others, so the
largest receivers meet the later pieces. Rotations 1 to 8 run, each with the anchors at a
quarter and at three quarters, on best fit's steps with the plain drain, and take part where best fit
does. With two or more slots they do not run.

The planner runs this in one batch for a fixed ladder of thresholds, with each of the eight pairs of
receiver order and anchor (the second drain runs on the ladder's first part, best fit and the
rotated lines on best fit's steps). The ladder runs from a lower bound of the optimum (the load floor, at least the mean) to the
unbalanced maximum. The first drain's steps take part from the lowest threshold up while each
threshold lies at or below the balance target or at or below the lowest peak of the steps below it.
A plan rarely ends below its threshold, so the steps above could almost never win, and the compiled
planner does not plan them. With ``QuotaConfig.stop_at_target`` the ladder also ends after the first
step with a plan at or below the balance target. The planner keeps the plan with the lowest max rank
load. Among plans at or below the balance target it keeps the fewest replicas, then the most
assignments served on their own rank. Everything is int64 tensor arithmetic with unique sort keys,
so the plan is identical on every device and run. On accelerators no value is read back to the host.
On the CPU the rounds stop once a round moves nothing, which leaves the plan unchanged.

Copy cost. Every replica costs a weight copy, and on small microbatches or large experts the copy
can take longer than the load it moves. With ``QuotaConfig.copy_cost = c > 0`` (one copy's time in
assignments of GEMM time) the choice between candidates compares each plan's slowest rank with the
sync counted, in assignments: ``sync = c * busiest // m`` with ``m = relay_chunks``. ``busiest`` is
the most chunk times one rank spends receiving (``m`` per copy) or sending. A master sends the ``n``
copies of each of its experts through the weight sync's relay tree, in
:func:`~ultraep.comm.relay.relay_send_chunks` ``(n, m)`` chunk times (:func:`relay_send_table`).
Without ``copy_overlap`` every rank waits for the sync, so the peak is ``max rank load + sync``. With
it, a rank holding replicas takes
``max(load, sync / n + replica load, sync + replica load * (n + 2) / (3 n))`` for ``n = copy_chunks``:
the copies arrive during its masters' GEMM, chunk by chunk, and the down projection (a third of
the replica work) waits for the last chunk. In training (``gemm_passes = k = 3``) an assignment's time
covers its forward and backward GEMMs, but the copies can hide only behind the forward, a ``1 / k``
share. So the formula runs in forward units with ``k * sync``, and the backward's ``(k - 1) * load``
is added before dividing by ``k``. Ranks without replicas take their load. The
masters-only plan is always a candidate, so by this measure the chosen plan is never slower than
no balancing. The copy cost changes only this choice, not the matching.

Resident replicas. With per-layer buffers in inference a redundant slot keeps an expert's weights
between microbatches, and hot experts tend to stay hot: on the Qwen1.5-MoE step loads at EP60, 89% of
the replicas one step needs (counted as ``ceil(load / mean) - 1`` per expert) were needed by the step
before. Without the table of resident experts the planner often places a replica on a rank that must
copy it while another rank still contains its weights. Given the table (``resident``, [num_ranks,
redundant_slots_per_rank], -1 = none), one more family runs on the first drain's ladder. In round
``k < redundant_slots_per_rank`` each receiver takes up to its spare from the master of the expert in
its ``k``-th resident slot, when that master's rank lies above the threshold. The receivers of one
master draw on it in line order. Later rounds match at the middle anchor. In every candidate the
costed peak counts no copy for a replica of an expert resident on its rank. Among equally good plans
the fewest replicas means the fewest that need a copy, so with or without a copy cost a plan that
reuses resident replicas wins a tie. The resident family takes part at the ladder steps where the
first drain does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import torch

from ultraep.layout import MAX_TOTAL_LOAD, ExpertLayout, check_load_matrix
from ultraep.plan import Plan
from ultraep.planners.base import Planner, masters_only_plan

__all__ = [
    "MAX_COPY_COST",
    "QuotaConfig",
    "QuotaPlanner",
    "check_resident",
    "copy_cost_in_assignments",
    "load_floor",
    "plan_reference",
    "relay_send_table",
]

MAX_COPY_COST = 2**24
"""Largest ``QuotaConfig.copy_cost``, which keeps the costed peaks inside int64."""
# Costed peaks are clamped here, above any total load (at most 2**35), so a plan that costs more than
# the masters-only plan stays a loser and the balance-target test cannot overflow int64.
_COSTED_PEAK_LIMIT = 2**36

# Fixed-point scale for fractions of the mean rank load; 2**14 keeps load * num_ranks * scale
# inside int64 for totals up to 2**35 and up to 4096 ranks.
_FRACTION_SCALE = 2**14

# Threshold ladder. The first part is in fractions of the mean rank load above the load floor
# (_load_floor), which is the rounded-up mean unless a rank cannot reach the mean with its slots. It is
# dense near the floor, where the balance targets sit, because a threshold that the matching just
# misses ends some way above it. Starting at the floor matters with one slot per rank: on 20 of the
# 960 Qwen1.5-MoE EP10 step matrices the floor lies above the mean, by up to 2.4%, and a ladder that
# starts at the mean steps over it. It reaches 1.03 because with one slot per rank a skewed load can
# miss every threshold up to 1.01 and balance at 1.02, while the first step of the second part can lie
# near 1.05. The second part is in fractions of the gap between that and the unbalanced maximum, for
# loads too skewed to balance fully. Its last step is the unbalanced maximum itself, so the
# masters-only plan is always a candidate.
_MEAN_STEPS = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.010, 0.015, 0.02, 0.03)
_GAP_STEPS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)

# Anchor points at which a receiver looks for its piece, in quarters of its interval on the receiver
# line: the middle, then a quarter and three quarters in. Each anchor matches receivers to different pieces,
# and keeping the best of the three lowers the imbalance left with one redundant slot per rank
# (mean 1.0036 -> 1.0012 on the real and Zipf loads of the planner benchmark). The last anchor,
# _BY_MASTER_QUOTA, ignores the receiver's interval: the j-th receiver on the line takes the piece whose
# master has the j-th largest remaining quota. Filled up to the threshold, a large receiver takes more
# than its piece, so on the line the intervals of later receivers slide past the pieces they would
# need, and small remainders take large receivers' only slots. Matching the largest receivers with
# the largest masters fills them. On the 960 Qwen1.5-MoE EP10 step matrices with one slot per rank
# it cut the worst plan from 11.0% to 5.5% above the rounded-up mean load, and the plans more than
# 1% above it from 100 to 40.
_BY_MASTER_QUOTA = 0
_ANCHORS = (2, 1, 3, _BY_MASTER_QUOTA)

# Receiver orders: most spare first, then least spare first. Receivers without spare come last in
# both, and each anchor runs with each order. With one redundant slot per rank a receiver takes one
# piece, so the order decides which receivers share a piece, and the best order differs between loads.
_RECEIVER_ORDERS = 2

# Donor drains (module docstring). With one redundant slot per rank the planner also runs every
# receiver family with donors that shed _OVER_DRAIN of the mean rank load beyond their excess. On the
# 960 Qwen1.5-MoE EP10 step matrices this cut the one-slot plans more than 1% above the load floor
# from 24 to 7, and the worst from 3.1% to 2.25%. It also lowered the one-slot mean imbalance on the
# Switch-base-128, Qwen1.5-MoE and Zipf EP16 loads of the planner benchmark. With two slots the plans
# there were already within 0.05% of the mean, so the second drain runs only with one slot. Of 0.3,
# 0.4, 0.5, 0.6 and 0.75 of the mean (tried with the most-spare-first families), 0.5 left the fewest
# of those 960 above 1%.
_OVER_DRAIN = 0.5


def _num_drains(redundant_slots_per_rank: int) -> int:
    """Return the donor drains the planner tries: 2 (excess, then excess plus _OVER_DRAIN of the mean) with one slot, else 1."""
    return 2 if redundant_slots_per_rank == 1 else 1


# Rotated receiver lines (module docstring). With one slot per rank the receivers that share a piece
# must fill it almost exactly, and the most-spare-first line fixes which receivers meet which pieces.
# Rotation j moves that line's first j receivers to its end. Each rotation runs with the
# anchors below on the best-fit steps, with the plain drain. On 300 hot-rank microbatches at 10 ranks
# x 6 experts with one slot (benchmarks/planner_hard.py), 61 plans ended more than 0.5% above the load
# floor. On 12 of those 61 the plan lay more than 1% above the lowest max rank load that the first
# drain's matching reached with 400 random receiver orders, three anchors and both drains at every
# threshold from the floor up. Rotations 1-8 with anchors 1 and 3 left 6 of them. With anchors 1, 2
# and 3, four rotations (with both drains) left 8 and twelve left 6; eight with the middle anchor alone
# left 9. At 8 ranks x 4 experts they left none of 29 (1 before). Two slots leave no such gap, so
# the rotations run with one slot only.
_ROTATIONS = 8
_ROTATION_ANCHORS = (1, 3)


def _num_rotations(redundant_slots_per_rank: int) -> int:
    """Return the receiver-line rotations the planner tries: _ROTATIONS with one slot, else 0."""
    return _ROTATIONS if redundant_slots_per_rank == 1 else 0


# Best-fit receivers (module docstring) run on the mean steps and a coarser continuation of them, in
# fractions of the mean rank load above the load floor. A one-slot load that misses every mean step
# often balances a few percent above the mean, where the gap steps are sparse. Best-fit candidates at
# or above the lowest max rank load of the first drain take no part, so on loads that balance, the
# continuation costs nothing. On the 960 Qwen1.5-MoE EP10 step matrices with one slot per rank, best
# fit cut the plans more than 1% above the load floor from 7 to 1 (more than 0.5%: 16 to 3).
_BEST_FIT_STEPS = _MEAN_STEPS + (0.04, 0.05, 0.06, 0.07, 0.08, 0.10, 0.12, 0.15, 0.2)


# Matching rounds per threshold beyond one per redundant slot. A donor that gave more than its excess
# becomes a receiver in a later round, so chains of such moves need rounds to spare. Rounds stop once
# one moves nothing, so spare rounds cost time only on loads that still move. With one slot per rank,
# 7 instead of 5 took the worst of 300 hot-rank microbatches from 7.1% to 6.0% above the load floor at
# 8 ranks x 4 experts and from 9.9% to 7.9% at 10 x 6. More than 7 changed none of them.
_EXTRA_ROUNDS = 7


def default_num_rounds(config: QuotaConfig, redundant_slots_per_rank: int) -> int:
    """Return the matching rounds per threshold: ``config.num_rounds``, or slots + 7 when it is None."""
    return config.num_rounds if config.num_rounds is not None else redundant_slots_per_rank + _EXTRA_ROUNDS


def _to_fixed_point(fraction: float) -> int:
    """Return ``fraction`` in units of ``1 / _FRACTION_SCALE``, rounded, as every backend computes with it."""
    return int(round(fraction * _FRACTION_SCALE))


# The ladders and the over-drain in those units. Every backend reads these, so their thresholds agree
# to the last unit.
_MEAN_STEPS_Q = tuple(_to_fixed_point(f) for f in _MEAN_STEPS)
_GAP_STEPS_Q = tuple(_to_fixed_point(f) for f in _GAP_STEPS)
_BEST_FIT_STEPS_Q = tuple(_to_fixed_point(f) for f in _BEST_FIT_STEPS)
_OVER_DRAIN_Q = _to_fixed_point(_OVER_DRAIN)


@dataclasses.dataclass(frozen=True)
class QuotaConfig:
    """Settings of the quota planner."""

    balance_target: float = 1.001
    """Imbalance (max / mean rank load) at or below which plans count as equally good; among those the
    planner keeps the one with the fewest replicas. 1.0 requests the most balanced plan found. With
    ``copy_cost`` the max rank load is the costed peak, the slowest rank with the weight sync counted."""
    min_replica_quota: int = 1
    """Smallest quota (assignments) for which a replica is created; smaller pieces stay on the master."""
    min_replica_fraction: float = 0.001
    """Smallest replica quota as a fraction of the mean rank load; the larger of the two minimums
    applies. Relative, so small microbatches still balance."""
    prefer_local: bool = True
    """Among equally balanced plans with equally many replicas, keep the one that serves the most
    assignments on their own rank."""
    num_rounds: int | None = None
    """Matching rounds per threshold; ``None`` means ``redundant_slots_per_rank + 7``."""
    stop_at_target: bool = False
    """Stop the threshold ladder after the first step that gives a plan at or below the balance target,
    and skip the second drain, best fit and the rotated lines then. By default the planner also tries the higher steps
    up to the target and keeps the plan with the fewest replicas. On loads that reach the target,
    stopping made the compiled C planner 1.6-1.9x as fast at EP32-EP64 and 1.3-1.5x at EP8-EP16
    (``benchmarks/planner_ab.py``), for more replicas (6% more in the simulator's ESFT EP64 prefill runs). The chosen plan may then differ
    in imbalance, though it stays within the target. The PyTorch reference plans every candidate in
    one batch and gains nothing. It suits latency-bound use such as inference prefill, where the
    planner runs on the critical path."""
    copy_cost: int = 0
    """Time to copy one expert's weights over one link, in assignments' worth of grouped-GEMM time
    (:func:`copy_cost_in_assignments`). In training an assignment's time covers its forward and
    backward GEMMs, three passes, while the model counts one copy per replica: a backward re-sync and
    the gradient reduce are not counted. 0 treats copies as free. With a cost the planner compares
    its candidate plans by their time with the weight sync included (see the module docstring), so
    it keeps a replica only where the load it takes off the slowest rank outweighs its copy."""
    copy_overlap: bool = False
    """The copies run in the background while each rank computes its masters (the runtime's
    ``ManagerConfig.overlap_sync``); otherwise every rank waits for the sync before its GEMMs."""
    copy_chunks: int = 1
    """Chunks each copy arrives in, with ``copy_overlap`` (``ManagerConfig.pipeline_replicas`` with its
    ``num_chunks``): a replica's gate and up projections, 2/3 of its GEMM time, run chunk by chunk."""
    gemm_passes: int = 1
    """GEMM passes that one assignment of ``copy_cost``'s unit covers: 1 in inference (the forward), 3 in
    training (forward, data gradient and weight gradient). With ``copy_overlap`` a copy can hide only
    behind the forward pass, ``1 / gemm_passes`` of each assignment's time."""
    relay_chunks: int = 4
    """Chunks the relay trees forward each copy in (``ManagerConfig.num_chunks``): with ``m`` chunks a
    master's ``n`` copies of one expert take :func:`~ultraep.comm.relay.relay_send_chunks` ``(n, m)``
    chunk times through their tree, which sets the sync time the copy cost counts. 0 models the
    direct sync (``ManagerConfig.sync_mode="direct"``): the master sends all ``n`` copies itself."""

    def __post_init__(self) -> None:
        for name in ("balance_target", "min_replica_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"QuotaConfig.{name} must be a float, got {value!r}; pass a number")
            # A NumPy float becomes a float, so equal configs compare and hash equal.
            object.__setattr__(self, name, float(value))
        if not 1.0 <= self.balance_target < 1e6:
            raise ValueError(f"QuotaConfig.balance_target must be in [1.0, 1e6), got {self.balance_target}")
        if isinstance(self.min_replica_quota, bool) or not isinstance(self.min_replica_quota, int):
            raise TypeError(f"QuotaConfig.min_replica_quota must be an int, got {self.min_replica_quota!r}")
        if not 1 <= self.min_replica_quota <= MAX_TOTAL_LOAD:
            raise ValueError(
                f"QuotaConfig.min_replica_quota must be in [1, {MAX_TOTAL_LOAD}] (the largest load of a microbatch), "
                f"got {self.min_replica_quota}"
            )
        if not 0.0 <= self.min_replica_fraction < 1.0:
            raise ValueError(
                f"QuotaConfig.min_replica_fraction must be in [0, 1), got {self.min_replica_fraction}"
            )
        for name in ("copy_cost", "copy_chunks", "gemm_passes", "relay_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"QuotaConfig.{name} must be an int, got {value!r}")
        if not 0 <= self.copy_cost <= MAX_COPY_COST:
            raise ValueError(f"QuotaConfig.copy_cost must be in [0, {MAX_COPY_COST}] assignments, got {self.copy_cost}")
        if not 1 <= self.copy_chunks <= 1024:
            raise ValueError(f"QuotaConfig.copy_chunks must be in [1, 1024], got {self.copy_chunks}")
        if not 0 <= self.relay_chunks <= 1024:
            raise ValueError(
                f"QuotaConfig.relay_chunks must be in [0, 1024], got {self.relay_chunks}; pass ManagerConfig.num_chunks, "
                "or 0 for sync_mode='direct'"
            )
        if not 1 <= self.gemm_passes <= 16:
            raise ValueError(
                f"QuotaConfig.gemm_passes must be in [1, 16], got {self.gemm_passes}; use 1 for inference and 3 for training"
            )
        for name in ("prefer_local", "copy_overlap", "stop_at_target"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"QuotaConfig.{name} must be a bool, got {value!r}; use True or False")
        if self.copy_chunks > 1 and not self.copy_overlap:
            raise ValueError(
                f"QuotaConfig.copy_chunks={self.copy_chunks} needs copy_overlap=True (chunks arrive while the masters "
                "compute); set copy_overlap=True or copy_chunks=1"
            )
        if self.num_rounds is not None and (isinstance(self.num_rounds, bool) or not isinstance(self.num_rounds, int)):
            raise TypeError(
                f"QuotaConfig.num_rounds must be None or an int, got {self.num_rounds!r}; pass an int in [1, 64] or None"
            )
        if self.num_rounds is not None and not 1 <= self.num_rounds <= 64:
            raise ValueError(f"QuotaConfig.num_rounds must be None or in [1, 64], got {self.num_rounds}")


class QuotaPlanner(Planner):
    """Exact-quota replication planner (the default). See the module docstring for the method."""

    name = "quota"

    def __init__(self, config: QuotaConfig | None = None, *, backend=None, **settings) -> None:
        """Build the planner from a :class:`QuotaConfig` or from its fields as keyword settings.

        Settings: ``balance_target`` (1.001), ``min_replica_quota`` (1), ``min_replica_fraction``
        (0.001), ``prefer_local`` (True), ``num_rounds`` (None: slots + 7), ``stop_at_target`` (False),
        ``copy_cost`` (0), ``copy_overlap`` (False), ``copy_chunks`` (1), ``gemm_passes`` (1),
        ``relay_chunks`` (4); see :class:`QuotaConfig`.
        backend: which implementation plans, as for :func:`ultraep.kernels.plan_quota`: ``"auto"``
          (compiled C on CPU tensors, Triton on CUDA tensors), ``"triton"``, ``"native"`` or ``"torch"``
          (the PyTorch reference, :func:`plan_reference`); ``None`` reads ``ULTRAEP_KERNEL_BACKEND``
          now. Every backend returns the same plan, bit for bit.
        Call the planner object, ``planner(loads, layout)``, to validate the load matrix and plan.
        """
        from ultraep.kernels.dispatch import KernelConfig, _as_config

        if config is not None and not isinstance(config, QuotaConfig):
            raise TypeError(
                f"config must be a QuotaConfig, got {type(config).__name__} {config!r}; pass QuotaConfig(...) or the "
                "settings as keywords, e.g. QuotaPlanner(balance_target=1.01)"
            )
        self.config = config if config is not None else QuotaConfig(**settings)
        if config is not None and settings:
            raise TypeError(f"pass either config or settings, not both (got settings {sorted(settings)})")
        self.kernel_config: KernelConfig = _as_config(backend)
        self._implementations: dict[torch.device, str] = {}

    def __call__(
        self,
        loads: torch.Tensor,
        layout: ExpertLayout,
        *,
        check_values: bool = True,
        resident: torch.Tensor | None = None,
    ) -> Plan:
        """Validate the load matrix and plan, as :meth:`Planner.__call__` does.

        resident: None, or [num_ranks, redundant_slots_per_rank] integer tensor on ``loads.device``:
          the logical expert whose current weights each redundant slot still contains from an earlier
          microbatch, -1 = none. The planner then also tries plans that reuse them, and counts no copy
          for a replica of a resident expert ("Resident replicas" in the module docstring). With
          ``check_values`` its values are checked (:func:`check_resident`).

        On CPU tensors the compiled C planner checks the values in its first pass over the loads, with
        the same errors, so the host reads the matrix once. A subclass that overrides :meth:`plan` is
        called through it, as every other planner is, and rejects ``resident``.
        """
        from ultraep.kernels.dispatch import _plan_checked

        if type(self).plan is not QuotaPlanner.plan:
            if resident is not None:
                raise TypeError(
                    f"{type(self).__name__} overrides plan(), which takes no resident table; call it without "
                    "resident, or override __call__ too"
                )
            return super().__call__(loads, layout, check_values=check_values)
        check_load_matrix(loads, layout, check_values=False)
        return _plan_checked(self._implementation(loads.device), loads, layout, self.config, check_values, resident)

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        from ultraep.kernels.dispatch import _plan_with

        return _plan_with(self._implementation(loads.device), loads, layout, self.config)

    def _implementation(self, device: torch.device) -> str:
        """Return the backend that plans on ``device``, resolved once per device and planner."""
        implementation = self._implementations.get(device)
        if implementation is None:
            from ultraep.kernels.dispatch import resolve_backend

            implementation = self._implementations[device] = resolve_backend(self.kernel_config, device, "plan")
        return implementation


def plan_reference(
    loads: torch.Tensor, layout: ExpertLayout, config: QuotaConfig, resident: torch.Tensor | None = None
) -> Plan:
    """Plan with the quota planner in PyTorch tensor code, the reference every other backend matches bit for bit.

    loads: [num_ranks, num_experts] int64, any device, validated (entries >= 0).
    resident: None, or [num_ranks, redundant_slots_per_rank] int64 on ``loads.device``, validated by
      :func:`check_resident`: the logical expert whose current weights each redundant slot contains,
      -1 = none ("Resident replicas" in the module docstring).
    Returns a :class:`Plan` on ``loads.device``. Runs on any device with no host synchronisation
    outside the CPU.
    """
    if layout.redundant_slots_per_rank == 0 or layout.num_ranks == 1:
        return masters_only_plan(loads, layout)
    with torch.inference_mode():
        state = _match_rounds(loads, layout, config, resident)
        best = _select_candidate(state, loads, layout, config, resident)
    quota = torch.cat(
        [
            state.master_quota[best].view(layout.num_ranks, layout.experts_per_rank),
            state.slot_quota[best],
        ],
        dim=1,
    )  # [num_ranks, slots_per_rank]
    return Plan(layout, state.slot_expert[best].clone(), quota.reshape(-1))


@dataclasses.dataclass
class _CandidateState:
    """Per-threshold matching state; the leading dim ``num_candidates`` indexes thresholds."""

    thresholds: torch.Tensor  # [num_candidates]
    rank_load: torch.Tensor  # [num_candidates, num_ranks]
    master_quota: torch.Tensor  # [num_candidates, num_experts]
    slot_expert: torch.Tensor  # [num_candidates, num_ranks, redundant_slots_per_rank], -1 = empty
    slot_quota: torch.Tensor  # [num_candidates, num_ranks, redundant_slots_per_rank]
    total: torch.Tensor  # 0-dim, total load
    late: torch.Tensor  # [num_candidates] bool: second donor drain, best fit, rotated lines and resident
    num_resident: int = 0  # the last num_resident candidates are the resident family's


def _match_rounds(
    loads: torch.Tensor, layout: ExpertLayout, config: QuotaConfig, resident: torch.Tensor | None
) -> _CandidateState:
    num_ranks, experts_per_rank, slots = layout.num_ranks, layout.experts_per_rank, layout.redundant_slots_per_rank
    num_experts = layout.num_experts
    num_segments = num_experts
    device = loads.device
    int64 = torch.int64
    consts = _constants(layout, device)

    # Step 1: expert and rank loads, candidate thresholds, minimum replica quota.
    expert_load = loads.sum(dim=0)  # [num_experts]
    master_rank_load = expert_load.view(num_ranks, experts_per_rank).sum(dim=1)  # [num_ranks]
    total = expert_load.sum()
    floor = _load_floor(expert_load, master_rank_load, total, layout, consts)
    max_load = master_rank_load.max()
    gap = (max_load - floor).clamp(min=0)
    thresholds = floor + (total * consts.mean_steps) // (num_ranks * _FRACTION_SCALE)
    thresholds = torch.cat([thresholds, floor + (gap * consts.gap_steps) // _FRACTION_SCALE])
    thresholds = torch.minimum(thresholds, max_load)  # [num_thresholds]
    # Every threshold is tried with each receiver family (order o, anchor a): candidate (o, a, t) is at
    # index (o * num_anchors + a) * num_thresholds + t. With the second donor drain the families run
    # again, after those, on the first part of the ladder only.
    num_thresholds = thresholds.numel()
    receiver_families = _RECEIVER_ORDERS * len(_ANCHORS)
    family = torch.arange(receiver_families, device=device).repeat_interleave(num_thresholds)
    thresholds = thresholds.repeat(receiver_families)
    num_mean = len(_MEAN_STEPS)
    if _num_drains(slots) > 1:
        over_family = torch.arange(receiver_families, 2 * receiver_families, device=device).repeat_interleave(num_mean)
        family = torch.cat([family, over_family])
        thresholds = torch.cat([thresholds, thresholds[:num_mean].repeat(receiver_families)])
    best_fit_thresholds = floor + (total * consts.best_fit_steps) // (num_ranks * _FRACTION_SCALE)
    best_fit_thresholds = torch.minimum(best_fit_thresholds, max_load)
    num_best_fit = best_fit_thresholds.numel()
    family = torch.cat([family, torch.full_like(best_fit_thresholds, 2 * receiver_families)])
    thresholds = torch.cat([thresholds, best_fit_thresholds])  # [num_candidates]
    # With one slot, the rotated receiver lines follow on the best-fit steps: family
    # rotation_family + k runs rotation k // num_rotation_anchors + 1 with anchor
    # _ROTATION_ANCHORS[k % num_rotation_anchors].
    num_rotation_anchors = len(_ROTATION_ANCHORS)
    num_rotation_families = _num_rotations(slots) * num_rotation_anchors
    num_rotation_rows = num_rotation_families * num_best_fit
    rotation_family = 2 * receiver_families + 2
    if num_rotation_rows:
        rotation_ids = torch.arange(rotation_family, rotation_family + num_rotation_families, device=device)
        family = torch.cat([family, rotation_ids.repeat_interleave(num_best_fit)])
        thresholds = torch.cat([thresholds, best_fit_thresholds.repeat(num_rotation_families)])
    # With resident replicas, one more family runs on the first drain's ladder, last.
    resident_family = 2 * receiver_families + 1
    num_resident = num_thresholds if resident is not None else 0
    if num_resident:
        family = torch.cat([family, torch.full_like(thresholds[:num_thresholds], resident_family)])
        thresholds = torch.cat([thresholds, thresholds[:num_thresholds]])
    family = family[:, None]  # [num_candidates, 1]
    rotated = family >= rotation_family  # [num_candidates, 1]
    anchor = consts.anchors[family % len(_ANCHORS)]  # [num_candidates, 1]
    least_spare_first = (family % receiver_families >= len(_ANCHORS)) & (family < 2 * receiver_families)
    late = family >= receiver_families  # [num_candidates, 1]: second drain, best fit, rotations and resident
    second_drain = late & (family < 2 * receiver_families)
    num_rows = family.shape[0]
    best_fit_end = num_rows - num_resident - num_rotation_rows
    best_fit_rows = slice(best_fit_end - num_best_fit, best_fit_end)
    resident_rows = slice(num_rows - num_resident, num_rows)
    # After its resident rounds the resident family matches at the middle anchor, most spare first.
    anchor = torch.where(family == resident_family, _ANCHORS[0], anchor)
    rotation_index = (family - rotation_family).clamp(min=0)
    anchor = torch.where(rotated, consts.rotation_anchors[rotation_index % num_rotation_anchors], anchor)
    # The line position each rotated family's receiver line starts at; 0 leaves the line as sorted.
    rotation = torch.where(rotated, rotation_index // num_rotation_anchors + 1, 0)  # [num_candidates, 1]
    # Assignments an over-draining donor sheds beyond its excess. The plain drain sheds none extra.
    over_drain = torch.where(second_drain, (total * consts.over_drain) // (num_ranks * _FRACTION_SCALE), 0)
    by_master_quota = anchor == _BY_MASTER_QUOTA  # [num_candidates, 1]
    num_candidates = thresholds.numel()
    threshold_col = thresholds[:, None]
    min_quota = torch.clamp((total * consts.fraction_q(config)) // (num_ranks * _FRACTION_SCALE), min=config.min_replica_quota)

    # Each donor drains its masters in descending order of expert load (lower local index first on
    # ties). The order is fixed for all rounds, so master quotas are kept in drain order: drain
    # position p of rank r holds logical expert drain_expert[r * experts_per_rank + p].
    local_key = expert_load.view(num_ranks, experts_per_rank) * experts_per_rank + consts.local_tiebreak
    drain_order = torch.sort(local_key, dim=1, descending=True).indices  # [num_ranks, experts_per_rank]
    drain_expert = (drain_order + consts.rank_base).reshape(-1)  # [num_experts]
    drain_position = torch.empty_like(drain_expert).scatter_(0, drain_expert, consts.position_index)  # by logical id

    rank_load = master_rank_load.expand(num_candidates, num_ranks).clone()
    master_quota = expert_load[drain_expert].expand(num_candidates, num_experts).clone()  # drain order
    master_quota_3d = master_quota.view(num_candidates, num_ranks, experts_per_rank)
    slot_pos = torch.full((num_candidates, num_ranks, slots), -1, dtype=int64, device=device)  # drain positions
    slot_quota = torch.zeros((num_candidates, num_ranks, slots), dtype=int64, device=device)
    slots_used = torch.zeros((num_candidates, num_ranks), dtype=int64, device=device)
    slot_pos_flat = slot_pos.view(num_candidates, num_ranks * slots)
    slot_quota_flat = slot_quota.view(num_candidates, num_ranks * slots)
    rank_tiebreak = consts.rank_tiebreak
    num_rounds = default_num_rounds(config, slots)
    # Reading a CPU tensor costs no device sync, so CPU plans may stop early; the result is the same.
    stop_when_idle = device.type == "cpu"
    line_index = consts.line_index.expand(num_candidates, num_ranks)  # j for the j-th receiver on the line

    for round_idx in range(num_rounds):
        # Step 2: donor pieces, hottest master first within a donor, largest donor first.
        excess = (rank_load - threshold_col).clamp_(min=0)  # [num_candidates, num_ranks]
        shed = excess + over_drain * (excess > 0)
        drained_before = master_quota_3d.cumsum(dim=2).sub_(master_quota_3d)
        pieces = torch.minimum((shed[:, :, None] - drained_before).clamp_(min=0), master_quota_3d)
        donor_order = torch.sort(excess * num_ranks + rank_tiebreak, dim=1, descending=True).indices
        piece_line = pieces.gather(1, donor_order[:, :, None].expand(-1, -1, experts_per_rank))
        piece_end = piece_line.view(num_candidates, num_segments).cumsum(dim=1)  # [num_candidates, num_segments]

        # Step 3: receivers, most (or least) spare first; each takes the piece under its anchor point, a
        # fixed quarter of the way into its interval.
        spare = (threshold_col - rank_load).mul_(slots_used < slots).clamp_(min=0)
        order_key = torch.where(least_spare_first & (spare > 0), total + 1 - spare, spare)
        recv_rank = torch.sort(order_key * num_ranks + rank_tiebreak, dim=1, descending=True).indices
        if num_rotation_rows:
            # A rotated line moves its first `rotation` receivers with spare behind the others.
            with_spare = (spare > 0).sum(dim=1, keepdim=True).clamp_(min=1)
            rotated_index = (line_index + rotation) % with_spare
            recv_rank = recv_rank.gather(1, torch.where(line_index < with_spare, rotated_index, line_index))
        recv_spare = spare.gather(1, recv_rank)  # [num_candidates, num_ranks]
        resident_spare = recv_spare[resident_rows].clone()
        offered_end = recv_spare.cumsum(dim=1)
        anchor_point = offered_end - recv_spare + (recv_spare * anchor) // 4
        # Receivers with spare come first and anchor points ascend, so segment ids ascend along the line.
        segment = torch.searchsorted(piece_end, anchor_point, right=True)
        active = (recv_spare > 0) & (segment < num_segments)
        segment.clamp_(max=num_segments - 1)
        donor_rank = donor_order.gather(1, consts.segment_donor_idx[segment])
        position = donor_rank * experts_per_rank + consts.segment_local_idx[segment]  # drain position

        # By master quota: the j-th receiver takes the j-th positive piece by its master's remaining
        # quota (lower drain position first on ties). Each piece has one receiver, so the segment
        # that groups receivers becomes the receiver's own line index.
        piece_key = torch.where(
            pieces.view(num_candidates, num_segments) > 0, master_quota * num_experts + consts.position_tiebreak, -1
        )
        ranked = torch.sort(piece_key, dim=1, descending=True, stable=True)
        ranked_key, ranked_position = ranked.values[:, :num_ranks], ranked.indices[:, :num_ranks]
        active = torch.where(by_master_quota, (recv_spare > 0) & (ranked_key >= 0), active)
        position = torch.where(by_master_quota, ranked_position, position)
        donor_rank = torch.where(by_master_quota, ranked_position // experts_per_rank, donor_rank)
        segment = torch.where(by_master_quota, line_index, segment)
        # The best-fit candidates are the last rows; only they run its round.
        fit_position, fit_amount = _best_fit_round(
            rank_load[best_fit_rows], threshold_col[best_fit_rows], master_quota[best_fit_rows], recv_spare[best_fit_rows],
            min_quota, layout, consts,
        )

        # Step 4: fill each receiver up to the threshold, capped by what the master still holds;
        # receivers served by one piece draw from it in line order.
        offered = recv_spare.mul_(active)
        before = _offered_before_in_group(offered, segment)
        amount = torch.minimum((master_quota.gather(1, position) - before).clamp_(min=0), offered)
        amount.mul_(amount >= min_quota)
        amount[best_fit_rows] = fit_amount
        position[best_fit_rows] = fit_position
        donor_rank[best_fit_rows] = fit_position // experts_per_rank
        resident_round = num_resident > 0 and round_idx < slots
        if resident_round:
            # Round k: each receiver draws on the expert in its k-th resident slot.
            held_position = torch.where(resident[:, round_idx] >= 0, drain_position[resident[:, round_idx].clamp(min=0)], -1)
            res_position, res_amount = _resident_round(
                rank_load[resident_rows], threshold_col[resident_rows], master_quota[resident_rows], resident_spare,
                held_position[recv_rank[resident_rows]], min_quota, layout, consts,
            )
            amount[resident_rows] = res_amount
            position[resident_rows] = res_position
            donor_rank[resident_rows] = res_position // experts_per_rank

        # Step 5: write replicas; a receiver that already holds the expert grows that replica.
        take = amount > 0
        if stop_when_idle and not resident_round and not bool(take.any()):
            # Nothing moved, so the state is unchanged and every later round would repeat this one. A
            # resident round is followed by rounds that match differently, so it never stops the loop.
            break
        used = slots_used.gather(1, recv_rank)
        if slots == 1:
            # A receiver with a free slot holds no replica yet.
            slot_idx = used.clamp_(max=0)
            new_slot = take
        else:
            match = slot_pos.gather(1, recv_rank[:, :, None].expand(-1, -1, slots)) == position[:, :, None]
            holds = match.any(dim=2)
            slot_idx = torch.where(holds, match.to(torch.uint8).argmax(dim=2), used.clamp_(max=slots - 1))
            new_slot = take & ~holds
        flat_slot = recv_rank * slots + slot_idx
        slot_pos_flat.scatter_(1, flat_slot, torch.where(take, position, slot_pos_flat.gather(1, flat_slot)))
        slot_quota_flat.scatter_add_(1, flat_slot, amount)
        slots_used.scatter_add_(1, recv_rank, new_slot.to(int64))
        master_quota.scatter_add_(1, position, -amount)
        rank_load.scatter_add_(1, recv_rank, amount)
        rank_load.scatter_add_(1, donor_rank, -amount)

    # Back from drain positions to logical expert ids.
    slot_expert = torch.where(slot_pos >= 0, drain_expert[slot_pos.clamp(min=0)], -1)
    master_quota = torch.empty_like(master_quota).scatter_(1, drain_expert.expand(num_candidates, -1), master_quota)
    return _CandidateState(
        thresholds, rank_load, master_quota, slot_expert, slot_quota, total, late[:, 0], num_resident
    )


def _best_fit_round(
    rank_load: torch.Tensor,
    threshold_col: torch.Tensor,
    master_quota: torch.Tensor,
    recv_spare: torch.Tensor,
    min_quota: torch.Tensor,
    layout: ExpertLayout,
    consts: _Constants,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one best-fit round's (drain position, amount), each [num_candidates, num_ranks] in receiver order.

    The bins are the masters of the donors (ranks above the threshold) that still hold quota. Every
    receiver with spare picks the bin with the least quota that covers its spare (lower drain position
    first on ties), or the fullest bin when none does. A bin serves the receivers that picked it in
    line order, each with its whole spare, as long as the spares so far fit. When the first one's
    spare does not fit, it takes the whole bin.
    """
    num_experts = layout.num_experts
    big = torch.iinfo(torch.int64).max
    donor = rank_load > threshold_col  # [num_candidates, num_ranks]
    eligible = donor.repeat_interleave(layout.experts_per_rank, dim=1) & (master_quota > 0)  # [num_candidates, num_experts]
    bin_key = torch.where(eligible, master_quota * num_experts + consts.position_index, big)
    bin_key = torch.sort(bin_key, dim=1).values  # eligible bins by quota, then drain position
    num_bins = eligible.sum(dim=1, keepdim=True)  # [num_candidates, 1]
    first_fit = torch.searchsorted(bin_key, recv_spare * num_experts)  # first bin whose quota covers the spare
    pick = torch.where(first_fit < num_bins, first_fit, num_bins - 1).clamp_(min=0)
    key = bin_key.gather(1, pick)
    active = (recv_spare > 0) & (num_bins > 0)
    position = torch.where(active, key % num_experts, 0)
    bin_quota = torch.where(active, key // num_experts, 0)

    offered = recv_spare * active
    before = _offered_before_in_bin(offered, position, active, consts)
    amount = torch.where(before == 0, torch.minimum(offered, bin_quota), offered * (before + offered <= bin_quota))
    amount = amount * (amount >= min_quota)
    return position, amount


def check_resident(
    resident: torch.Tensor, layout: ExpertLayout, device: torch.device, *, check_values: bool = True
) -> torch.Tensor:
    """Check a table of resident replicas and return it as int64.

    resident: [num_ranks, redundant_slots_per_rank] integer tensor on ``device``; entry ``[r, k]`` is
      the logical expert whose current weights slot ``k`` of rank ``r`` contains, or -1. With
      ``check_values`` (reads the table on the host) every entry must lie in [-1, num_experts) and
      name an expert mastered on another rank.
    Raises ``TypeError`` or ``ValueError`` naming the bad value.
    """
    if not isinstance(resident, torch.Tensor):
        raise TypeError(f"resident must be a torch.Tensor or None, got {type(resident).__name__}")
    shape = (layout.num_ranks, layout.redundant_slots_per_rank)
    if tuple(resident.shape) != shape:
        raise ValueError(
            f"resident must have shape [num_ranks, redundant_slots_per_rank] = {list(shape)}, got {list(resident.shape)}"
        )
    if resident.dtype.is_floating_point or resident.dtype.is_complex or resident.dtype == torch.bool:
        raise TypeError(f"resident must be an integer tensor, got {resident.dtype}")
    if resident.device != device:
        raise ValueError(f"resident is on {resident.device} but the loads are on {device}; move it to {device}")
    resident = resident.to(torch.int64)
    if check_values and resident.numel():
        bad = (resident < -1) | (resident >= layout.num_experts)
        if bool(bad.any()):
            r, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"resident[{r}, {k}] = {int(resident[r, k])} is not a logical expert id; use ids in "
                f"[0, {layout.num_experts}) or -1 for a slot that holds none"
            )
        ranks = torch.arange(layout.num_ranks, device=device)[:, None]
        own = (resident >= 0) & (resident // layout.experts_per_rank == ranks)
        if bool(own.any()):
            r, k = (int(i) for i in own.nonzero()[0])
            raise ValueError(
                f"resident[{r}, {k}] = {int(resident[r, k])} is mastered on rank {r} itself, and a rank never "
                "replicates its own masters; pass -1 for that slot"
            )
    return resident


def _resident_round(
    rank_load: torch.Tensor,
    threshold_col: torch.Tensor,
    master_quota: torch.Tensor,
    recv_spare: torch.Tensor,
    held_position: torch.Tensor,
    min_quota: torch.Tensor,
    layout: ExpertLayout,
    consts: _Constants,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one resident round's (drain position, amount), each [num_candidates, num_ranks] in receiver order.

    held_position: [num_candidates, num_ranks], the drain position of the expert in each receiver's
    resident slot of this round, -1 = none. A receiver with spare takes from that expert's master
    when the master's rank lies above the threshold and the master has quota left. The receivers of
    one master draw on it in line order, each up to its spare.
    """
    position = held_position.clamp(min=0)
    donor = rank_load.gather(1, position // layout.experts_per_rank) > threshold_col
    quota_left = master_quota.gather(1, position)
    active = (held_position >= 0) & donor & (quota_left > 0) & (recv_spare > 0)
    position = position * active
    offered = recv_spare * active
    before = _offered_before_in_bin(offered, position, active, consts)
    amount = torch.minimum(offered, (quota_left - before).clamp_(min=0))
    return position, amount * (amount >= min_quota)


def _offered_before_in_bin(
    offered: torch.Tensor, position: torch.Tensor, active: torch.Tensor, consts: _Constants
) -> torch.Tensor:
    """Return [num_candidates, num_ranks] int64: what the active receivers before each one in line
    order offered to the same bin (drain ``position``). All three arguments are in receiver order."""
    num_ranks = offered.shape[1]
    group_key = torch.where(active, position * num_ranks + consts.line_index, torch.iinfo(torch.int64).max)
    grouped = torch.sort(group_key, dim=1)
    before_sorted = _offered_before_in_group(offered.gather(1, grouped.indices), grouped.values // num_ranks)
    return torch.empty_like(before_sorted).scatter_(1, grouped.indices, before_sorted)


def _offered_before_in_group(offered: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Return what the receivers before each one in its group offered, along dim 1.

    offered: [rows, n] int64, >= 0. group: [rows, n], equal ids adjacent along dim 1.
    """
    offered_before = offered.cumsum(dim=1) - offered
    group_start = torch.ones_like(group, dtype=torch.bool)
    group_start[:, 1:] = group[:, 1:] != group[:, :-1]
    return offered_before - torch.cummax(offered_before * group_start, dim=1).values


def load_floor(loads: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Return a lower bound of the max rank load of every plan for ``loads`` (the load floor).

    loads: [num_ranks, num_experts] integer tensor, any device, entries >= 0.
    Returns a 0-dim int64 tensor on ``loads.device``: at least the rounded-up mean rank load, and
    higher when some ranks cannot reach the mean even with their redundant slots holding the largest
    experts of other ranks. No plan that keeps the masters in place and puts at most one instance of
    an expert on a rank goes below it. The quota planner's threshold ladder starts here.
    """
    check_load_matrix(loads, layout)
    loads = loads.to(torch.int64)
    expert_load = loads.sum(dim=0)
    master_rank_load = expert_load.view(layout.num_ranks, layout.experts_per_rank).sum(dim=1)
    return _load_floor(expert_load, master_rank_load, expert_load.sum(), layout, _constants(layout, loads.device))


def _load_floor(
    expert_load: torch.Tensor, master_rank_load: torch.Tensor, total: torch.Tensor, layout: ExpertLayout, consts: _Constants
) -> torch.Tensor:
    """Return a 0-dim int64 lower bound of the max rank load of every plan.

    A rank ends with at most its masters' load plus, in its redundant slots, the ``s`` largest experts
    of other ranks (its capacity). If the smallest ``k`` capacities sum to ``S_k``, the other
    ``num_ranks - k`` ranks carry at least ``total - S_k``, so some rank carries at least
    ``ceil((total - S_k) / (num_ranks - k))``. The bound is the largest of these; ``k = 0`` gives the
    rounded-up mean. A rank with much spare but only small experts to copy from raises it.
    """
    num_ranks, experts_per_rank, slots = layout.num_ranks, layout.experts_per_rank, layout.redundant_slots_per_rank
    # The s largest experts of other ranks are among the s + experts_per_rank largest of all.
    top = torch.topk(expert_load, min(layout.num_experts, slots + experts_per_rank))
    other = (top.indices // experts_per_rank)[None, :] != consts.line_index[:, None]  # [num_ranks, k]
    counted = other & (other.cumsum(dim=1) <= slots)
    capacity = master_rank_load + (top.values * counted).sum(dim=1)  # [num_ranks]
    capacity = torch.sort(capacity).values
    below = capacity.cumsum(dim=0) - capacity
    rest = num_ranks - consts.line_index  # ranks not among the k smallest capacities
    return ((total - below + rest - 1) // rest).max()


@dataclasses.dataclass
class _Constants:
    """Index tensors that depend only on the layout and device, built once per planner."""

    mean_steps: torch.Tensor  # [num_mean_steps] int64
    best_fit_steps: torch.Tensor  # [num_best_fit_steps] int64
    over_drain: int  # _OVER_DRAIN in units of 1 / _FRACTION_SCALE
    anchors: torch.Tensor  # [num_anchors] int64, quarters
    rotation_anchors: torch.Tensor  # [len(_ROTATION_ANCHORS)] int64, quarters
    gap_steps: torch.Tensor  # [num_gap_steps] int64
    rank_tiebreak: torch.Tensor  # [num_ranks]: num_ranks-1 .. 0, lower rank first on ties
    line_index: torch.Tensor  # [num_ranks]: 0 .. num_ranks-1
    position_tiebreak: torch.Tensor  # [num_experts]: num_experts-1 .. 0, lower drain position first on ties
    position_index: torch.Tensor  # [num_experts]: 0 .. num_experts-1
    local_tiebreak: torch.Tensor  # [experts_per_rank]: lower local index first on ties
    rank_base: torch.Tensor  # [num_ranks, 1]: rank * experts_per_rank
    segment_donor_idx: torch.Tensor  # [num_experts]: segment // experts_per_rank
    segment_local_idx: torch.Tensor  # [num_experts]: segment % experts_per_rank

    def fraction_q(self, config: QuotaConfig) -> int:
        return _to_fixed_point(config.min_replica_fraction)


_CONSTANTS_CACHE: dict = {}


def _constants(layout: ExpertLayout, device: torch.device) -> _Constants:
    key = (layout.num_ranks, layout.experts_per_rank, str(device))
    cached = _CONSTANTS_CACHE.get(key)
    if cached is not None:
        return cached
    num_ranks, experts_per_rank = layout.num_ranks, layout.experts_per_rank
    segment = torch.arange(layout.num_experts, device=device)
    cached = _Constants(
        anchors=torch.tensor(_ANCHORS, dtype=torch.int64, device=device),
        rotation_anchors=torch.tensor(_ROTATION_ANCHORS, dtype=torch.int64, device=device),
        mean_steps=torch.tensor(_MEAN_STEPS_Q, dtype=torch.int64, device=device),
        best_fit_steps=torch.tensor(_BEST_FIT_STEPS_Q, dtype=torch.int64, device=device),
        over_drain=_OVER_DRAIN_Q,
        gap_steps=torch.tensor(_GAP_STEPS_Q, dtype=torch.int64, device=device),
        rank_tiebreak=torch.arange(num_ranks - 1, -1, -1, device=device),
        line_index=torch.arange(num_ranks, device=device),
        position_tiebreak=torch.arange(layout.num_experts - 1, -1, -1, device=device),
        position_index=torch.arange(layout.num_experts, device=device),
        local_tiebreak=torch.arange(experts_per_rank - 1, -1, -1, device=device),
        rank_base=torch.arange(num_ranks, device=device)[:, None] * experts_per_rank,
        segment_donor_idx=segment // experts_per_rank,
        segment_local_idx=segment % experts_per_rank,
    )
    if len(_CONSTANTS_CACHE) < 64:
        _CONSTANTS_CACHE[key] = cached
    return cached


def relay_send_table(num_ranks: int, relay_chunks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return [num_ranks + 1] int64 on ``device``: entry ``n`` is the link time of ``n`` copies of one
    expert through its relay tree, in chunk times (:func:`~ultraep.comm.relay.relay_send_chunks`).
    ``relay_chunks = 0`` (direct copies) gives ``n`` whole copies.

    Every backend reads the copy model's sender times from this table, so they agree exactly. The
    entries never decrease with ``n``.
    """
    return torch.tensor(_relay_send_row(num_ranks, relay_chunks), dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def _relay_send_row(num_ranks: int, relay_chunks: int) -> tuple[int, ...]:
    from ultraep.comm.relay import relay_send_chunks

    if relay_chunks == 0:
        return tuple(range(num_ranks + 1))
    return tuple(relay_send_chunks(n, relay_chunks) for n in range(num_ranks + 1))


def _relay_units(config: QuotaConfig) -> int:
    """Return the chunks per copy that the relay send table counts in: ``relay_chunks``, or 1 for direct copies."""
    return max(1, config.relay_chunks)


def copy_cost_in_assignments(
    bytes_per_expert: float, flops_per_assignment: float, link_bytes_per_s: float, flops_per_s: float
) -> int:
    """Return ``QuotaConfig.copy_cost``: one expert copy's time in assignments' worth of GEMM time.

    bytes_per_expert: bytes of one expert's weights.
    flops_per_assignment: FLOPs of one (token, expert) assignment. Pass the forward FLOPs for
      inference and three times them (forward and backward) for training.
    link_bytes_per_s: achieved bandwidth of the link a copy takes.
    flops_per_s: achieved grouped-GEMM FLOP/s.
    For a bf16 SwiGLU expert the bytes and the forward FLOPs are both ``6 * hidden * intermediate``,
    so the inference cost is ``flops_per_s / link_bytes_per_s``. Returns an int in [1, MAX_COPY_COST].
    """
    values = {
        "bytes_per_expert": bytes_per_expert,
        "flops_per_assignment": flops_per_assignment,
        "link_bytes_per_s": link_bytes_per_s,
        "flops_per_s": flops_per_s,
    }
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"copy_cost_in_assignments: {name} must be a positive finite number, got {value!r}")
    cost = (bytes_per_expert / link_bytes_per_s) / (flops_per_assignment / flops_per_s)
    return min(MAX_COPY_COST, max(1, round(cost)))


def _costed_peak(
    state: _CandidateState, layout: ExpertLayout, config: QuotaConfig, resident: torch.Tensor | None
) -> torch.Tensor:
    """Return [num_candidates] int64: each plan's slowest rank with the weight sync counted.

    Units are assignments; the model is "Copy cost" in the module docstring. A replica whose expert
    is resident in one of its rank's slots needs no copy.
    """
    num_candidates = state.rank_load.shape[0]
    num_ranks, experts_per_rank = layout.num_ranks, layout.experts_per_rank
    filled = _copied_slots(state, resident)  # [num_candidates, num_ranks, slots]
    units = _relay_units(config)
    chunks_in = filled.sum(dim=2) * units  # [num_candidates, num_ranks], in chunk times
    fan = torch.zeros(num_candidates, layout.num_experts, dtype=torch.int64, device=filled.device)
    fan.scatter_add_(1, state.slot_expert.clamp(min=0).view(num_candidates, -1), filled.view(num_candidates, -1).to(torch.int64))
    send_table = relay_send_table(num_ranks, config.relay_chunks, filled.device)
    chunks_out = send_table[fan].view(num_candidates, num_ranks, experts_per_rank).sum(dim=2)
    busiest = torch.maximum(chunks_in, chunks_out).max(dim=1, keepdim=True).values
    sync = busiest * config.copy_cost // units  # [num_candidates, 1]
    if config.copy_overlap:
        chunks, passes = config.copy_chunks, config.gemm_passes
        master_load = state.master_quota.view(num_candidates, num_ranks, experts_per_rank).sum(dim=2)
        replica_load = state.rank_load - master_load
        forward_sync = sync * passes  # in units of one assignment's forward GEMM
        first_chunk = forward_sync // chunks + replica_load
        last_chunk = forward_sync + replica_load * (chunks + 2) // (3 * chunks)
        forward = torch.maximum(state.rank_load, torch.maximum(first_chunk, last_chunk))
        busy = (state.rank_load * (passes - 1) + forward) // passes
        peak = torch.where(chunks_in > 0, busy, state.rank_load).max(dim=1).values
    else:
        peak = state.rank_load.max(dim=1).values + sync[:, 0]
    return peak.clamp_(max=_COSTED_PEAK_LIMIT)


def _copied_slots(state: _CandidateState, resident: torch.Tensor | None) -> torch.Tensor:
    """Return [num_candidates, num_ranks, slots] bool: filled slots whose expert is not resident on their rank."""
    filled = state.slot_expert >= 0
    if resident is not None:
        filled &= ~(state.slot_expert[:, :, :, None] == resident[None, :, None, :]).any(dim=3)
    return filled


def _select_candidate(
    state: _CandidateState, loads: torch.Tensor, layout: ExpertLayout, config: QuotaConfig, resident: torch.Tensor | None
) -> torch.Tensor:
    """Return a 0-dim int64 index of the best candidate, chosen without reading values on the host."""
    num_ranks = layout.num_ranks
    # [num_candidates]: the peak the choice compares.
    max_load = _costed_peak(state, layout, config, resident) if config.copy_cost else state.rank_load.max(dim=1).values
    # Replicas that need a copy: with resident slots a plan that reuses them wins a tie.
    num_replicas = _copied_slots(state, resident).sum(dim=(1, 2))

    target_q = _to_fixed_point(config.balance_target)
    first_drain = _first_drain_steps(state, max_load, num_ranks, target_q, config.stop_at_target)

    # A candidate of the second drain, best fit or a rotated line takes part only if its threshold lies
    # below every first-drain plan's max rank load, so the compiled planner does not plan the others.
    plain_peak = state.rank_load.max(dim=1).values
    best_first_drain = torch.where(first_drain, plain_peak, plain_peak.max() + 1).min()
    late = state.late & (state.thresholds < best_first_drain)
    scaled = max_load * (num_ranks * _FRACTION_SCALE)
    within_target = scaled <= state.total * target_q
    if config.stop_at_target:
        # With a good first-drain plan the search stops there.
        late = late & ~(first_drain & within_target).any()
    valid = first_drain | late
    if state.num_resident:
        # The resident family takes part at the ladder steps where the first drain does. Above them a
        # plan rarely ends below its threshold, which lies above the lowest peak so far.
        valid[-state.num_resident :] = first_drain[: state.num_resident]

    # Plans at or below the balance target, or tied with the best, are equally good.
    best_load = torch.where(valid, max_load, max_load.max() + 1).min()
    good = valid & ((max_load == best_load) | within_target)
    fewest = torch.where(good, num_replicas, num_replicas.max() + 1).min()
    good = good & (num_replicas == fewest)

    if config.prefer_local:
        local = _local_assignments(state, loads, layout)
        max_local = torch.where(good, local, -1).max()
        good = good & (local == max_local)
    lowest = torch.where(good, max_load, max_load.max() + 1).min()
    good = good & (max_load == lowest)
    # First index among the survivors; argmax of an int tensor returns the first maximum.
    return torch.argmax(good.to(torch.int64))


def _first_drain_steps(
    state: _CandidateState, max_load: torch.Tensor, num_ranks: int, target_q: int, stop_at_target: bool
) -> torch.Tensor:
    """Return [num_candidates] bool: the first-drain candidates that take part in the choice.

    The first drain's ladder steps take part in ascending order of threshold (lower step first on
    ties) while each threshold lies at or below the balance target or at or below the lowest peak
    (``max_load``) of the steps before it. From the first step that does neither, the first drain's
    candidates drop out. A plan rarely ends below its threshold, so those steps could almost never
    win, and the compiled planner does not plan them: on balanced loads it plans 3 of the 21 steps.
    With ``stop_at_target`` they also drop out from the first step after one with a plan at or below
    the balance target.
    """
    num_steps = len(_MEAN_STEPS) + len(_GAP_STEPS)
    num_first = _RECEIVER_ORDERS * len(_ANCHORS) * num_steps
    # The two parts of the ladder overlap, so the steps go by threshold. A stable sort keeps ties in step order.
    order = torch.sort(state.thresholds[:num_steps], stable=True).indices  # [num_steps]
    step_threshold = state.thresholds[order]
    step_peak = max_load[:num_first].view(-1, num_steps).min(dim=0).values[order]
    # Lowest peak of the steps before each step. The first step has none before it.
    bar = torch.cat([step_peak.new_full((1,), _COSTED_PEAK_LIMIT + 1), step_peak[:-1]]).cummin(dim=0).values
    within_target = step_threshold * (num_ranks * _FRACTION_SCALE) <= state.total * target_q
    stays = within_target | (step_threshold <= bar)
    if stop_at_target:
        # The first step has no plan below it, so it always takes part. Every later step has a bar from a plan.
        good_before = bar * (num_ranks * _FRACTION_SCALE) <= state.total * target_q
        good_before[0] = False
        stays = stays & ~good_before
    takes_part = torch.empty_like(state.late[:num_steps])
    takes_part[order] = stays.to(torch.int64).cumprod(dim=0).bool()
    first_drain = torch.zeros_like(state.late)
    first_drain[:num_first] = takes_part.repeat(num_first // num_steps)
    return first_drain


def _local_assignments(state: _CandidateState, loads: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Return [num_candidates] int64: assignments an instance on their own source rank can serve."""
    num_ranks, experts_per_rank = layout.num_ranks, layout.experts_per_rank
    # own[e] = loads[master_rank(e), e]: tokens of expert e produced on its master's rank.
    own = torch.diagonal(loads.view(num_ranks, num_ranks, experts_per_rank), dim1=0, dim2=1).t().reshape(-1)
    master_local = torch.minimum(state.master_quota, own).sum(dim=1)
    rank_ids = torch.arange(num_ranks, device=loads.device)[None, :, None]
    flat = rank_ids * layout.num_experts + state.slot_expert.clamp(min=0)
    replica_tokens = loads.reshape(-1)[flat]
    replica_local = torch.where(state.slot_expert >= 0, torch.minimum(state.slot_quota, replica_tokens), 0)
    return master_local + replica_local.sum(dim=(1, 2))
