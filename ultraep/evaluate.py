"""Replay load matrices through planners and summarise balance, replicas, locality and planner time."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from ultraep.layout import ExpertLayout
from ultraep.plan import check_plan
from ultraep.planners.base import Planner
from ultraep.reroute import source_quota

__all__ = ["PolicyResult", "evaluate_planner", "format_table", "master_imbalance"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PolicyResult:
    """Summary of one planner over every (microbatch, layer) load matrix it was given."""

    policy: str
    num_ranks: int
    redundant_slots_per_rank: int
    num_plans: int
    imbalance_before_mean: float
    imbalance_before_p99: float
    imbalance_after_mean: float
    imbalance_after_p99: float
    imbalance_after_max: float
    replicas_per_layer: float
    """Mean number of filled redundant slots per plan (one plan = one layer and microbatch)."""
    local_share: float
    """Share of assignments processed by an instance on the rank that produced them."""
    plan_ms_median: float
    plan_ms_p90: float


def master_imbalance(loads: torch.Tensor, layout: ExpertLayout) -> float:
    """Return max / mean rank load with every expert's load on its master (1.0 when there is no load).

    loads: [num_ranks, num_experts] integer tensor.
    """
    rank_load = loads.sum(dim=0).view(layout.num_ranks, layout.experts_per_rank).sum(dim=1)
    total = int(rank_load.sum())
    return 1.0 if total == 0 else int(rank_load.max()) * layout.num_ranks / total


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def evaluate_planner(
    policy: str,
    make_planner: Callable[[], Planner],
    loads: torch.Tensor,
    layout: ExpertLayout,
    *,
    check: bool = True,
    progress: Callable[[], None] | None = None,
) -> PolicyResult:
    """Plan every microbatch and layer in order and summarise the plans.

    loads: [num_microbatches, num_layers, num_ranks, num_experts] int64 CPU tensor.
    make_planner: builds one planner per layer, so history-based planners keep one history per layer;
      each planner sees microbatches in order and observes each after planning it.
    check: run :func:`~ultraep.plan.check_plan` on every plan (slower, catches broken invariants).
    Planner time is wall time of the planner call alone, on the current thread's torch settings, after one
    untimed call (on a planner of its own) that loads libraries and fills caches.
    """
    num_microbatches, num_layers = loads.shape[:2]
    planners = [make_planner() for _ in range(num_layers)]
    if num_microbatches and num_layers:
        make_planner()(loads[0, 0], layout)
    before, after, replicas, times = [], [], [], []
    local, total = 0, 0
    for microbatch in range(num_microbatches):
        for layer in range(num_layers):
            matrix = loads[microbatch, layer]
            start = time.perf_counter()
            plan = planners[layer](matrix, layout)
            times.append((time.perf_counter() - start) * 1e3)
            planners[layer].observe(matrix, layout)
            if check:
                check_plan(plan, matrix)
            before.append(master_imbalance(matrix, layout))
            after.append(plan.imbalance())
            replicas.append(int(plan.num_replicas()))
            split = source_quota(plan, matrix, check_values=False).view(layout.num_ranks, layout.num_ranks, layout.slots_per_rank)
            local += int(torch.diagonal(split, dim1=0, dim2=1).sum())
            total += int(matrix.sum())
            if progress is not None:
                progress()
    return PolicyResult(
        policy=policy,
        num_ranks=layout.num_ranks,
        redundant_slots_per_rank=layout.redundant_slots_per_rank,
        num_plans=len(after),
        imbalance_before_mean=statistics.fmean(before),
        imbalance_before_p99=_quantile(before, 0.99),
        imbalance_after_mean=statistics.fmean(after),
        imbalance_after_p99=_quantile(after, 0.99),
        imbalance_after_max=max(after),
        replicas_per_layer=statistics.fmean(replicas),
        local_share=local / total if total else 1.0,
        plan_ms_median=statistics.median(times),
        plan_ms_p90=_quantile(times, 0.9),
    )


def format_table(results: Iterable[PolicyResult]) -> str:
    """Return a markdown table of results, one row per policy and layout."""
    lines = [
        "| EP | slots | policy | imbalance before (mean / p99) | after (mean / p99 / max) | replicas/layer | local share | plan ms (median / p90) |",
        "| ---: | ---: | --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.num_ranks} | {r.redundant_slots_per_rank} | {r.policy} | "
            f"{r.imbalance_before_mean:.3f} / {r.imbalance_before_p99:.3f} | "
            f"{r.imbalance_after_mean:.4f} / {r.imbalance_after_p99:.4f} / {r.imbalance_after_max:.4f} | "
            f"{r.replicas_per_layer:.1f} | {r.local_share:.3f} | {r.plan_ms_median:.2f} / {r.plan_ms_p90:.2f} |"
        )
    return "\n".join(lines)
