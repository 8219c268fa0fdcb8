"""Triton kernels for count, plan and reroute against their PyTorch references, on the CPU.

The kernels run in the Triton interpreter in one child process started with ``TRITON_INTERPRET=1``.
Triton decides between interpreter and compiler when a ``@triton.jit`` function is defined, and
its own ``tl.sort`` is defined at ``import triton``. Setting the variable inside this module would
therefore come too late whenever anything imported Triton first. It would also switch the kernels
of a GPU test session to the interpreter. The child computes every case once and saves inputs and
kernel outputs. The tests below compare them with the references computed here, case by case.

Run: ``.venv/bin/python -m pytest tests/unit/test_kernels.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ultraep.kernels import (
    BACKEND_ENV_VAR,
    KernelConfig,
    backend_from_env,
    count_load,
    plan_quota,
    reroute_ids,
    resolve_backend,
)
from ultraep.layout import ExpertLayout
from ultraep.plan import Plan, check_plan
from ultraep.kernels.native import native_available
from ultraep.planners.quota import QuotaConfig, QuotaPlanner, plan_reference
from ultraep.reroute import count_local_load, reroute

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None


# Case tables, shared by the child (kernels) and the tests (references).


@dataclasses.dataclass(frozen=True)
class PlanCase:
    id: str
    num_ranks: int
    experts_per_rank: int
    slots: int
    loads: str  # kind of load matrix, see _make_loads
    seed: int = 0
    config: QuotaConfig = QuotaConfig()
    candidates_per_program: int | None = None
    first_row: tuple[int, ...] = ()  # loads "first_row": rank 0 produces these, the other ranks nothing
    rows: tuple[tuple[int, ...], ...] = ()  # loads "rows": rank r produces rows[r]
    resident_seed: int | None = None  # plan with a resident table from _make_resident, or without one
    resident_rows: tuple[tuple[int, ...], ...] = ()  # or with this resident table


@dataclasses.dataclass(frozen=True)
class RerouteCase:
    id: str
    num_ranks: int
    experts_per_rank: int
    slots: int
    num_tokens: int
    topk: int
    ids: str  # kind of topk_ids, see _make_topk_ids
    src_ranks: tuple[int, ...]
    dtype: torch.dtype = torch.int64
    block_size: int | None = None
    expert_tile: int | None = None


@dataclasses.dataclass(frozen=True)
class CountCase:
    id: str
    num_experts: int
    num_tokens: int
    topk: int
    dtype: torch.dtype = torch.int64
    padding: float = 0.1


def _poisson_rows(num_ranks: int, num_experts: int, seed: int) -> tuple[tuple[int, ...], ...]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_experts, generator=gen) ** 4
    loads = torch.poisson(weights[None].expand(num_ranks, -1) * 60, generator=gen).to(torch.int64)
    return tuple(tuple(row) for row in loads.tolist())


PLAN_CASES = [
    PlanCase("ep4_e32_s1_random", 4, 8, 1, "random"),
    PlanCase("ep4_e32_s0_masters_only", 4, 8, 0, "zipf"),
    PlanCase("ep8_e64_s2_zipf", 8, 8, 2, "zipf", seed=1),
    PlanCase("ep8_e32_s4_one_hot_expert", 8, 4, 4, "one_hot"),
    PlanCase("ep16_e128_s1_zipf", 16, 8, 1, "zipf", seed=2),
    PlanCase("ep16_e64_s2_all_zero", 16, 4, 2, "all_zero"),
    PlanCase("ep16_e256_s3_uniform", 16, 16, 3, "uniform"),
    PlanCase("ep32_e256_s2_ties", 32, 8, 2, "ties", seed=3),
    PlanCase("ep64_e256_s2_zipf", 64, 4, 2, "zipf", seed=4),
    PlanCase("ep64_e64_s1_large_counts", 64, 1, 1, "large", seed=5),
    PlanCase("ep4_e32_s2_one_hot_rank", 4, 8, 2, "one_rank"),
    PlanCase("ep5_e15_s2_padded_dims", 5, 3, 2, "zipf", seed=6),
    PlanCase("ep1_e8_s2_single_rank", 1, 8, 2, "random"),
    PlanCase(
        "ep8_e64_s2_target_1_no_locality_1_round",
        8, 8, 2, "zipf", seed=7,
        config=QuotaConfig(balance_target=1.0, prefer_local=False, num_rounds=1),
    ),
    PlanCase("ep8_e64_s2_large_min_quota", 8, 8, 2, "zipf", seed=8, config=QuotaConfig(min_replica_quota=400)),
    PlanCase("ep4_e16_s1_four_candidates_per_program", 4, 4, 1, "zipf", seed=9, candidates_per_program=4),
    PlanCase("ep16_e64_s2_copy_cost_blocking", 16, 4, 2, "zipf", seed=10, config=QuotaConfig(copy_cost=4096)),
    PlanCase("ep16_e64_s2_copy_cost_overlap", 16, 4, 2, "zipf", seed=10, config=QuotaConfig(copy_cost=1228, copy_overlap=True)),
    PlanCase(
        "ep64_e256_s2_copy_cost_8_chunks",
        64, 4, 2, "zipf", seed=11,
        config=QuotaConfig(copy_cost=1228, copy_overlap=True, copy_chunks=8),
    ),
    # Hand-checked in test_quota.py: only the by-master-quota anchor reaches the first plan's peak, the
    # capacity floor sets the second one's and the over-drain swap the third one's. The first-chunk
    # term and the relay tree's link time decide the next two, and the training passes the last one.
    PlanCase(
        "ep6_e6_s1_by_master_quota", 6, 1, 1, "first_row", first_row=(22, 11, 17, 10, 11, 22),
        config=QuotaConfig(balance_target=1.0),
    ),
    PlanCase(
        "ep3_e6_s1_capacity_floor", 3, 2, 1, "first_row", first_row=(30, 30, 0, 0, 30, 20),
        config=QuotaConfig(balance_target=1.0),
    ),
    PlanCase(
        "ep4_e8_s1_over_drain_swap", 4, 2, 1, "first_row", first_row=(0, 44, 17, 19, 0, 0, 0, 0),
        config=QuotaConfig(balance_target=1.0),
    ),
    PlanCase(
        "ep5_e10_s1_best_fit", 5, 2, 1, "first_row", first_row=(47, 18, 0, 0, 11, 9, 0, 0, 0, 0),
        config=QuotaConfig(balance_target=1.0),
    ),
    PlanCase(
        "ep3_e3_s1_copy_first_chunk", 3, 1, 1, "first_row", first_row=(2, 35, 57),
        config=QuotaConfig(copy_cost=15, copy_overlap=True, copy_chunks=3),
    ),
    PlanCase(
        "ep5_e5_s1_copy_relay_chain", 5, 1, 1, "first_row", first_row=(14, 89, 20, 12, 25),
        config=QuotaConfig(copy_cost=32, copy_overlap=True, relay_chunks=8),
    ),
    PlanCase(
        "ep16_e64_s1_copy_cost_relay_chunks_1", 16, 4, 1, "zipf", seed=14,
        config=QuotaConfig(copy_cost=600, relay_chunks=1),
    ),
    PlanCase(
        "ep8_e32_s2_copy_cost_direct_sync", 8, 4, 2, "zipf", seed=15,
        config=QuotaConfig(copy_cost=300, copy_overlap=True, relay_chunks=0),
    ),
    PlanCase(
        "ep2_e2_s1_copy_training_passes", 2, 1, 1, "first_row", first_row=(100, 90),
        config=QuotaConfig(copy_cost=60, copy_overlap=True, gemm_passes=3),
    ),
    # Hand-checked in test_quota.py: the ladder's parts overlap, and the first drain goes by threshold.
    PlanCase(
        "ep4_e12_s2_copy_cost_ladder_overlap", 4, 3, 2, "rows",
        rows=(
            (31, 181, 33, 105, 51, 63, 82, 21, 238, 42, 55, 122),
            (37, 175, 38, 106, 35, 44, 80, 33, 224, 44, 75, 133),
            (41, 171, 35, 99, 49, 60, 80, 32, 235, 40, 56, 126),
            (19, 182, 30, 111, 40, 63, 79, 26, 231, 47, 75, 121),
        ),
        config=QuotaConfig(balance_target=1.0, copy_cost=240, copy_overlap=True, copy_chunks=4, gemm_passes=3),
    ),
    PlanCase(
        "ep16_e64_s2_copy_cost_training_4_chunks",
        16, 4, 2, "zipf", seed=13, config=QuotaConfig(copy_cost=400, copy_overlap=True, copy_chunks=4, gemm_passes=3),
    ),
    # stop_at_target changes both plans: 11 and 5 replicas without it, 15 and 7 with it.
    PlanCase("ep16_e128_s1_stop_at_target", 16, 8, 1, "zipf", seed=9, config=QuotaConfig(stop_at_target=True, balance_target=1.01)),
    # Here a second-drain or best-fit plan would win if stop_at_target did not leave them out.
    PlanCase(
        "ep16_e64_s1_stop_at_target_no_late",
        16, 4, 1, "rows", rows=_poisson_rows(16, 64, 12), config=QuotaConfig(stop_at_target=True, balance_target=1.03),
    ),
    PlanCase(
        "ep8_e64_s1_stop_at_target_copy_cost",
        8, 8, 1, "zipf", seed=5, config=QuotaConfig(stop_at_target=True, balance_target=1.02, copy_cost=1228, copy_overlap=True),
    ),
    PlanCase(
        "ep8_e64_s1_copy_cost_8_chunks_4_per_program",
        8, 8, 1, "zipf", seed=12, config=QuotaConfig(copy_cost=1228, copy_overlap=True, copy_chunks=8), candidates_per_program=4,
    ),
    # Rotated receiver lines: the best plan comes from a rotated line (test_one_slot_rotated_lines in
    # test_quota.py), and with 8 candidates per program the rotated families span several programs.
    PlanCase(
        "ep10_e60_s1_rotated_lines", 10, 6, 1, "first_row",
        first_row=(
            511, 148, 595, 170, 3, 157, 0, 25, 9, 6, 120, 6, 7, 30, 48, 62, 37, 20, 11, 57, 4, 9, 1, 10, 102, 0, 7, 7, 66,
            22, 19, 17, 1, 7, 61, 36, 1372, 264, 195, 2416, 2871, 349, 2, 0, 57, 0, 16, 12, 12, 37, 88, 21, 0, 24, 12, 0,
            37, 0, 24, 40,
        ),
        config=QuotaConfig(balance_target=1.0),
    ),
    PlanCase(
        "ep10_e60_s1_rotated_lines_copy_cost_8_per_program", 10, 6, 1, "first_row",
        first_row=(
            42, 0, 40, 35, 53, 0, 0, 38, 0, 77, 25, 15, 0, 27, 20, 17, 83, 32, 0, 64, 23, 0, 0, 40, 51, 0, 10, 19, 3, 4, 0,
            1, 0, 7, 30, 27, 87, 0, 3, 77, 18, 0, 0, 246, 1694, 1145, 1566, 455, 51, 2, 43, 6, 3, 0, 336, 818, 516, 4, 23,
            2364,
        ),
        config=QuotaConfig(balance_target=1.0, copy_cost=40, copy_overlap=True, copy_chunks=4), candidates_per_program=8,
    ),
    # Resident tables: the resident family, and copies skipped for resident replicas in every family.
    PlanCase("ep8_e32_s2_resident", 8, 4, 2, "zipf", seed=16, resident_seed=0),
    PlanCase("ep6_e6_s1_resident_copy_cost", 6, 1, 1, "zipf", seed=17, config=QuotaConfig(copy_cost=300), resident_seed=1),
    PlanCase(
        "ep16_e64_s4_resident_copy_overlap_4_per_program",
        16, 4, 4, "zipf", seed=18, config=QuotaConfig(copy_cost=1228, copy_overlap=True, copy_chunks=8, relay_chunks=8),
        candidates_per_program=4, resident_seed=2,
    ),
    # In the programs of the lower thresholds the resident rounds move nothing, and the rounds after them
    # must still run: there the resident family has the best plan.
    PlanCase(
        "ep6_e6_s2_resident_rounds_move_nothing", 6, 1, 2, "rows",
        rows=(
            (168, 114, 43, 24, 86, 65), (17, 15, 4, 2, 9, 3), (16, 7, 3, 3, 12, 9),
            (148, 119, 40, 41, 89, 63), (14, 14, 7, 3, 9, 3), (915, 667, 267, 170, 554, 427),
        ),
        config=QuotaConfig(copy_cost=90, stop_at_target=True, balance_target=1.02), candidates_per_program=2,
        resident_rows=((4, 2), (4, 5), (-1, -1), (5, -1), (-1, 0), (1, -1)),
    ),
    # No copy cost: among equally good plans the one that copies fewer replicas wins.
    PlanCase(
        "ep5_e5_s1_resident_wins_tie", 5, 1, 1, "first_row", first_row=(400, 100, 100, 100, 100),
        config=QuotaConfig(balance_target=1.2), resident_rows=((-1,), (-1,), (-1,), (0,), (0,)),
    ),
    PlanCase(
        "ep8_e16_s1_resident_stop_at_target",
        8, 2, 1, "zipf", seed=19, config=QuotaConfig(stop_at_target=True, balance_target=1.02, copy_cost=90), resident_seed=3,
    ),
]

REROUTE_CASES = [
    RerouteCase("ep4_e32_s1_zipf_all_ranks", 4, 8, 1, 300, 4, "zipf", (0, 1, 2, 3)),
    RerouteCase("ep8_e64_s2_random_duplicates", 8, 8, 2, 200, 8, "random", (0, 5, 7)),
    RerouteCase("ep16_e128_s3_small_tiles", 16, 8, 3, 100, 8, "zipf", (0, 9, 15), block_size=256, expert_tile=16),
    RerouteCase("ep64_e256_s2_zipf", 64, 4, 2, 200, 8, "zipf", (0, 63)),
    RerouteCase("ep4_e16_s0_masters_only", 4, 4, 0, 100, 2, "zipf", (0, 3)),
    RerouteCase("ep4_e32_s2_empty_batch", 4, 8, 2, 0, 8, "zipf", (0, 2)),
    RerouteCase("ep8_e32_s2_int32_ids", 8, 4, 2, 150, 6, "zipf", (1, 6), dtype=torch.int32),
    RerouteCase("ep8_e32_s4_one_hot_expert", 8, 4, 4, 120, 2, "one_hot", (0, 4, 7)),
]

COUNT_CASES = [
    CountCase("e32_random_padding", 32, 500, 4),
    CountCase("e256_top8_8192_tokens", 256, 8192, 8),
    CountCase("e96_not_power_of_two", 96, 300, 6),
    CountCase("e64_empty_batch", 64, 0, 8),
    CountCase("e64_int32_ids", 64, 700, 8, dtype=torch.int32),
    CountCase("e128_uint8_ids_no_padding", 128, 400, 2, dtype=torch.uint8, padding=0.0),
    CountCase("e32_all_padding", 32, 50, 4, padding=1.0),
]

# Sort helper: (id, rows, log_n, descending, dtype, key kind). The interpreter sorts by counting up
# to 2**20 compared pairs and with a gather network above; "tl_sort" runs the compiled-kernel branch.
SORT_CASES = [
    ("counting_desc_int64_packed_keys", 16, 6, True, torch.int64, "packed"),
    ("counting_asc_int32_duplicates", 4, 3, False, torch.int32, "duplicates"),
    ("network_asc_int32_2048", 1, 11, False, torch.int32, "permutation"),
    ("network_desc_int64_32x256", 32, 8, True, torch.int64, "packed"),
    ("tl_sort_desc_int64_packed", 2, 3, True, torch.int64, "packed"),
    ("tl_sort_asc_int32_duplicates", 2, 3, False, torch.int32, "duplicates"),
]


def _make_loads(case: PlanCase) -> torch.Tensor:
    num_ranks, num_experts = case.num_ranks, case.num_ranks * case.experts_per_rank
    gen = torch.Generator().manual_seed(case.seed)
    shape = (num_ranks, num_experts)
    if case.loads == "random":
        loads = torch.randint(0, 200, shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.8)
    elif case.loads == "zipf":
        weights = torch.rand(num_experts, generator=gen) ** 6 + 1e-3
        draws = torch.multinomial(weights, 4096 * num_ranks, replacement=True, generator=gen).view(num_ranks, -1)
        loads = torch.stack([torch.bincount(row, minlength=num_experts) for row in draws])
    elif case.loads == "all_zero":
        loads = torch.zeros(shape, dtype=torch.int64)
    elif case.loads == "one_hot":
        loads = torch.zeros(shape, dtype=torch.int64)
        loads[:, 1] = 5000
    elif case.loads == "one_rank":
        loads = torch.zeros(shape, dtype=torch.int64)
        loads[:, : case.experts_per_rank] = 300
    elif case.loads == "uniform":
        loads = torch.full(shape, 37, dtype=torch.int64)
    elif case.loads == "ties":
        loads = torch.tensor([0, 50, 100])[torch.randint(0, 3, shape, generator=gen)]
    elif case.loads == "first_row":
        loads = torch.zeros(shape, dtype=torch.int64)
        loads[0] = torch.tensor(case.first_row)
    elif case.loads == "rows":
        loads = torch.tensor(case.rows)
    elif case.loads == "large":
        # Total just under MAX_TOTAL_LOAD = 2**35, so int64 products run near their bound.
        loads = torch.randint(2**22, 2**23, shape, generator=gen)
    else:
        raise AssertionError(case.loads)
    return loads.to(torch.int64)


def _make_resident(case: PlanCase) -> torch.Tensor | None:
    """Return the case's resident table, or None for a case without one.

    Generated tables fill about 70% of the slots with one of the three hottest experts of another rank.
    """
    if case.resident_rows:
        return torch.tensor(case.resident_rows)
    if case.resident_seed is None:
        return None
    gen = torch.Generator().manual_seed(case.resident_seed)
    hot = torch.argsort(_make_loads(case).sum(dim=0), descending=True)[:3]
    expert = hot[torch.randint(0, 3, (case.num_ranks, case.slots), generator=gen)]
    own = expert // case.experts_per_rank == torch.arange(case.num_ranks)[:, None]
    return torch.where(own | (torch.rand(case.num_ranks, case.slots, generator=gen) < 0.3), -1, expert)


def _make_topk_ids(case: RerouteCase) -> list[torch.Tensor]:
    num_experts = case.num_ranks * case.experts_per_rank
    gen = torch.Generator().manual_seed(case.num_ranks * 1000 + case.num_tokens)
    shape = (case.num_tokens, case.topk)
    topk_ids = []
    for _ in range(case.num_ranks):
        if case.ids == "zipf":
            weights = torch.rand(num_experts, generator=gen) ** 6 + 1e-3
            ids = torch.multinomial(weights, max(1, case.num_tokens * case.topk), replacement=True, generator=gen)
            ids = ids[: case.num_tokens * case.topk].view(shape)
        elif case.ids == "random":
            # Uniform draws, so a token often names one expert twice.
            ids = torch.randint(0, num_experts, shape, generator=gen)
        elif case.ids == "one_hot":
            ids = torch.zeros(shape, dtype=torch.int64)
        else:
            raise AssertionError(case.ids)
        ids = ids.clone()
        ids[torch.rand(shape, generator=gen) < 0.1] = -1
        topk_ids.append(ids.to(case.dtype))
    return topk_ids


def _make_count_ids(case: CountCase) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.num_experts + case.num_tokens)
    ids = torch.randint(0, case.num_experts, (case.num_tokens, case.topk), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < case.padding] = -1
    return ids.to(case.dtype)


def _make_sort_input(rows: int, log_n: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows * 100 + log_n)
    n = 2**log_n
    if kind == "packed":
        # value * n + (n - 1 - index), as the planner sorts: large values, unique per row.
        values = torch.randint(0, 2**35, (rows, n), generator=gen)
        keys = values * n + (n - 1 - torch.arange(n))
    elif kind == "duplicates":
        keys = torch.randint(-1, 3, (rows, n), generator=gen)
    else:
        keys = torch.stack([torch.randperm(n, generator=gen) for _ in range(rows)])
    return keys.to(dtype)


# Child process: run every kernel under TRITON_INTERPRET=1 and save inputs and outputs.


def _run_kernels(out_path: str, sort_kernel) -> None:
    from ultraep.kernels.count import count_load_triton
    from ultraep.kernels.plan import RUNS_IN_INTERPRETER, plan_quota_triton
    from ultraep.kernels.reroute import reroute_triton

    assert RUNS_IN_INTERPRETER, "the child must run with TRITON_INTERPRET=1"

    results: dict = {"plan": {}, "reroute": {}, "count": {}, "sort": {}}
    for case in PLAN_CASES:
        layout = ExpertLayout(case.num_ranks, case.experts_per_rank, case.slots)
        loads = _make_loads(case)
        plan = plan_quota_triton(
            loads, layout, case.config, _make_resident(case), candidates_per_program=case.candidates_per_program
        )
        results["plan"][case.id] = (loads, plan.replica_expert_ids, plan.quota)
    for case in REROUTE_CASES:
        layout = ExpertLayout(case.num_ranks, case.experts_per_rank, case.slots)
        topk_ids = _make_topk_ids(case)
        loads = torch.stack([count_local_load(ids, layout.num_experts) for ids in topk_ids])
        plan = QuotaPlanner()(loads, layout)
        tiles = {"block_size": case.block_size, "expert_tile": case.expert_tile}
        routed = {src_rank: reroute_triton(topk_ids[src_rank], plan, loads, src_rank, **tiles) for src_rank in case.src_ranks}
        results["reroute"][case.id] = (topk_ids, loads, plan.replica_expert_ids, plan.quota, routed)
    for case in COUNT_CASES:
        ids = _make_count_ids(case)
        results["count"][case.id] = (ids, count_load_triton(ids, case.num_experts))
    for case_id, rows, log_n, descending, dtype, kind in SORT_CASES:
        keys = _make_sort_input(rows, log_n, dtype, kind)
        out = torch.empty_like(keys)
        sort_kernel[(1,)](keys, out, ROWS=rows, LOG_N=log_n, DESCENDING=descending, INTERPRETED=not case_id.startswith("tl_sort"))
        results["sort"][case_id] = (keys, out)
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Kernel outputs for every case, computed once in a child process under the Triton interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed; install it with pip install 'ultraep[triton]' to test the kernels")
    out_path = tmp_path_factory.mktemp("kernels") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("ULTRAEP_KERNEL_BACKEND", None)
    # The interpreter runs every program in Python: all cases took about 8 minutes on a 2-core Intel Xeon
    # host, and more while other jobs shared it, so the limit leaves room within CI's 90 minutes.
    proc = subprocess.run(
        [sys.executable, __file__, str(out_path)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=2400
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return torch.load(out_path, weights_only=False)


# Kernel against reference, case by case.


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c.id for c in PLAN_CASES])
def test_plan_kernel_matches_reference(interpreted, case):
    loads, replica_expert_ids, quota = interpreted["plan"][case.id]
    assert torch.equal(loads, _make_loads(case))
    layout = ExpertLayout(case.num_ranks, case.experts_per_rank, case.slots)
    expected = plan_reference(loads, layout, case.config, _make_resident(case))
    assert replica_expert_ids.dtype == torch.int64
    assert quota.dtype == torch.int64
    assert torch.equal(replica_expert_ids, expected.replica_expert_ids)
    assert torch.equal(quota, expected.quota)
    check_plan(Plan(layout, replica_expert_ids, quota), loads, min_replica_quota=case.config.min_replica_quota)


def test_resident_cases_reuse_resident_slots(interpreted):
    # Guards against resident tables that no plan uses: some replica must sit where its expert is resident.
    reused = []
    for case in PLAN_CASES:
        resident = _make_resident(case)
        if resident is None:
            continue
        replicas = interpreted["plan"][case.id][1]
        if bool(((replicas[:, :, None] == resident[:, None, :]) & (replicas[:, :, None] >= 0)).any()):
            reused.append(case.id)
    assert len(reused) >= 2, reused


def test_plan_cases_exercise_replicas(interpreted):
    # Guards against a table of cases that never moves load: most cases must create replicas.
    with_replicas = [cid for cid, (_, replicas, _) in interpreted["plan"].items() if bool((replicas >= 0).any())]
    assert len(with_replicas) >= 9, with_replicas


@pytest.mark.parametrize("case", REROUTE_CASES, ids=[c.id for c in REROUTE_CASES])
def test_reroute_kernel_matches_reference(interpreted, case):
    topk_ids, loads, replica_expert_ids, quota, routed = interpreted["reroute"][case.id]
    layout = ExpertLayout(case.num_ranks, case.experts_per_rank, case.slots)
    expected_ids = _make_topk_ids(case)
    assert all(torch.equal(a, b) for a, b in zip(topk_ids, expected_ids))
    plan = QuotaPlanner()(loads, layout)
    assert torch.equal(plan.replica_expert_ids, replica_expert_ids)
    assert torch.equal(plan.quota, quota)
    for src_rank in case.src_ranks:
        expected = reroute(topk_ids[src_rank], plan, loads, src_rank)
        got = routed[src_rank]
        assert got.shape == topk_ids[src_rank].shape
        assert got.dtype == torch.int64
        assert torch.equal(got, expected), f"src_rank {src_rank}: {(got != expected).sum().item()} assignments differ"


def test_reroute_cases_use_replicas(interpreted):
    # At least one rerouted assignment lands in a redundant slot in most cases.
    hits = []
    for case in REROUTE_CASES:
        layout = ExpertLayout(case.num_ranks, case.experts_per_rank, case.slots)
        routed = interpreted["reroute"][case.id][4]
        if any(bool(layout.is_redundant_slot(slots[slots >= 0]).any()) for slots in routed.values()):
            hits.append(case.id)
    assert len(hits) >= 4, hits


@pytest.mark.parametrize("case", COUNT_CASES, ids=[c.id for c in COUNT_CASES])
def test_count_kernel_matches_reference(interpreted, case):
    ids, counts = interpreted["count"][case.id]
    assert torch.equal(ids, _make_count_ids(case))
    expected = count_local_load(ids, case.num_experts)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, expected)


def test_count_kernel_counts_duplicates_twice(interpreted):
    ids, counts = interpreted["count"]["e32_random_padding"]
    assert int(counts.sum()) == int((ids >= 0).sum())


@pytest.mark.parametrize("case", SORT_CASES, ids=[c[0] for c in SORT_CASES])
def test_sort_helper_matches_torch_sort(interpreted, case):
    case_id, rows, log_n, descending, dtype, kind = case
    keys, out = interpreted["sort"][case_id]
    assert torch.equal(keys, _make_sort_input(rows, log_n, dtype, kind))
    assert torch.equal(out, torch.sort(keys, dim=1, descending=descending).values)


# Backend choice and input checks of the dispatch entry points (in process; no kernel runs here).


def test_kernel_config_reads_env_when_built(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    config = KernelConfig()
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert config.backend == "torch"
    assert KernelConfig().backend == "triton"


def test_kernel_config_defaults_to_auto(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert KernelConfig().backend == "auto"
    assert backend_from_env() == "auto"


def test_explicit_backend_ignores_env(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert KernelConfig("torch").backend == "torch"
    assert resolve_backend("torch", "cpu") == "torch"


@pytest.mark.parametrize("value", ["cuda", "", "Torch", " auto"], ids=["unknown", "empty", "upper_case", "space"])
def test_env_backend_invalid_raises(monkeypatch, value):
    monkeypatch.setenv(BACKEND_ENV_VAR, value)
    with pytest.raises(ValueError, match=f"environment variable {BACKEND_ENV_VAR} = .* is not a kernel backend"):
        KernelConfig()
    with pytest.raises(ValueError, match="use one of 'auto', 'triton', 'native', 'torch'"):
        count_load(torch.zeros(2, 2, dtype=torch.int64), 4)


def test_backend_argument_invalid_raises():
    with pytest.raises(ValueError, match="backend = 'gpu' is not a kernel backend"):
        resolve_backend("gpu", "cpu")
    with pytest.raises(TypeError, match="KernelConfig.backend must be a str"):
        KernelConfig(1)


def test_auto_backend_on_cpu():
    assert resolve_backend("auto", "cpu", "count") == "torch"
    assert resolve_backend(KernelConfig("auto"), torch.device("cpu"), "reroute") == "torch"
    expected = "native" if native_available() else "torch"
    assert resolve_backend("auto", "cpu", "plan") == expected


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_forced_triton_on_cpu_without_interpreter_raises():
    # A fresh process without TRITON_INTERPRET, so the kernels are compiled-mode functions.
    code = (
        "import torch\n"
        "from ultraep.kernels import count_load\n"
        "try:\n"
        "    count_load(torch.zeros(3, 2, dtype=torch.int64), 8, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV_VAR)}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeError: backend='triton' got tensors on cpu" in proc.stdout
    assert "set TRITON_INTERPRET=1 before Triton is first imported" in proc.stdout


def test_import_without_triton_works_and_falls_back():
    # Triton is made unimportable; ultraep and the dispatch layer must still import and run on PyTorch.
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import torch, ultraep, ultraep.kernels\n"
        "from ultraep.kernels import count_load\n"
        "print('auto:', count_load(torch.tensor([[0, 1], [1, -1]]), 2).tolist())\n"
        "try:\n"
        "    count_load(torch.tensor([[0, 1]]), 2, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV_VAR}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "auto: [1, 2]" in proc.stdout
    assert "RuntimeError: backend='triton' needs Triton" in proc.stdout
    assert "pip install 'ultraep[triton]'" in proc.stdout


def test_kernels_import_loads_no_triton():
    code = "import sys, ultraep.kernels\nprint('triton loaded:', 'triton' in sys.modules)\n"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "triton loaded: False" in proc.stdout


def test_torch_backend_matches_reference_functions():
    layout = ExpertLayout(4, 4, 2)
    case = RerouteCase("wiring", 4, 4, 2, 64, 4, "zipf", (0,))
    topk_ids = _make_topk_ids(case)
    loads = torch.stack([count_load(ids, layout.num_experts, backend="torch") for ids in topk_ids])
    assert torch.equal(loads, torch.stack([count_local_load(ids, layout.num_experts) for ids in topk_ids]))
    plan = plan_quota(loads, layout, backend="torch", check_values=True)
    expected = plan_reference(loads, layout, QuotaConfig())
    assert torch.equal(plan.replica_expert_ids, expected.replica_expert_ids)
    assert torch.equal(plan.quota, expected.quota)
    for src_rank in range(4):
        got = reroute_ids(topk_ids[src_rank], plan, loads, src_rank, backend="torch", check_values=True)
        assert torch.equal(got, reroute(topk_ids[src_rank], plan, loads, src_rank))


def test_count_load_invalid_inputs_raise():
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="num_experts must be a positive int, got 0"):
        count_load(ids, 0, backend="torch")
    with pytest.raises(TypeError, match="topk_ids must hold integer expert ids, got dtype torch.float32"):
        count_load(ids.float(), 4, backend="torch")
    with pytest.raises(ValueError, match=r"topk_ids must have shape \[num_tokens, topk\], got \[8\]"):
        count_load(ids.reshape(-1), 4, backend="torch")
    with pytest.raises(ValueError, match=r"topk_ids\[1\] contains expert id 9, outside \[0, 3\]"):
        count_load(torch.tensor([[0, 1], [9, 2]]), 4, backend="torch", check_values=True)


def test_plan_quota_invalid_inputs_raise():
    layout = ExpertLayout(2, 2, 1)
    loads = torch.ones(2, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="layout must be an ExpertLayout, got tuple"):
        plan_quota(loads, (2, 2, 1), backend="torch")
    with pytest.raises(TypeError, match="config must be a QuotaConfig or None, got dict"):
        plan_quota(loads, layout, {"balance_target": 1.0}, backend="torch")
    with pytest.raises(ValueError, match=r"loads must have shape \[num_ranks, num_experts\] = \[2, 4\]"):
        plan_quota(torch.ones(4, 2, dtype=torch.int64), layout, backend="torch")
    with pytest.raises(TypeError, match="loads must be an integer tensor"):
        plan_quota(loads.float(), layout, backend="torch")
    with pytest.raises(ValueError, match=r"loads\[1, 3\] = -5 is negative"):
        plan_quota(torch.tensor([[1, 1, 1, 1], [1, 1, 1, -5]]), layout, backend="torch", check_values=True)


def test_reroute_ids_invalid_inputs_raise():
    layout = ExpertLayout(2, 2, 1)
    topk_ids = torch.tensor([[0, 1], [2, 3]])
    loads = torch.stack([count_local_load(topk_ids, 4), torch.zeros(4, dtype=torch.int64)])
    plan = QuotaPlanner()(loads, layout)
    with pytest.raises(TypeError, match="plan must be a Plan, got dict"):
        reroute_ids(topk_ids, {}, loads, 0, backend="torch")
    with pytest.raises(ValueError, match=r"src_rank=2 is outside \[0, 1\]"):
        reroute_ids(topk_ids, plan, loads, 2, backend="torch")
    with pytest.raises(ValueError, match="reroute inputs must share one device, got topk_ids on meta, loads on cpu"):
        reroute_ids(topk_ids.to("meta"), plan, loads, 0, backend="torch")
    with pytest.raises(ValueError, match=r"loads\[1, 0\] = 0 but topk_ids on rank 1 hold 1 assignments of expert 0"):
        reroute_ids(topk_ids, plan, loads, 1, backend="torch", check_values=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_tile_settings_invalid_raise():
    # The checks run before any launch, so compiled-mode kernel modules are enough.
    from ultraep.kernels.plan import plan_quota_triton
    from ultraep.kernels.reroute import reroute_triton

    layout = ExpertLayout(2, 2, 1)
    loads = torch.ones(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="candidates_per_program must be a power of two >= 1, got 3"):
        plan_quota_triton(loads, layout, QuotaConfig(), candidates_per_program=3)
    plan = QuotaPlanner()(loads, layout)
    with pytest.raises(ValueError, match="block_size must be a power of two >= 1, got 100"):
        reroute_triton(torch.zeros(2, 2, dtype=torch.int64), plan, loads, 0, block_size=100)
    with pytest.raises(ValueError, match="expert_tile must be a power of two >= 1, got 0"):
        reroute_triton(torch.zeros(2, 2, dtype=torch.int64), plan, loads, 0, expert_tile=0)


if __name__ == "__main__":
    # Child process only: the parent test session never imports Triton from this module.
    import triton
    import triton.language as tl

    from ultraep.kernels.plan import _sort_rows

    @triton.jit
    def _sort_kernel(
        x_ptr, out_ptr, ROWS: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr, INTERPRETED: tl.constexpr
    ):
        offsets = tl.arange(0, ROWS)[:, None] * 2**LOG_N + tl.arange(0, 2**LOG_N)[None, :]  # [ROWS, 2**LOG_N]
        tl.store(out_ptr + offsets, _sort_rows(tl.load(x_ptr + offsets), LOG_N, DESCENDING, INTERPRETED))

    _run_kernels(sys.argv[1], _sort_kernel)
