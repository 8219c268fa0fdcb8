"""The ``milp`` reference: the exact optimum of the replica placement problem, for evaluation.

A mixed-integer linear program over one microbatch's expert loads, solved with HiGHS through
``scipy.optimize.milp``. For ranks ``r`` and logical experts ``e`` with load ``load[e]``:

- ``x[r, e]``, integer in ``[0, load[e]]``: assignments of ``e`` served on rank ``r``;
- ``y[r, e]``, binary, only where ``r`` is not ``e``'s master rank: rank ``r`` holds a replica of ``e``;
- ``z``, integer: the max rank load.

Constraints: ``sum_r x[r, e] = load[e]`` (exact quotas); ``x[r, e] <= load[e] * y[r, e]`` off the
master rank (no replica, no quota); ``sum_e y[r, e] <= redundant_slots_per_rank`` (capacity);
``sum_e x[r, e] <= z`` (rank load). One binary per rank and expert means at most one instance of an
expert per rank.

Phase 1 minimises ``z``. Phase 2 fixes ``z`` at the phase-1 value and minimises the number of
replicas ``sum y``. Both phases add cuts that every integer solution satisfies (see :class:`_Model`)
to tighten the LP relaxation. Each phase has its own time limit, and the result says which optimum
was proven. On 16 ranks x 64 experts with Zipf loads, phase 1 took 0.1 to 12 s while phase 2
mostly did not prove its minimum within 10 s or 60 s (scipy 1.17 with HiGHS, shared 2-core CPU). This module is meant
for instances up to 16 ranks x 64 experts and rejects much larger ones unless ``allow_large`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import scipy.optimize
import scipy.sparse
import torch

from ultraep.layout import ExpertLayout, check_load_matrix
from ultraep.plan import Plan
from ultraep.planners.base import Planner, masters_only_plan

__all__ = ["MAX_MILP_CELLS", "MilpConfig", "MilpPlanner", "MilpResult", "solve_milp"]

logger = logging.getLogger(__name__)

# Largest num_ranks * num_experts solved without allow_large=True: four times the 16 x 64 instances
# this reference is meant for. Phase 2 already misses a 60 s limit at 16 x 64, and the solve time
# grows steeply with the instance.
MAX_MILP_CELLS = 4 * 16 * 64

# HiGHS returns integer variables within its integrality tolerance (about 1e-6). Values are rounded
# to the nearest integer. A value further than this from its rounded integer is an error.
_ROUNDING_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class MilpResult:
    """Outcome of :func:`solve_milp`."""

    plan: Plan
    """The best plan found, with tensors on the load matrix's device."""
    max_rank_load: int
    """Max rank load of ``plan``; the optimum when ``status == "optimal"``."""
    lower_bound: int
    """Proven lower bound on the optimal max rank load; equals ``max_rank_load`` when ``status == "optimal"``."""
    status: str
    """``"optimal"`` when phase 1 proved ``max_rank_load`` optimal, ``"time_limit"`` when it stopped at
    the time limit; ``lower_bound`` then brackets the optimum."""
    num_replicas: int
    """Redundant slots that hold a replica in ``plan``."""
    replicas_lower_bound: int
    """Proven lower bound on the replicas any plan with max rank load ``max_rank_load`` needs; equals
    ``num_replicas`` when ``replica_status == "optimal"``."""
    replica_status: str
    """``"optimal"`` when phase 2 proved ``num_replicas`` minimal for ``max_rank_load``, ``"time_limit"``
    when it stopped at its time limit, ``"skipped"`` when phase 1 found no solution in time and the
    result is the masters-only plan."""
    solve_seconds: float
    """Wall-clock seconds of both phases together."""


@dataclasses.dataclass(frozen=True)
class MilpConfig:
    """Settings of the MILP reference planner."""

    time_limit: float = 60.0
    """Seconds phase 1 (lowest max rank load) may run, in (0, 86400]."""
    replica_time_limit: float = 10.0
    """Seconds phase 2 (fewest replicas at that max rank load) may run, in (0, 86400]. Proving the
    minimum is much harder than finding it: at 16 ranks x 64 experts phase 2 often stops at the limit
    with the best count found, while phase 1 finishes in seconds."""
    allow_large: bool = False
    """Solve instances with more than ``MAX_MILP_CELLS`` ranks x experts cells, which may take very long."""

    def __post_init__(self) -> None:
        for name in ("time_limit", "replica_time_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"MilpConfig.{name} must be a number of seconds, got {value!r}")
            if not 0 < value <= 86400:
                raise ValueError(f"MilpConfig.{name} must be in (0, 86400] seconds, got {value}")
        if not isinstance(self.allow_large, bool):
            raise TypeError(f"MilpConfig.allow_large must be a bool, got {self.allow_large!r}")


class MilpPlanner(Planner):
    """Exact MILP optimum as a planner: lowest max rank load, then fewest replicas.

    For evaluation only: it runs HiGHS on the host and can take seconds to minutes per plan. A warning
    is logged when a phase stops at its time limit, because the plan is then not proven optimal.
    """

    name = "milp"

    def __init__(self, config: MilpConfig | None = None, **settings) -> None:
        if config is not None and settings:
            raise TypeError(f"pass either config or settings, not both (got settings {sorted(settings)})")
        self.config = config if config is not None else MilpConfig(**settings)

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        """Plan one layer and microbatch.

        loads: [num_ranks, num_experts] int64, any device. Assignments per source rank and logical expert.
        Returns a plan on ``loads.device``.
        """
        result = solve_milp(
            loads,
            layout,
            time_limit=self.config.time_limit,
            replica_time_limit=self.config.replica_time_limit,
            allow_large=self.config.allow_large,
        )
        if result.status != "optimal":
            logger.warning(
                "milp: phase 1 stopped at its %.1f s time limit with max rank load %d (lower bound %d); "
                "the plan is not proven optimal",
                self.config.time_limit,
                result.max_rank_load,
                result.lower_bound,
            )
        elif result.replica_status != "optimal":
            logger.debug(
                "milp: phase 2 stopped at its %.1f s time limit with %d replicas (lower bound %d)",
                self.config.replica_time_limit,
                result.num_replicas,
                result.replicas_lower_bound,
            )
        return result.plan


def solve_milp(
    loads: torch.Tensor,
    layout: ExpertLayout,
    time_limit: float = 60.0,
    *,
    replica_time_limit: float = 10.0,
    allow_large: bool = False,
) -> MilpResult:
    """Solve for the plan with the lowest max rank load, then the fewest replicas.

    loads: [num_ranks, num_experts] integer tensor, any device. Assignments per source rank and
      logical expert; only the per-expert totals matter.
    time_limit: seconds phase 1 (lowest max rank load) may run.
    replica_time_limit: seconds phase 2 (fewest replicas at that max rank load) may run.
    allow_large: solve instances with more than ``MAX_MILP_CELLS`` ranks x experts cells.

    Raises ``ValueError`` for instances larger than ``MAX_MILP_CELLS`` cells unless ``allow_large``.
    """
    check_load_matrix(loads, layout)
    MilpConfig(time_limit=time_limit, replica_time_limit=replica_time_limit, allow_large=allow_large)
    num_cells = layout.num_ranks * layout.num_experts
    if num_cells > MAX_MILP_CELLS and not allow_large:
        raise ValueError(
            f"MILP instance num_ranks={layout.num_ranks} x num_experts={layout.num_experts} has {num_cells} cells, "
            f"more than MAX_MILP_CELLS={MAX_MILP_CELLS}, and the solve time grows steeply with size. Use a smaller instance "
            "(up to 16 ranks x 64 experts is typical) or pass allow_large=True"
        )
    start = time.perf_counter()
    loads = loads.to(torch.int64)
    expert_load = loads.sum(dim=0).cpu().numpy()  # [num_experts]
    masters_only = masters_only_plan(loads, layout)
    masters_only_max = int(masters_only.rank_load().max())

    # Step 1: trivial instances need no solver.
    if layout.redundant_slots_per_rank == 0 or layout.num_ranks == 1 or masters_only_max == 0:
        return MilpResult(
            masters_only, masters_only_max, masters_only_max, "optimal", 0, 0, "optimal", time.perf_counter() - start
        )

    # Step 2: minimise the max rank load.
    mean_ceil = -(-int(expert_load.sum()) // layout.num_ranks)
    phase1 = _Model(expert_load, layout, mean_ceil, masters_only_max).solve("max_load", time_limit)
    if phase1.x is None:
        bound = _integer_bound(phase1, mean_ceil)
        logger.debug("milp: phase 1 found no solution in %.1f s: %s", time_limit, phase1.message)
        return MilpResult(
            masters_only, masters_only_max, bound, "time_limit", 0, 0, "skipped", time.perf_counter() - start
        )
    best_max = int(round(phase1.fun))
    status = "optimal" if phase1.status == 0 else "time_limit"
    lower_bound = best_max if status == "optimal" else _integer_bound(phase1, mean_ceil)

    # Step 3: fix the max rank load and minimise the replicas.
    model = _Model(expert_load, layout, mean_ceil, best_max)
    phase2 = model.solve("replicas", replica_time_limit)
    if phase2.x is not None:
        solution = phase2.x
        replica_status = "optimal" if phase2.status == 0 else "time_limit"
    else:
        solution = phase1.x
        replica_status = "time_limit"
    replicas_lower_bound = _integer_bound(phase2, 0)

    # Step 4: the integer plan.
    plan = model.to_plan(solution, loads.device)
    max_rank_load = int(plan.rank_load().max())
    if max_rank_load > best_max:
        raise RuntimeError(
            f"MILP solution rounds to max rank load {max_rank_load}, above the solver's value {best_max}; "
            "the solver's tolerances are too loose for loads of this size"
        )
    num_replicas = int(plan.num_replicas())
    if replica_status == "optimal":
        replicas_lower_bound = num_replicas
    return MilpResult(
        plan,
        max_rank_load,
        min(lower_bound, max_rank_load),
        status,
        num_replicas,
        min(replicas_lower_bound, num_replicas),
        replica_status,
        time.perf_counter() - start,
    )


def _integer_bound(result: scipy.optimize.OptimizeResult, floor: int) -> int:
    """Return the solver's dual bound rounded up (the objective is integer), at least ``floor``."""
    bound = result.get("mip_dual_bound")
    if bound is None or not math.isfinite(bound):
        return floor
    return max(floor, math.ceil(bound - _ROUNDING_TOLERANCE))


class _Model:
    """The placement MILP for max rank loads in ``[z_lower, z_upper]``.

    Variables are ``x`` (row-major ``[num_ranks, num_experts]``), then ``y`` (off-master pairs), then ``z``.
    ``z_upper`` tightens the model: no instance serves more than ``z_upper`` assignments, so the
    big-M of ``x <= M * y`` is ``min(load[e], z_upper)``, and expert ``e`` needs at least
    ``ceil(load[e] / z_upper) - 1`` replicas.
    """

    def __init__(self, expert_load: np.ndarray, layout: ExpertLayout, z_lower: int, z_upper: int) -> None:
        self.layout = layout
        self.expert_load = expert_load
        num_ranks, num_experts = layout.num_ranks, layout.num_experts
        master_rank = np.arange(num_experts) // layout.experts_per_rank
        rank_grid, expert_grid = np.meshgrid(np.arange(num_ranks), np.arange(num_experts), indexing="ij")
        off_master = rank_grid != master_rank[None, :]  # [num_ranks, num_experts]
        y_rank = rank_grid[off_master]  # [num_y]
        y_expert = expert_grid[off_master]  # [num_y]
        num_x = num_ranks * num_experts
        num_y = y_rank.size
        self.num_x, self.num_y = num_x, num_y
        self.z_idx = num_x + num_y
        self.num_vars = num_x + num_y + 1
        x_idx = np.arange(num_x).reshape(num_ranks, num_experts)
        y_idx = num_x + np.arange(num_y)
        big_m = np.minimum(expert_load, z_upper).astype(np.float64)  # [num_experts]

        # Constraint rows as COO triplets, one block per constraint family.
        rows, cols, vals, lower, upper = [], [], [], [], []
        x_rank = np.repeat(np.arange(num_ranks), num_experts)  # [num_x], rank of each x
        x_expert = np.tile(np.arange(num_experts), num_ranks)  # [num_x], expert of each x

        # sum_r x[r, e] = load[e]
        rows += [x_expert]
        cols += [x_idx.reshape(-1)]
        vals += [np.ones(num_x)]
        lower += [expert_load]
        upper += [expert_load]
        row0 = num_experts

        # sum_e x[r, e] - z <= 0
        rows += [row0 + x_rank, row0 + np.arange(num_ranks)]
        cols += [x_idx.reshape(-1), np.full(num_ranks, self.z_idx)]
        vals += [np.ones(num_x), -np.ones(num_ranks)]
        lower += [np.full(num_ranks, -np.inf)]
        upper += [np.zeros(num_ranks)]
        row0 += num_ranks

        # sum_e y[r, e] <= redundant_slots_per_rank
        rows += [row0 + y_rank]
        cols += [y_idx]
        vals += [np.ones(num_y)]
        lower += [np.full(num_ranks, -np.inf)]
        upper += [np.full(num_ranks, layout.redundant_slots_per_rank)]
        row0 += num_ranks

        # x[r, e] - min(load[e], z_upper) * y[r, e] <= 0 off the master rank
        y_rows = row0 + np.arange(num_y)
        rows += [y_rows, y_rows]
        cols += [x_idx[y_rank, y_expert], y_idx]
        vals += [np.ones(num_y), -big_m[y_expert]]
        lower += [np.full(num_y, -np.inf)]
        upper += [np.zeros(num_y)]
        row0 += num_y

        # sum_r y[r, e] >= ceil(load[e] / z_upper) - 1: a cut the integer solutions satisfy anyway,
        # which the LP relaxation misses and which speeds up the replica phase.
        min_replicas = np.maximum(-(-expert_load // max(z_upper, 1)) - 1, 0)
        rows += [row0 + y_expert]
        cols += [y_idx]
        vals += [np.ones(num_y)]
        lower += [min_replicas]
        upper += [np.full(num_experts, np.inf)]
        row0 += num_experts

        # Rank cuts, also satisfied by every integer solution. A rank whose masters carry more than
        # z_upper must hand some expert to a replica. A rank whose masters carry less than
        # total - (num_ranks - 1) * z_upper must take a replica, because the other ranks cannot hold the rest.
        master_load = expert_load.reshape(num_ranks, layout.experts_per_rank).sum(axis=1)  # [num_ranks]
        min_rank_load = int(expert_load.sum()) - (num_ranks - 1) * z_upper
        for rank in np.nonzero(master_load > z_upper)[0]:
            owned_y = np.nonzero(master_rank[y_expert] == rank)[0]
            rows += [np.full(owned_y.size, row0)]
            cols += [y_idx[owned_y]]
            vals += [np.ones(owned_y.size)]
            lower += [np.ones(1)]
            upper += [np.full(1, np.inf)]
            row0 += 1
        for rank in np.nonzero(master_load < min_rank_load)[0]:
            rank_y = np.nonzero(y_rank == rank)[0]
            rows += [np.full(rank_y.size, row0)]
            cols += [y_idx[rank_y]]
            vals += [np.ones(rank_y.size)]
            lower += [np.ones(1)]
            upper += [np.full(1, np.inf)]
            row0 += 1

        matrix = scipy.sparse.csr_array(
            (np.concatenate(vals).astype(np.float64), (np.concatenate(rows), np.concatenate(cols))),
            shape=(row0, self.num_vars),
        )
        self.constraints = scipy.optimize.LinearConstraint(
            matrix, np.concatenate(lower).astype(np.float64), np.concatenate(upper).astype(np.float64)
        )
        x_upper = np.repeat(big_m[None, :], num_ranks, axis=0).reshape(-1)
        # A replica of an expert without load can never help, so its binary is fixed at 0.
        y_upper = (expert_load[y_expert] > 0).astype(np.float64)
        self.bounds = scipy.optimize.Bounds(
            np.concatenate([np.zeros(num_x + num_y), [float(z_lower)]]),
            np.concatenate([x_upper, y_upper, [float(z_upper)]]),
        )

    def solve(self, objective: str, time_limit: float) -> scipy.optimize.OptimizeResult:
        """Minimise ``"max_load"`` (z) or ``"replicas"`` (sum of y) within ``time_limit`` seconds."""
        cost = np.zeros(self.num_vars)
        if objective == "max_load":
            cost[self.z_idx] = 1.0
        else:
            cost[self.num_x : self.z_idx] = 1.0
        # mip_rel_gap=0: the default relative gap (1e-4 in HiGHS) would accept a max rank load one
        # assignment above the optimum once loads reach about 1e4.
        return scipy.optimize.milp(
            cost,
            integrality=np.ones(self.num_vars),
            bounds=self.bounds,
            constraints=self.constraints,
            options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "presolve": True},
        )

    def to_plan(self, solution: np.ndarray, device: torch.device) -> Plan:
        """Round a solver solution to an exact integer plan on ``device``."""
        layout = self.layout
        x_float = solution[: self.num_x].reshape(layout.num_ranks, layout.num_experts)
        x = np.rint(x_float).astype(np.int64)
        if np.abs(x - x_float).max(initial=0.0) > _ROUNDING_TOLERANCE:
            raise RuntimeError("MILP solution is not integral within tolerance; HiGHS returned an inexact solution")
        master_rank = np.arange(layout.num_experts) // layout.experts_per_rank
        expert_ids = np.arange(layout.num_experts)
        # Rounding can leave an expert's quotas a few assignments off its load; the master absorbs the rest.
        x[master_rank, expert_ids] += self.expert_load - x.sum(axis=0)
        if (x < 0).any():
            raise RuntimeError("MILP solution has a negative quota after rounding")

        replica_expert_ids = torch.full((layout.num_ranks, layout.redundant_slots_per_rank), -1, dtype=torch.int64)
        replica_quota = torch.zeros((layout.num_ranks, layout.redundant_slots_per_rank), dtype=torch.int64)
        for rank in range(layout.num_ranks):
            # A binary at 1 with quota 0 is a replica nobody uses, so only positive quotas count.
            replica_experts = [int(e) for e in np.nonzero(x[rank] > 0)[0] if master_rank[e] != rank]
            if len(replica_experts) > layout.redundant_slots_per_rank:
                raise RuntimeError(
                    f"MILP solution puts {len(replica_experts)} replicas on rank {rank}, above "
                    f"redundant_slots_per_rank={layout.redundant_slots_per_rank}"
                )
            for slot_idx, expert in enumerate(replica_experts):
                replica_expert_ids[rank, slot_idx] = expert
                replica_quota[rank, slot_idx] = int(x[rank, expert])
        masters = torch.from_numpy(x[master_rank, expert_ids].copy()).view(layout.num_ranks, layout.experts_per_rank)
        quota = torch.cat([masters, replica_quota], dim=1)  # [num_ranks, slots_per_rank]
        return Plan(layout, replica_expert_ids.to(device), quota.reshape(-1).to(device))
