"""Replay balancing policies side by side over microbatch loads and compare them with the ideal.

A run has three phases:

1. A :class:`Workload`: load matrices ``[num_microbatches, num_layers, num_ranks, num_experts]`` formed
   from a token trace, a step-load trace or a synthetic generator, with a description of the forming.
2. :func:`plan_policies`: every policy's planner runs over the microbatches in order, one planner
   per layer, and history-based planners observe each microbatch after it ran. The first
   ``warmup_microbatches`` only fill their history and are not measured. Plans do not depend on the
   model or the hardware, so one planning pass serves every model.
3. :func:`evaluate`: the cost model times every measured layer and microbatch for each policy and
   for the ideal, and the result is summarised per policy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners.base import Planner
from ultraep.planners.quota import copy_cost_in_assignments
from ultraep.planners.registry import make_planner
from ultraep.runtime.slot_cache import cached_slot_order
from ultraep.sim.cost import (
    REPLICA_LIFETIMES,
    CostSettings,
    ideal_layer_costs,
    layer_costs,
    layer_time_lower_bound,
    link_rates,
)
from ultraep.sim.hardware import HardwareConfig
from ultraep.sim.models import ModelConfig
from ultraep.traces import (
    LoadTrace,
    TokenTrace,
    microbatch_loads,
    moving_hot_loads,
    step_loads_to_matrices,
    zipf_loads,
)

__all__ = [
    "DATA_KINDS",
    "PolicyPlans",
    "PolicyResult",
    "PolicySpec",
    "SimulationResult",
    "Workload",
    "copy_cost_settings",
    "default_policies",
    "evaluate",
    "expert_mapping",
    "format_rows",
    "largest_divisor_at_most",
    "load_trace_workload",
    "mean_over_models",
    "plan_for_models",
    "plan_policies",
    "read_csv",
    "read_json",
    "replay",
    "synthetic_workload",
    "token_trace_workload",
    "write_csv",
    "write_json",
]

logger = logging.getLogger(__name__)

DATA_KINDS = ("token", "step_loads", "aggregate", "synthetic")

DEFAULT_QUOTA_SLOTS = (1, 2, 4)
DEFAULT_BASELINE_SLOTS = (2,)
# Re-place every 4 microbatches from the last 4: far more often than a production EPLB, which favours
# the periodic baselines on short traces.
DEFAULT_EPLB_WINDOW = 4
DEFAULT_EPLB_INTERVAL = 4
QUOTA_BUFFERS = ("shared", "layer")


# Policies.


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """One balancing policy of a run."""

    label: str
    """Name in tables, e.g. ``"quota s=2"``."""
    planner: str
    """Planner name: ``"none"``, ``"quota"``, ``"eplb"``, ``"lp_reroute"`` or another registry name."""
    redundant_slots_per_rank: int
    """Redundant slots per rank the planner may fill."""
    settings: tuple[tuple[str, object], ...] = ()
    """Planner settings as ``(name, value)`` pairs."""
    replica_lifetime: str = "microbatch"
    """``"microbatch"``: replicas are refilled every microbatch in buffers shared by all layers.
    ``"layer"``: planned every microbatch into per-layer buffers, so a replica that stays in its slot
    is not copied again while the weights are unchanged. ``"persistent"``: they stay until the
    placement changes."""
    planner_on_critical_path: bool = True
    """False for planners that re-place periodically in the background (``eplb``)."""
    plan_with_resident: bool = False
    """``"layer"`` lifetime with the ``quota`` planner: pass the planner, as ``resident``, the experts
    whose weights each slot still contains from the layer's earlier microbatches, as the runtime does
    with ``ManagerConfig.plan_with_resident``. :func:`plan_for_models` turns it off in training, where
    every forward copies every replica, so no slot contains current weights."""

    def __post_init__(self) -> None:
        if self.replica_lifetime not in REPLICA_LIFETIMES:
            raise ValueError(
                f"PolicySpec.replica_lifetime must be one of {list(REPLICA_LIFETIMES)}, got {self.replica_lifetime!r}"
            )
        slots = self.redundant_slots_per_rank
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ValueError(f"PolicySpec.redundant_slots_per_rank must be an int >= 0, got {slots!r}")
        if self.plan_with_resident and (self.replica_lifetime != "layer" or self.planner != "quota"):
            raise ValueError(
                f"PolicySpec.plan_with_resident needs replica_lifetime='layer' and planner='quota', got "
                f"{self.replica_lifetime!r} and {self.planner!r}; set plan_with_resident=False"
            )

    def make_planner(self) -> Planner:
        """Build a fresh planner for one layer."""
        return make_planner(self.planner, **dict(self.settings))


def default_policies(
    quota_slots: Sequence[int] = DEFAULT_QUOTA_SLOTS,
    baseline_slots: Sequence[int] = DEFAULT_BASELINE_SLOTS,
    *,
    eplb_window: int = DEFAULT_EPLB_WINDOW,
    eplb_interval: int = DEFAULT_EPLB_INTERVAL,
    quota_buffers: Sequence[str] = QUOTA_BUFFERS,
    quota_settings: tuple[tuple[str, object], ...] = (),
    plan_with_resident: bool = False,
) -> tuple[PolicySpec, ...]:
    """Return ``none``, then ``eplb`` and ``lp_reroute`` per baseline slot count, then ``quota`` per slot count.

    quota_buffers: ``"shared"`` adds ``quota s=N``, with one redundant-slot buffer set for all layers
    (the runtime's default). ``"layer"`` adds ``quota s=N layer-buffers``, with one set per layer
    (``ManagerConfig.buffer_layers``), which is the memory the persistent policies use.
    quota_settings: ``QuotaConfig`` settings as ``(name, value)`` pairs for every ``quota`` policy.
    plan_with_resident: the layer-buffer policies plan with their resident slots
    (:attr:`PolicySpec.plan_with_resident`) and are labelled ``quota s=N layer-buffers resident``.
    """
    unknown = sorted(set(quota_buffers) - set(QUOTA_BUFFERS))
    if unknown or not quota_buffers:
        raise ValueError(f"quota_buffers must name some of {list(QUOTA_BUFFERS)}, got {list(quota_buffers)}")
    periodic = (("window", eplb_window), ("interval", eplb_interval))
    policies = [PolicySpec("none", "none", 0, planner_on_critical_path=False)]
    for slots in baseline_slots:
        policies.append(PolicySpec(f"eplb s={slots}", "eplb", slots, periodic, "persistent", planner_on_critical_path=False))
    for slots in baseline_slots:
        policies.append(PolicySpec(f"lp_reroute s={slots}", "lp_reroute", slots, periodic, "persistent"))
    for buffers in (b for b in QUOTA_BUFFERS if b in quota_buffers):
        for slots in quota_slots:
            if buffers == "shared":
                policies.append(PolicySpec(f"quota s={slots}", "quota", slots, tuple(quota_settings)))
            else:
                policies.append(
                    PolicySpec(
                        f"quota s={slots} layer-buffers" + (" resident" if plan_with_resident else ""),
                        "quota", slots, tuple(quota_settings), "layer", plan_with_resident=plan_with_resident,
                    )
                )
    return tuple(policies)


# Workloads.


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """Load matrices of every layer and microbatch, and how they were formed."""

    loads: torch.Tensor
    """[num_microbatches, num_layers, num_ranks, num_experts] int64, CPU. ``loads[b, layer, src_rank,
    expert]``: assignments produced on ``src_rank`` for a logical expert."""
    trace_top_k: int
    """Experts each token picks in the routing that produced the loads."""
    label: str
    """Short name of the data, e.g. the trace file's name."""
    data_kind: str
    """``"token"``, ``"step_loads"``, ``"aggregate"`` or ``"synthetic"``."""
    resampled: bool
    """True when tokens come from sequences drawn with replacement."""
    description: str
    """Description in words of how the ranks and microbatches were formed."""
    tokens_per_rank: float
    """Tokens on each rank in one microbatch (a mean for step-load traces)."""
    warmup_microbatches: int = 0
    """Leading microbatches that only fill planner history and are not measured."""

    def __post_init__(self) -> None:
        if not isinstance(self.loads, torch.Tensor) or self.loads.dim() != 4:
            raise ValueError(
                "Workload.loads must be a [num_microbatches, num_layers, num_ranks, num_experts] tensor, got "
                f"{list(self.loads.shape) if isinstance(self.loads, torch.Tensor) else type(self.loads).__name__}"
            )
        if self.loads.dtype != torch.int64:
            raise TypeError(f"Workload.loads must be int64, got {self.loads.dtype}")
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"Workload.data_kind must be one of {list(DATA_KINDS)}, got {self.data_kind!r}")
        if not 0 <= self.warmup_microbatches < self.loads.shape[0]:
            raise ValueError(
                f"Workload.warmup_microbatches must be in [0, num_microbatches - 1] = [0, {self.loads.shape[0] - 1}], "
                f"got {self.warmup_microbatches}; at least one microbatch must be measured"
            )

    @property
    def num_microbatches(self) -> int:
        return self.loads.shape[0]

    @property
    def num_layers(self) -> int:
        return self.loads.shape[1]

    @property
    def num_ranks(self) -> int:
        return self.loads.shape[2]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[3]

    @property
    def kind_label(self) -> str:
        """The data kind in words, with the resampling mark; synthetic data is always labelled SYNTHETIC."""
        words = {
            "token": "real token trace",
            "step_loads": "real per-step loads, even split over source ranks",
            "aggregate": "real corpus totals (one row per corpus), even split over source ranks",
            "synthetic": "SYNTHETIC loads",
        }[self.data_kind]
        return words + (", RESAMPLED sequences" if self.resampled else "")


def largest_divisor_at_most(value: int, limit: int) -> int:
    """Return the largest divisor of ``value`` that is <= ``limit`` (0 when ``limit`` < 1)."""
    return max((d for d in range(1, min(value, limit) + 1) if value % d == 0), default=0)


def token_trace_workload(
    trace: TokenTrace,
    num_ranks: int,
    tokens_per_rank: int,
    *,
    resample: bool = False,
    seed: int = 0,
    num_microbatches: int | None = None,
    warmup_microbatches: int = DEFAULT_EPLB_WINDOW,
    label: str = "token trace",
) -> Workload:
    """Slice a token trace into microbatches of ``tokens_per_rank`` tokens per rank.

    Without ``resample`` every whole microbatch the trace fills is used, or only the first
    ``warmup_microbatches + num_microbatches`` of them when ``num_microbatches`` is given, and the
    warm-up shrinks so that at least one microbatch is measured. With ``resample``,
    ``warmup_microbatches + num_microbatches`` microbatches are formed from whole sequences drawn with
    replacement (``num_microbatches`` defaults to 8).
    """
    if resample:
        measured = 8 if num_microbatches is None else num_microbatches
        formed = microbatch_loads(
            trace, num_ranks, tokens_per_rank, resample=True, seed=seed, num_microbatches=warmup_microbatches + measured
        )
    else:
        formed = microbatch_loads(trace, num_ranks, tokens_per_rank)
    loads, cap_words = _first_microbatches(formed.loads, num_microbatches if not resample else None, warmup_microbatches)
    warmup = min(warmup_microbatches, loads.shape[0] - 1)
    return Workload(
        loads=loads,
        trace_top_k=trace.topk,
        label=label,
        data_kind="token",
        resampled=formed.resampled,
        description=f"{formed.description} {cap_words}{_warmup_words(warmup)}",
        tokens_per_rank=float(tokens_per_rank),
        warmup_microbatches=warmup,
    )


def _first_microbatches(loads: torch.Tensor, num_microbatches: int | None, warmup_microbatches: int) -> tuple[torch.Tensor, str]:
    """Return the first ``warmup_microbatches + num_microbatches`` microbatches (all with ``None``) and a
    sentence that states how many were kept, or an empty one when all were."""
    if num_microbatches is None or warmup_microbatches + num_microbatches >= loads.shape[0]:
        return loads, ""
    num_kept = warmup_microbatches + num_microbatches
    return loads[:num_kept], f"Only the first {num_kept} of the {loads.shape[0]} microbatches are used. "


def load_trace_workload(
    trace: LoadTrace,
    num_ranks: int,
    *,
    num_microbatches: int | None = None,
    warmup_microbatches: int = DEFAULT_EPLB_WINDOW,
    label: str = "load trace",
) -> Workload:
    """Turn each row of a step-load or aggregate trace into one microbatch over ``num_ranks`` ranks.

    The trace has no source ranks, so each expert's count is split evenly over the source ranks
    (``step_loads_to_matrices``). The split only decides which rank sends, and the cost model gives
    no credit for that. With ``num_microbatches`` only the first ``warmup_microbatches +
    num_microbatches`` rows are used.
    """
    loads, cap_words = _first_microbatches(step_loads_to_matrices(trace, num_ranks), num_microbatches, warmup_microbatches)
    warmup = min(warmup_microbatches, loads.shape[0] - 1)
    tokens_per_rank = float(trace.loads[0, 0].sum()) / trace.top_k / num_ranks
    row_word = "step" if trace.kind == "step_loads" else "corpus row"
    description = (
        f"Each {row_word} of the trace ({trace.num_steps} in file order) is one microbatch; each expert's count "
        f"is split evenly over {num_ranks} source ranks (the trace has no source ranks), about "
        f"{tokens_per_rank:.0f} tokens per rank. {cap_words}{_warmup_words(warmup)}"
    )
    return Workload(
        loads=loads,
        trace_top_k=trace.top_k,
        label=label,
        data_kind="step_loads" if trace.kind == "step_loads" else "aggregate",
        resampled=False,
        description=description,
        tokens_per_rank=tokens_per_rank,
        warmup_microbatches=warmup,
    )


def synthetic_workload(
    generator: str,
    num_ranks: int,
    num_experts: int,
    tokens_per_rank: int,
    top_k: int,
    *,
    skew: float = 1.0,
    num_microbatches: int = 8,
    num_layers: int = 4,
    seed: int = 0,
    warmup_microbatches: int = DEFAULT_EPLB_WINDOW,
) -> Workload:
    """Generate labelled synthetic loads: ``"zipf"`` (static Zipf popularity) or ``"moving"`` (hot experts move).

    ``warmup_microbatches + num_microbatches`` microbatches are generated.
    """
    total = warmup_microbatches + num_microbatches
    if generator == "zipf":
        loads = zipf_loads(
            num_ranks, num_experts, tokens_per_rank, top_k, skew, num_microbatches=total, num_layers=num_layers, seed=seed
        )
        what = f"static Zipf popularity with skew {skew}"
    elif generator == "moving":
        loads = moving_hot_loads(
            num_ranks, num_experts, tokens_per_rank, top_k, num_microbatches=total, num_layers=num_layers, seed=seed
        )
        what = "hot experts that move every microbatch"
    else:
        raise ValueError(f"generator must be 'zipf' or 'moving', got {generator!r}")
    description = (
        f"SYNTHETIC: {total} microbatches x {num_layers} layers x {num_ranks} ranks x {tokens_per_rank} tokens per "
        f"rank, top-{top_k} of {num_experts} experts, {what} (seed={seed}). {_warmup_words(warmup_microbatches)}"
    )
    return Workload(
        loads=loads,
        trace_top_k=top_k,
        label=f"synthetic {generator}",
        data_kind="synthetic",
        resampled=False,
        description=description,
        tokens_per_rank=float(tokens_per_rank),
        warmup_microbatches=warmup_microbatches,
    )


def _warmup_words(warmup: int) -> str:
    if warmup == 0:
        return "No microbatch is held back as planner history, so eplb and lp_reroute start without history."
    return f"The first {warmup} microbatch(es) only fill planner history and are not measured."


def expert_mapping(workload: Workload, model: ModelConfig) -> str:
    """Describe in words how the workload's experts map to the model's."""
    scale = model.top_k / workload.trace_top_k
    experts_per_rank = workload.num_experts // workload.num_ranks
    megabytes = model.bytes_per_expert / 1e6
    if workload.data_kind == "synthetic" and workload.num_experts == model.num_experts and scale == 1.0:
        return (
            f"Synthetic loads generated with the model's own {model.num_experts} experts and top-{model.top_k}; "
            f"each expert has hidden {model.hidden_size}, intermediate {model.expert_intermediate_size} "
            f"({megabytes:.1f} MB bf16)."
        )
    return (
        f"Routing from the data, sizes from the model: the layer has the data's {workload.num_experts} logical "
        f"experts ({experts_per_rank} per rank) and their routing; each expert has the {model.display_name} expert shape "
        f"(hidden {model.hidden_size}, intermediate {model.expert_intermediate_size}, {megabytes:.1f} MB bf16), "
        f"and each recorded assignment counts as {scale:g} model assignments (top-{model.top_k} / "
        f"top-{workload.trace_top_k}), so a token costs the model's {model.top_k} expert passes. The model itself "
        f"has {model.num_experts} experts; per-rank expert weights here are {experts_per_rank} x {megabytes:.1f} MB."
    )


# Planning.


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyPlans:
    """Every plan of one policy over a workload."""

    spec: PolicySpec
    """The policy."""
    layout: ExpertLayout
    """Layout with the policy's redundant slots."""
    quota: torch.Tensor
    """[num_microbatches, num_layers, num_slots] int64, CPU. Quota of every physical slot."""
    replica_expert_ids: torch.Tensor
    """[num_microbatches, num_layers, num_ranks, redundant_slots_per_rank] int64, CPU; -1 = empty."""
    synced: torch.Tensor
    """[num_microbatches, num_layers, num_ranks, redundant_slots_per_rank] bool, CPU. Slots whose
    expert differs from the previous microbatch of the same layer (every filled slot in microbatch 0).
    For the ``"layer"`` lifetime each rank's slots are first permuted as the runtime does
    (:func:`~ultraep.runtime.slot_cache.cached_slot_order`), and a slot is synced when it did not hold
    its replica's expert already."""
    planner_wall_s: torch.Tensor
    """[num_microbatches, num_layers] float64, CPU. Wall time of each planner call on this host, after one
    untimed call that loads libraries and fills caches."""


def plan_policies(
    workload: Workload, policies: Sequence[PolicySpec], *, progress: bool | None = None
) -> list[PolicyPlans]:
    """Run every policy's planners over the workload, microbatch by microbatch.

    Each layer gets its own planner (history belongs to a layer); after each plan call the planner
    observes that microbatch's loads. ``progress``: show a progress bar; ``None`` shows it when
    standard error is a terminal.
    """
    num_microbatches, num_layers, num_ranks, num_experts = workload.loads.shape
    show = sys.stderr.isatty() if progress is None else progress
    total_calls = len(policies) * num_microbatches * num_layers
    results = []
    with tqdm(total=total_calls, desc="planning", unit="plan", disable=not show, leave=False) as bar:
        for spec in policies:
            layout = ExpertLayout.from_num_experts(num_experts, num_ranks, spec.redundant_slots_per_rank)
            planners = [spec.make_planner() for _ in range(num_layers)]
            # One untimed call first: the first call of a process loads or compiles libraries and fills
            # caches, which a run with few measured plans would otherwise count as planner time.
            spec.make_planner()(workload.loads[0, 0], layout)
            quota = torch.empty(num_microbatches, num_layers, layout.num_slots, dtype=torch.int64)
            replicas = torch.empty(num_microbatches, num_layers, num_ranks, spec.redundant_slots_per_rank, dtype=torch.int64)
            wall = torch.empty(num_microbatches, num_layers, dtype=torch.float64)
            slot_cache = _SlotCache(num_layers, num_ranks, spec.redundant_slots_per_rank) if spec.plan_with_resident else None
            for microbatch_idx in range(num_microbatches):
                for layer_idx in range(num_layers):
                    loads = workload.loads[microbatch_idx, layer_idx]
                    start = time.perf_counter()
                    if slot_cache is None:
                        plan = planners[layer_idx](loads, layout)
                    else:
                        # Timed with the call: the runtime builds the table on the critical path too.
                        plan = planners[layer_idx](loads, layout, resident=slot_cache.resident(layer_idx))
                    wall[microbatch_idx, layer_idx] = time.perf_counter() - start
                    planners[layer_idx].observe(loads, layout)
                    quota[microbatch_idx, layer_idx] = plan.quota.cpu()
                    replicas[microbatch_idx, layer_idx] = plan.replica_expert_ids.cpu()
                    if slot_cache is not None:
                        slot_cache.place_plan(layer_idx, microbatch_idx, plan)
                bar.update(num_layers)
            if spec.replica_lifetime == "layer":
                quota, replicas, synced = _place_in_cached_slots(quota, replicas, layout)
            else:
                previous = torch.cat([torch.full_like(replicas[:1], -1), replicas[:-1]], dim=0)
                synced = (replicas >= 0) & (replicas != previous)
            results.append(PolicyPlans(spec, layout, quota, replicas, synced, wall))
            logger.debug("planned %s: median %.3f ms per call", spec.label, float(wall.median()) * 1e3)
    return results


class _SlotCache:
    """Contents of each layer's per-layer slots, filled plan by plan as the runtime's slot cache fills them."""

    def __init__(self, num_layers: int, num_ranks: int, width: int) -> None:
        self.contents: list[list[list[int | None]]] = [[[None] * width for _ in range(num_ranks)] for _ in range(num_layers)]
        self.last_use = [[[-1] * width for _ in range(num_ranks)] for _ in range(num_layers)]

    def resident(self, layer: int) -> torch.Tensor:
        """Return [num_ranks, width] int64: the expert each slot of ``layer`` contains, -1 = none."""
        flat = [-1 if expert is None else expert for row in self.contents[layer] for expert in row]
        return torch.tensor(flat, dtype=torch.int64).view(len(self.contents[layer]), -1)

    def place(self, layer: int, microbatch: int, rank: int, row: list[int], row_quota: list[int]) -> tuple[list[int], list[bool]]:
        """Place one rank's planned replicas (expert ids and quotas by slot) with
        :func:`~ultraep.runtime.slot_cache.cached_slot_order` and return its ``(order, copied)``."""
        requested = [expert if expert >= 0 and q > 0 else None for expert, q in zip(row, row_quota, strict=True)]
        contents, last_use = self.contents[layer][rank], self.last_use[layer][rank]
        order, copied = cached_slot_order(requested, contents, last_use)
        for k, j in enumerate(order):
            if requested[j] is not None:
                contents[k] = requested[j]
                last_use[k] = microbatch
        return order, copied

    def place_plan(self, layer: int, microbatch: int, plan: Plan) -> None:
        """Place every rank's replicas of ``plan``."""
        layout = plan.layout
        replica_ids = plan.replica_expert_ids.cpu().tolist()
        replica_quota = plan.quota.cpu().view(layout.num_ranks, layout.slots_per_rank)[:, layout.experts_per_rank :].tolist()
        for rank in range(layout.num_ranks):
            self.place(layer, microbatch, rank, replica_ids[rank], replica_quota[rank])


def copy_cost_settings(
    workload: Workload, model: ModelConfig, hardware: HardwareConfig, settings: CostSettings
) -> tuple[tuple[str, object], ...]:
    """Return the ``QuotaConfig`` copy settings that describe this run's weight sync to the planner.

    ``copy_cost`` is one expert copy's time over the slowest link an EP group of this size uses:
    NVLink when the group fits in one NVLink domain, the network otherwise. Its unit is one of the
    trace's assignments of grouped-GEMM time, scaled by ``model.top_k / trace top-k`` like the cost
    model. In training an assignment costs three GEMM passes (forward, data gradient, weight
    gradient) while the planner counts one copy per replica, so the cost is a third of the prefill one,
    and ``gemm_passes`` is 3, since a background copy hides only behind the forward pass.
    ``copy_overlap`` and ``copy_chunks`` follow ``overlap_sync``, ``pipeline_replicas`` and
    ``sync_chunks``, and ``relay_chunks`` is ``sync_chunks`` (0 with the direct sync scheme).
    """
    nvlink, network = link_rates(hardware, settings)
    link = nvlink if workload.num_ranks <= hardware.domain_size else network
    scale = model.top_k / workload.trace_top_k
    gemm_passes = 3 if settings.mode == "train" else 1
    cost = copy_cost_in_assignments(
        model.bytes_per_expert,
        model.flops_per_assignment * scale * gemm_passes,
        link,
        hardware.peak_flops * settings.efficiency.gemm,
    )
    chunks = settings.sync_chunks if settings.overlap_sync and settings.pipeline_replicas else 1
    return (
        ("copy_cost", cost),
        ("copy_overlap", settings.overlap_sync),
        ("copy_chunks", chunks),
        ("gemm_passes", gemm_passes),
        ("relay_chunks", 0 if settings.sync_scheme == "direct" else settings.sync_chunks),
    )


def plan_for_models(
    workload: Workload,
    policies: Sequence[PolicySpec],
    models: Sequence[ModelConfig],
    hardware: HardwareConfig,
    settings: CostSettings,
    *,
    copy_cost: bool = True,
    cache: dict | None = None,
    progress: bool | None = None,
) -> list[list[PolicyPlans]]:
    """Plan every policy for every model: one list of plans per model, in policy order.

    copy_cost: give each ``quota`` policy the copy settings of :func:`copy_cost_settings`, which
      depend on the model and the sync settings. A copy setting that the policy's own settings
      already name keeps its value, and every other policy's plans are shared by all models.
    cache: plans by policy spec (with its copy settings) for this workload, filled and reused across
      calls, so runs that differ only in cost settings plan each distinct spec once.
    """
    cache = {} if cache is None else cache
    per_model = []
    for model in models:
        extra = copy_cost_settings(workload, model, hardware, settings)
        specs = []
        for spec in policies:
            if spec.plan_with_resident and settings.mode == "train":
                # Every training forward copies every replica, so no slot contains current weights.
                label = spec.label.removesuffix(" resident")
                spec = dataclasses.replace(spec, label=label, plan_with_resident=False)
            if copy_cost and spec.planner == "quota":
                named = {name for name, _ in spec.settings}
                added = tuple((name, value) for name, value in extra if name not in named)
                spec = dataclasses.replace(spec, settings=spec.settings + added)
            specs.append(spec)
        missing = list(dict.fromkeys(spec for spec in specs if spec not in cache))
        cache.update(zip(missing, plan_policies(workload, missing, progress=progress)))
        per_model.append([cache[spec] for spec in specs])
    return per_model


def _place_in_cached_slots(
    quota: torch.Tensor, replicas: torch.Tensor, layout: ExpertLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permute each rank's redundant slots as the runtime does with per-layer buffers, and mark the copies.

    quota: [num_microbatches, num_layers, num_slots] int64; replicas: [num_microbatches, num_layers,
    num_ranks, redundant_slots_per_rank] int64, -1 = empty. Each layer keeps what its slots hold across
    microbatches (:func:`~ultraep.runtime.slot_cache.cached_slot_order`); a replica with quota 0 needs
    no weights. Returns the permuted quota and replicas and ``synced`` [num_microbatches, num_layers,
    num_ranks, redundant_slots_per_rank] bool: the slots that receive a copy.
    """
    num_microbatches, num_layers, num_ranks, width = replicas.shape
    masters = layout.experts_per_rank
    quota_view = quota.view(num_microbatches, num_layers, num_ranks, layout.slots_per_rank)
    replica_quota = quota_view[..., masters:].tolist()
    replica_ids = replicas.tolist()
    # Permuted in place on the nested lists, converted back to tensors once.
    new_ids, new_quota, synced = replicas.tolist(), quota_view[..., masters:].tolist(), replicas.ge(0).tolist()
    cache = _SlotCache(num_layers, num_ranks, width)
    for layer in range(num_layers):
        for microbatch in range(num_microbatches):
            for rank in range(num_ranks):
                row = replica_ids[microbatch][layer][rank]
                row_quota = replica_quota[microbatch][layer][rank]
                order, copied = cache.place(layer, microbatch, rank, row, row_quota)
                new_ids[microbatch][layer][rank] = [row[j] for j in order]
                new_quota[microbatch][layer][rank] = [row_quota[j] for j in order]
                synced[microbatch][layer][rank] = copied
    out_quota = quota_view.clone()
    out_quota[..., masters:] = torch.tensor(new_quota, dtype=quota.dtype).view(out_quota[..., masters:].shape)
    out_replicas = torch.tensor(new_ids, dtype=replicas.dtype).view(replicas.shape)
    return out_quota.view_as(quota), out_replicas, torch.tensor(synced, dtype=torch.bool).view(replicas.shape)


# Results.


@dataclasses.dataclass(frozen=True)
class PolicyResult:
    """Summary of one policy over the measured layers and microbatches of a run."""

    policy: str
    """Policy label."""
    planner: str
    """Planner name."""
    redundant_slots_per_rank: int
    """Redundant slots per rank."""
    throughput_pct_of_ideal: float
    """100 x (sum of ideal layer times) / (sum of the policy's layer times)."""
    speedup_over_none: float
    """(sum of ``none`` layer times) / (sum of the policy's); NaN when ``none`` is not in the run."""
    imbalance_before_mean: float
    """Mean over samples of max/mean rank load with masters only."""
    imbalance_before_p99: float
    """99th percentile of the same."""
    imbalance_after_mean: float
    """Mean over samples of max/mean rank load under the policy's plans."""
    imbalance_after_p99: float
    """99th percentile of the same."""
    replicas_per_layer: float
    """Mean filled redundant slots per layer and microbatch."""
    bytes_moved_per_layer: float
    """Mean replica weight and gradient bytes sent per layer and microbatch."""
    layer_time_us: float
    """Mean layer time (forward, plus backward in training), microseconds."""
    ideal_layer_time_us: float
    """Mean ideal layer time, microseconds."""
    balancing_time_us: float
    """Mean planner + sync + re-sync + gradient-reduce time per layer, microseconds."""
    planner_time_us: float
    """Planner time on the critical path per layer, microseconds."""
    planner_wall_us: float
    """Median wall time of one planner call measured on this host, microseconds."""
    planner_time_source: str
    """Origin of :attr:`planner_time_us`: measured, set by the caller, or off the critical path."""


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """One run: a workload on one model and system, every policy side by side."""

    model: str
    """Model name (or ``"mean over N models"``)."""
    hardware: str
    """System name."""
    num_ranks: int
    """EP size."""
    mode: str
    """``"train"`` or ``"prefill"``."""
    trace: str
    """Workload label."""
    data_kind: str
    """Workload data kind."""
    resampled: bool
    """True when sequences were drawn with replacement."""
    tokens_per_rank: float
    """Tokens per rank in one microbatch."""
    num_microbatches: int
    """Measured microbatches."""
    num_layers: int
    """Layers of the workload."""
    warmup_microbatches: int
    """Microbatches used only as planner history."""
    description: str
    """Description of how the ranks and microbatches were formed."""
    mapping: str
    """Description of how the workload's experts map to the model's."""
    rows: tuple[PolicyResult, ...]
    """One summary per policy, in run order."""
    copy_bound_pct_of_ideal: float = math.nan
    """Upper bound, in % of ideal, on a policy that copies every replica it uses within the microbatch.
    Per layer and microbatch such a policy takes at least the smaller of the masters-only time and
    ``max(forward bound, one expert copy over the fastest link) + backward bound``, with the bounds of
    :func:`ultraep.sim.cost.layer_time_lower_bound`. Persistent replicas, and in prefill slots that
    still contain their weights, skip the copy, so those policies can exceed it."""

    def row(self, policy: str) -> PolicyResult:
        """Return the row of the policy labelled ``policy``; raise ``KeyError`` naming the labels."""
        for row in self.rows:
            if row.policy == policy:
                return row
        raise KeyError(f"no policy {policy!r} in this result; policies are {[row.policy for row in self.rows]}")

    def to_dict(self) -> dict:
        """Return the result as plain Python values (the JSON format)."""
        data = dataclasses.asdict(self)
        data["rows"] = [dataclasses.asdict(row) for row in self.rows]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> SimulationResult:
        """Rebuild a result from :meth:`to_dict` output."""
        fields = {field.name for field in dataclasses.fields(cls)}
        # Files written before a field with a default existed load with that default.
        values = {name: data[name] for name in fields if name != "rows" and name in data}
        rows = tuple(PolicyResult(**row) for row in data["rows"])
        return cls(**values, rows=rows)

    def to_json(self, path: str | Path) -> None:
        """Write the result as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> SimulationResult:
        """Read a result written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | Path) -> None:
        """Write one CSV line per policy; the run's fields repeat on every line."""
        write_csv([self], path)

    @classmethod
    def from_csv(cls, path: str | Path) -> list[SimulationResult]:
        """Read the results written by :meth:`to_csv` or :func:`write_csv`, in file order."""
        return read_csv(path)

    def format_table(self) -> str:
        """Return the run's header lines and a fixed-width table of its policies."""
        lines = [
            f"model {self.model} | hardware {self.hardware} | EP{self.num_ranks} | mode {self.mode} | "
            f"trace {self.trace} ({self._kind_words()})",
            f"microbatches: {self.description}",
            f"measured: {self.num_microbatches} microbatch(es) x {self.num_layers} layers; "
            f"tokens per rank {self.tokens_per_rank:.0f}",
            f"experts: {self.mapping}",
            f"copy bound: a policy that copies every replica it uses within the microbatch reaches at most "
            f"{self.copy_bound_pct_of_ideal:.1f}% of ideal here",
        ]
        lines.extend(format_rows(self.rows))
        return "\n".join(lines)

    def _kind_words(self) -> str:
        words = {"token": "real token trace", "step_loads": "real per-step loads", "aggregate": "real corpus totals",
                 "synthetic": "SYNTHETIC"}.get(self.data_kind, self.data_kind)
        return words + (", RESAMPLED" if self.resampled else "")


TABLE_HEADER = (
    "policy",
    "throughput % of ideal",
    "speedup over none",
    "imbalance before (mean/p99)",
    "after (mean/p99)",
    "replicas/layer",
    "bytes moved/layer",
    "planner us (source)",
)


def format_rows(rows: Iterable[PolicyResult]) -> list[str]:
    """Return the table lines (header, rule, one line per policy)."""
    cells = [list(TABLE_HEADER)]
    for row in rows:
        cells.append(
            [
                row.policy,
                f"{row.throughput_pct_of_ideal:.1f}",
                "-" if math.isnan(row.speedup_over_none) else f"{row.speedup_over_none:.3f}x",
                f"{row.imbalance_before_mean:.3f} / {row.imbalance_before_p99:.3f}",
                f"{row.imbalance_after_mean:.3f} / {row.imbalance_after_p99:.3f}",
                f"{row.replicas_per_layer:.1f}",
                _format_bytes(row.bytes_moved_per_layer),
                f"{row.planner_time_us:.0f} ({row.planner_time_source})",
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return lines


def _format_bytes(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f} GB"
    if value >= 1e6:
        return f"{value / 1e6:.1f} MB"
    return f"{value / 1e3:.0f} kB"


_RUN_FIELDS = [field for field in dataclasses.fields(SimulationResult) if field.name != "rows"]
_ROW_FIELDS = list(dataclasses.fields(PolicyResult))
_PARSERS = {"int": int, "float": float, "str": str, "bool": lambda text: text == "True"}


def write_csv(results: Sequence[SimulationResult], path: str | Path) -> None:
    """Write several results into one CSV file, one line per policy and run."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([field.name for field in _RUN_FIELDS] + [field.name for field in _ROW_FIELDS])
        for result in results:
            run_values = [getattr(result, field.name) for field in _RUN_FIELDS]
            for row in result.rows:
                writer.writerow(run_values + [_csv_text(getattr(row, field.name)) for field in _ROW_FIELDS])


def read_csv(path: str | Path) -> list[SimulationResult]:
    """Read the results written by :func:`write_csv`; consecutive lines with equal run fields form one result."""
    results: list[SimulationResult] = []
    with open(path, newline="") as handle:
        for line in csv.DictReader(handle):
            run = {field.name: _csv_field(line, field, path) for field in _RUN_FIELDS}
            row = PolicyResult(**{field.name: _PARSERS[field.type](line[field.name]) for field in _ROW_FIELDS})
            if results and all(_same_value(getattr(results[-1], name), value) for name, value in run.items()):
                results[-1] = dataclasses.replace(results[-1], rows=results[-1].rows + (row,))
            else:
                results.append(SimulationResult(**run, rows=(row,)))
    return results


def _csv_field(line: Mapping[str, str], field: dataclasses.Field, path: str | Path) -> object:
    """Parse one run field of a CSV line; a column missing from files written before it existed takes its default."""
    if field.name in line:
        return _PARSERS[field.type](line[field.name])
    if field.default is dataclasses.MISSING:
        raise ValueError(f"{path}: column {field.name!r} is missing; the file was not written by write_csv")
    return field.default


def _same_value(first: object, second: object) -> bool:
    """Return whether two run fields are equal, counting NaN equal to NaN."""
    if isinstance(first, float) and isinstance(second, float) and math.isnan(first) and math.isnan(second):
        return True
    return first == second


def write_json(results: Sequence[SimulationResult], path: str | Path) -> None:
    """Write several results into one JSON file: ``{"runs": [result, ...]}``."""
    Path(path).write_text(json.dumps({"runs": [result.to_dict() for result in results]}, indent=2) + "\n")


def read_json(path: str | Path) -> list[SimulationResult]:
    """Read the results written by :func:`write_json`."""
    return [SimulationResult.from_dict(run) for run in json.loads(Path(path).read_text())["runs"]]


def _csv_text(value: object) -> object:
    # repr keeps every digit of a float, so reading the file back gives the same number.
    return repr(value) if isinstance(value, float) else value


# Evaluation.


def evaluate(
    workload: Workload,
    plans: Sequence[PolicyPlans],
    model: ModelConfig,
    hardware: HardwareConfig,
    settings: CostSettings,
    *,
    planner_time_s: Mapping[str, float] | None = None,
) -> SimulationResult:
    """Time every measured layer and microbatch for each policy and the ideal, and summarise.

    planner_time_s: planner time on the critical path per layer, by policy label or planner name
      (label wins). A policy on the critical path that is not listed uses the median wall time of its
      planner calls measured on this host. Policies off the critical path use 0.
    """
    overrides = dict(planner_time_s or {})
    warmup = workload.warmup_microbatches
    measured = workload.loads[warmup:]  # [num_measured, num_layers, num_ranks, num_experts]
    num_samples = measured.shape[0] * measured.shape[1]
    scale = model.top_k / workload.trace_top_k
    source_load = measured.sum(dim=3).reshape(num_samples, workload.num_ranks)  # [num_samples, num_ranks]
    base_layout = ExpertLayout.from_num_experts(workload.num_experts, workload.num_ranks)

    # Step 1: the ideal and the imbalance before balancing.
    if int(source_load.sum()) == 0:
        raise ValueError(
            f"the measured microbatches of {workload.label} hold no assignments, so there is no throughput to compare; "
            "use a trace or microbatches with routed tokens"
        )
    ideal = ideal_layer_costs(source_load, base_layout, model, hardware, settings, assignment_scale=scale)
    expert_load = measured.sum(dim=2)  # [num_measured, num_layers, num_experts]
    master_rank_load = expert_load.reshape(num_samples, workload.num_ranks, base_layout.experts_per_rank).sum(dim=2)
    before = _imbalance(master_rank_load)
    bound = _copy_bound(expert_load.reshape(num_samples, -1), source_load, base_layout, model, hardware, settings, scale)

    # Step 2: every policy's layer times.
    costs = {}
    planner_used = {}
    for policy_plans in plans:
        spec = policy_plans.spec
        layout = policy_plans.layout
        wall = float(policy_plans.planner_wall_s.median())
        if not spec.planner_on_critical_path:
            planner_used[spec.label] = (0.0, "off critical path" if spec.planner != "none" else "no planner")
        elif spec.label in overrides or spec.planner in overrides:
            planner_used[spec.label] = (float(overrides.get(spec.label, overrides.get(spec.planner))), "set")
        else:
            planner_used[spec.label] = (wall, "measured, this CPU")
        costs[spec.label] = layer_costs(
            policy_plans.quota[warmup:].reshape(num_samples, layout.num_slots),
            policy_plans.replica_expert_ids[warmup:].reshape(num_samples, layout.num_ranks, layout.redundant_slots_per_rank),
            source_load,
            layout,
            model,
            hardware,
            settings,
            assignment_scale=scale,
            planner_time_s=planner_used[spec.label][0],
            replica_lifetime=spec.replica_lifetime,
            synced=policy_plans.synced[warmup:].reshape(num_samples, layout.num_ranks, layout.redundant_slots_per_rank),
        )

    # Step 3: summaries.
    none_total = next((float(costs[p.spec.label].total_s.sum()) for p in plans if p.spec.planner == "none"), math.nan)
    ideal_total = float(ideal.total_s.sum())
    rows = []
    for policy_plans in plans:
        spec = policy_plans.spec
        cost = costs[spec.label]
        layout = policy_plans.layout
        quota = policy_plans.quota[warmup:].reshape(num_samples, layout.num_ranks, layout.slots_per_rank)
        after = _imbalance(quota.sum(dim=2))
        total = float(cost.total_s.sum())
        filled = (policy_plans.replica_expert_ids[warmup:] >= 0).sum(dim=(2, 3)).to(torch.float64)
        balancing = cost.planner_s + cost.sync_s + cost.resync_s + cost.grad_reduce_s
        rows.append(
            PolicyResult(
                policy=spec.label,
                planner=spec.planner,
                redundant_slots_per_rank=spec.redundant_slots_per_rank,
                throughput_pct_of_ideal=100.0 * ideal_total / total,
                speedup_over_none=none_total / total,
                imbalance_before_mean=float(before.mean()),
                imbalance_before_p99=float(torch.quantile(before, 0.99)),
                imbalance_after_mean=float(after.mean()),
                imbalance_after_p99=float(torch.quantile(after, 0.99)),
                replicas_per_layer=float(filled.mean()),
                bytes_moved_per_layer=float(cost.bytes_moved.mean()),
                layer_time_us=float(cost.total_s.mean()) * 1e6,
                ideal_layer_time_us=float(ideal.total_s.mean()) * 1e6,
                balancing_time_us=float(balancing.mean()) * 1e6,
                planner_time_us=planner_used[spec.label][0] * 1e6,
                planner_wall_us=float(policy_plans.planner_wall_s.median()) * 1e6,
                planner_time_source=planner_used[spec.label][1],
            )
        )
    return SimulationResult(
        model=model.name,
        hardware=hardware.name,
        num_ranks=workload.num_ranks,
        mode=settings.mode,
        trace=workload.label,
        data_kind=workload.data_kind,
        resampled=workload.resampled,
        tokens_per_rank=workload.tokens_per_rank,
        num_microbatches=measured.shape[0],
        num_layers=workload.num_layers,
        warmup_microbatches=warmup,
        description=workload.description,
        mapping=expert_mapping(workload, model),
        rows=tuple(rows),
        copy_bound_pct_of_ideal=100.0 * ideal_total / float(bound.sum()),
    )


def _copy_bound(
    expert_load: torch.Tensor,
    source_load: torch.Tensor,
    layout: ExpertLayout,
    model: ModelConfig,
    hardware: HardwareConfig,
    settings: CostSettings,
    scale: float,
) -> torch.Tensor:
    """Return [num_samples] float64 seconds: the copy bound of ``SimulationResult.copy_bound_pct_of_ideal``.

    expert_load: [num_samples, num_experts] int64; layout: the masters-only layout.
    """
    num_samples = expert_load.shape[0]
    no_slots = torch.empty(num_samples, layout.num_ranks, 0, dtype=torch.int64)
    masters_only = layer_costs(
        expert_load, no_slots, source_load, layout, model, hardware, settings, assignment_scale=scale,
        planner_time_s=0.0, synced=no_slots.bool(),
    )
    copy_s = model.bytes_per_expert / max(link_rates(hardware, settings))
    forward, backward = layer_time_lower_bound(source_load, layout, model, hardware, settings, assignment_scale=scale)
    with_replica = torch.clamp(forward, min=copy_s) + backward
    return torch.minimum(masters_only.total_s, with_replica)


def replay(
    workload: Workload,
    model: ModelConfig,
    hardware: HardwareConfig,
    settings: CostSettings,
    policies: Sequence[PolicySpec] | None = None,
    *,
    planner_time_s: Mapping[str, float] | None = None,
    copy_cost: bool = True,
    progress: bool | None = None,
) -> SimulationResult:
    """Plan every policy over the workload and evaluate it on one model and system (all three phases).

    copy_cost: quota policies plan with this model's copy cost (:func:`plan_for_models`).
    """
    specs = default_policies() if policies is None else policies
    plans = plan_for_models(workload, specs, [model], hardware, settings, copy_cost=copy_cost, progress=progress)[0]
    return evaluate(workload, plans, model, hardware, settings, planner_time_s=planner_time_s)


def mean_over_models(results: Sequence[SimulationResult]) -> SimulationResult:
    """Average the policy rows of runs that differ only in the model (same policies, same order).

    Throughput, speedup, times, bytes, imbalance after balancing and replica counts are arithmetic
    means over the runs (the last two differ between models when the planner counts copy costs).
    The imbalance before balancing does not depend on the model, so it comes from the first run.
    """
    if not results:
        raise ValueError("mean_over_models needs at least one result, got none")
    labels = [row.policy for row in results[0].rows]
    for result in results[1:]:
        if [row.policy for row in result.rows] != labels:
            raise ValueError(
                f"runs must list the same policies in the same order to be averaged; got {labels} and "
                f"{[row.policy for row in result.rows]}"
            )
    averaged_fields = (
        "throughput_pct_of_ideal",
        "speedup_over_none",
        "bytes_moved_per_layer",
        "layer_time_us",
        "ideal_layer_time_us",
        "balancing_time_us",
        "planner_time_us",
        "planner_wall_us",
        "imbalance_after_mean",
        "imbalance_after_p99",
        "replicas_per_layer",
    )
    rows = []
    for idx, first in enumerate(results[0].rows):
        means = {name: sum(getattr(r.rows[idx], name) for r in results) / len(results) for name in averaged_fields}
        rows.append(dataclasses.replace(first, **means))
    first = results[0]
    return dataclasses.replace(
        first,
        copy_bound_pct_of_ideal=sum(r.copy_bound_pct_of_ideal for r in results) / len(results),
        model=f"mean over {len(results)} models ({', '.join(r.model for r in results)})",
        mapping="per model, see the single-model runs",
        rows=tuple(rows),
    )


def _imbalance(rank_load: torch.Tensor) -> torch.Tensor:
    """Return [num_samples] float64 max/mean rank load (1.0 for an empty sample) of [num_samples, num_ranks] loads."""
    rank_load = rank_load.to(torch.float64)
    mean = rank_load.mean(dim=1)
    return torch.where(mean > 0, rank_load.max(dim=1).values / mean.clamp(min=1e-300), torch.ones_like(mean))
