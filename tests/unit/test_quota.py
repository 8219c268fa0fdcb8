import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ultraep.evaluate import master_imbalance
from ultraep.layout import ExpertLayout
from ultraep.plan import check_plan
from ultraep.planners.base import masters_only_plan
from ultraep.planners import quota as quota_module
from ultraep.planners.quota import MAX_COPY_COST, QuotaConfig, QuotaPlanner


@st.composite
def layouts_and_loads(draw):
    num_ranks = draw(st.integers(1, 12))
    experts_per_rank = draw(st.integers(1, 5))
    slots = draw(st.integers(0, 3))
    layout = ExpertLayout(num_ranks, experts_per_rank, slots)
    kind = draw(st.sampled_from(["random", "one_hot", "all_zero", "equal", "huge", "sparse"]))
    shape = (num_ranks, layout.num_experts)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        loads = torch.randint(0, 200, shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.8)
    elif kind == "one_hot":
        loads = torch.zeros(shape, dtype=torch.int64)
        loads[:, draw(st.integers(0, layout.num_experts - 1))] = draw(st.integers(1, 10_000))
    elif kind == "all_zero":
        loads = torch.zeros(shape, dtype=torch.int64)
    elif kind == "equal":
        loads = torch.full(shape, draw(st.integers(0, 50)), dtype=torch.int64)
    elif kind == "huge":
        loads = torch.randint(0, 2**24, shape, generator=gen)
    else:
        loads = (torch.rand(shape, generator=gen) < 0.05).to(torch.int64) * torch.randint(1, 4, shape, generator=gen)
    return layout, loads.to(torch.int64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts_and_loads())
def test_quota_plan_invariants(case):
    layout, loads = case
    config = QuotaConfig()
    plan = QuotaPlanner(config)(loads, layout)
    check_plan(plan, loads, min_replica_quota=config.min_replica_quota)
    # Capacity: at most redundant_slots_per_rank replicas per rank, masters untouched.
    assert plan.replica_expert_ids.shape == (layout.num_ranks, layout.redundant_slots_per_rank)
    table = plan.physical_to_logical().view(layout.num_ranks, layout.slots_per_rank)
    assert torch.equal(table[:, : layout.experts_per_rank].reshape(-1), torch.arange(layout.num_experts))
    # Never worse than leaving the load on the masters.
    assert int(plan.rank_load().max()) <= int(loads.sum(0).view(layout.num_ranks, -1).sum(1).max())


@settings(max_examples=60, deadline=None)
@given(layouts_and_loads())
def test_quota_plan_is_deterministic(case):
    layout, loads = case
    first = QuotaPlanner()(loads, layout)
    second = QuotaPlanner()(loads.clone(), layout)
    assert torch.equal(first.replica_expert_ids, second.replica_expert_ids)
    assert torch.equal(first.quota, second.quota)


def test_quota_plan_identical_in_separate_process():
    code = (
        "import torch\n"
        "from ultraep import ExpertLayout, QuotaPlanner\n"
        "layout = ExpertLayout(4, 2, 1)\n"
        "loads = torch.full((4, 8), 7)\n"
        "loads[1, 3] = 300; loads[2, 0] = 120\n"
        "print(QuotaPlanner()(loads, layout).fingerprint())\n"
    )
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    layout = ExpertLayout(4, 2, 1)
    loads = torch.full((4, 8), 7)
    loads[1, 3] = 300
    loads[2, 0] = 120
    assert outputs == {QuotaPlanner()(loads, layout).fingerprint() + "\n"}


def test_all_equal_loads_make_no_replicas():
    layout = ExpertLayout(4, 2, 1)
    plan = QuotaPlanner()(torch.full((4, 8), 7), layout)
    assert int(plan.num_replicas()) == 0
    assert plan.quota.view(4, 3)[:, :2].reshape(-1).tolist() == [28] * 8


def test_one_hot_expert_spread_over_all_ranks():
    layout = ExpertLayout(4, 2, 1)
    loads = torch.zeros(4, 8, dtype=torch.int64)
    loads[:, 0] = 250
    plan = QuotaPlanner()(loads, layout)
    check_plan(plan, loads)
    assert plan.rank_load().tolist() == [250, 250, 250, 250]
    assert plan.logical_replica_count()[0] == 4


def test_one_rank_and_zero_slots_keep_masters():
    loads = torch.tensor([[5, 1, 0, 9]])
    plan = QuotaPlanner()(loads, ExpertLayout(1, 4, 2))
    assert plan.quota.tolist() == [5, 1, 0, 9, 0, 0]
    loads = torch.tensor([[9, 1], [0, 0]])
    plan = QuotaPlanner()(loads, ExpertLayout(2, 1, 0))
    assert plan.quota.tolist() == [9, 1]


def test_more_replicas_than_tokens():
    layout = ExpertLayout(4, 1, 1)
    loads = torch.tensor([[2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    plan = QuotaPlanner()(loads, layout)
    check_plan(plan, loads)
    assert int(plan.quota.sum()) == 2
    assert int(plan.rank_load().max()) == 1


def test_counts_far_above_int16():
    layout = ExpertLayout(8, 4, 2)
    gen = torch.Generator().manual_seed(3)
    loads = torch.randint(0, 3_000_000, (8, 32), generator=gen)
    loads[:, 5] += 40_000_000
    plan = QuotaPlanner()(loads, layout)
    check_plan(plan, loads)
    assert plan.imbalance() <= 1.002


def test_small_microbatch_still_balances():
    # 3 tokens x top-2 per rank: the relative minimum replica quota must not block replicas.
    layout = ExpertLayout(4, 2, 1)
    loads = torch.zeros(4, 8, dtype=torch.int64)
    loads[:, 0] = 2
    loads[:, 3] = 1
    loads[:, 4] = 1
    plan = QuotaPlanner()(loads, layout)
    check_plan(plan, loads)
    assert master_imbalance(loads, layout) == 2.0
    assert plan.imbalance() == 1.0


def test_minimum_replica_quota_is_respected():
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[30, 0, 20, 0], [0, 0, 0, 0]])
    plan = QuotaPlanner(min_replica_quota=6)(loads, layout)
    check_plan(plan, loads, min_replica_quota=6)
    # A 5-assignment replica would balance exactly but is below the minimum; 6 is the best allowed.
    assert plan.rank_load().tolist() == [24, 26]
    assert plan.quota.tolist() == [24, 0, 0, 20, 0, 6]
    plan = QuotaPlanner(min_replica_quota=5)(loads, layout)
    assert plan.rank_load().tolist() == [25, 25]


def test_balance_target_trades_balance_for_fewer_replicas():
    gen = torch.Generator().manual_seed(0)
    layout = ExpertLayout(16, 4, 2)
    probs = 1.0 / torch.arange(1, 65).double()
    loads = torch.stack([torch.multinomial(probs, 4000, replacement=True, generator=gen).bincount(minlength=64) for _ in range(16)])
    exact = QuotaPlanner(balance_target=1.0)(loads, layout)
    loose = QuotaPlanner(balance_target=1.05)(loads, layout)
    check_plan(loose, loads)
    assert exact.imbalance() <= loose.imbalance() <= 1.05
    assert int(loose.num_replicas()) < int(exact.num_replicas())


@pytest.mark.parametrize("slots, bound", [pytest.param(1, 1.02, id="one_slot"), pytest.param(2, 1.005, id="two_slots")])
def test_zipf_loads_balance_close_to_mean(slots, bound):
    gen = torch.Generator().manual_seed(1)
    layout = ExpertLayout(32, 4, slots)
    probs = (1.0 / torch.arange(1, 129).double()) [torch.randperm(128, generator=gen)]
    loads = torch.stack([torch.multinomial(probs, 8000, replacement=True, generator=gen).bincount(minlength=128) for _ in range(32)])
    plan = QuotaPlanner(balance_target=1.0)(loads, layout)
    check_plan(plan, loads)
    assert master_imbalance(loads, layout) > 1.2
    assert plan.imbalance() <= bound


def test_prefer_local_serves_more_assignments_on_their_rank():
    from ultraep.reroute import source_quota

    gen = torch.Generator().manual_seed(5)
    layout = ExpertLayout(8, 4, 2)
    loads = torch.randint(0, 50, (8, 32), generator=gen)
    loads[:, 3] += torch.randint(0, 400, (8,), generator=gen)
    loads[:, 17] += torch.randint(0, 300, (8,), generator=gen)

    def local_share(plan):
        matrix = source_quota(plan, loads).view(8, 8, 6)
        return float(torch.diagonal(matrix, dim1=0, dim2=1).sum()) / float(loads.sum())

    with_locality = QuotaPlanner(prefer_local=True)(loads, layout)
    without = QuotaPlanner(prefer_local=False)(loads, layout)
    # Both stay within the default balance target and use the fewest replicas found within it;
    # only the tie-break among those differs.
    assert with_locality.imbalance() <= 1.001
    assert without.imbalance() <= 1.001
    assert int(with_locality.num_replicas()) == int(without.num_replicas())
    assert local_share(with_locality) >= local_share(without)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        pytest.param({"balance_target": 0.9}, ValueError, "balance_target must be in \\[1.0, 1e6\\), got 0.9", id="target"),
        pytest.param({"min_replica_quota": 0}, ValueError, r"min_replica_quota must be in \[1, 34359738368\] \(the largest load of a microbatch\), got 0", id="min_quota"),
        pytest.param({"min_replica_quota": 2**63}, ValueError, r"min_replica_quota must be in \[1, 34359738368\]", id="min_quota_too_large"),
        pytest.param({"min_replica_quota": 1.5}, TypeError, "min_replica_quota must be an int", id="min_quota_type"),
        pytest.param({"min_replica_fraction": 1.5}, ValueError, "min_replica_fraction must be in \\[0, 1\\)", id="fraction"),
        pytest.param({"num_rounds": 0}, ValueError, "num_rounds must be None or in \\[1, 64\\]", id="rounds"),
    ],
)
def test_quota_config_rejects_bad_settings(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        QuotaConfig(**kwargs)


def test_quota_config_takes_numpy_floats():
    import numpy as np

    config = QuotaConfig(balance_target=np.float32(1.25), min_replica_fraction=np.float64(0.01))
    assert type(config.balance_target) is float
    assert config == QuotaConfig(balance_target=1.25, min_replica_fraction=0.01)


@pytest.mark.parametrize("config", [{"balance_target": 1.1}, 5], ids=["dict", "int"])
def test_quota_planner_rejects_other_config_objects(config):
    with pytest.raises(TypeError, match="config must be a QuotaConfig"):
        QuotaPlanner(config)


def test_planner_rejects_bad_loads():
    layout = ExpertLayout(2, 2, 1)
    planner = QuotaPlanner()
    with pytest.raises(TypeError, match="integer tensor"):
        planner(torch.ones(2, 4), layout)
    with pytest.raises(ValueError, match="is negative"):
        planner(torch.tensor([[1, -1, 0, 0], [0, 0, 0, 0]]), layout)
    with pytest.raises(ValueError, match=r"got \[2, 3\]"):
        planner(torch.ones(2, 3, dtype=torch.int64), layout)
    with pytest.raises(TypeError, match="either config or settings"):
        QuotaPlanner(QuotaConfig(), balance_target=1.0)


def test_subclass_plan_override_is_called():
    class MastersOnly(QuotaPlanner):
        def plan(self, loads, layout):
            return masters_only_plan(loads, layout)

    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[50, 0, 0, 0], [50, 0, 0, 0]])
    assert QuotaPlanner()(loads, layout).num_replicas() == 1
    assert MastersOnly()(loads, layout).num_replicas() == 0
    with pytest.raises(ValueError, match="is negative"):
        MastersOnly()(-loads, layout)


# Copy cost: candidates compared with the weight sync counted.

TWO_RANK_LOADS = torch.tensor([[100, 0], [0, 0]])  # expert 0 on rank 0 carries everything


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize(
    "copy_cost, copy_overlap, copy_chunks, replicated",
    [
        # The best replica plan splits 50 / 50; the masters-only plan's peak is 100.
        (0, False, 1, True),
        (49, False, 1, True),  # blocking: 50 + 49 < 100
        (50, False, 1, False),  # 50 + 50 ties the masters-only plan, which has fewer replicas
        (60, True, 1, False),  # overlapped, one chunk: max(50, 60 + 50) > 100
        (60, True, 8, True),  # 8 chunks: max(50, 60 // 8 + 50, 60 + 50 * 10 // 24) = 80 < 100
        (79, True, 8, True),  # 79 + 20 = 99
        (80, True, 8, False),  # 80 + 20 = 100 ties
    ],
)
def test_copy_cost_decides_replication_as_computed_by_hand(backend, copy_cost, copy_overlap, copy_chunks, replicated):
    config = QuotaConfig(copy_cost=copy_cost, copy_overlap=copy_overlap, copy_chunks=copy_chunks)
    plan = QuotaPlanner(config, backend=backend)(TWO_RANK_LOADS, ExpertLayout(2, 1, 1))
    expected = [50, 0, 0, 50] if replicated else [100, 0, 0, 0]
    assert plan.quota.tolist() == expected
    assert plan.replica_expert_ids.tolist() == ([[-1], [0]] if replicated else [[-1], [-1]])


def test_copy_cost_zero_keeps_the_plan_unchanged():
    gen = torch.Generator().manual_seed(3)
    loads = (torch.rand(16, 64, generator=gen) ** 4 * 1000).round().to(torch.int64)
    layout = ExpertLayout(16, 4, 2)
    for overlap in (False, True):
        plain = QuotaPlanner(QuotaConfig(), backend="torch")(loads, layout)
        chunks = 8 if overlap else 1
        costed = QuotaPlanner(QuotaConfig(copy_cost=0, copy_overlap=overlap, copy_chunks=chunks), backend="torch")(loads, layout)
        assert torch.equal(plain.quota, costed.quota)
        assert torch.equal(plain.replica_expert_ids, costed.replica_expert_ids)


def _costed_peak_of(plan, layout, config):
    """The costed peak of one plan, recomputed in plain Python from the model in the quota module."""
    from ultraep.comm.relay import relay_send_chunks

    quota = plan.quota.view(layout.num_ranks, layout.slots_per_rank).tolist()
    replicas = plan.replica_expert_ids.tolist()
    load = [sum(row) for row in quota]
    master = [sum(row[: layout.experts_per_rank]) for row in quota]
    copies_in = [sum(e >= 0 for e in row) for row in replicas]
    fan = [0] * layout.num_experts
    for row in replicas:
        for e in row:
            if e >= 0:
                fan[e] += 1
    m = max(1, config.relay_chunks)
    sender = [relay_send_chunks(n, m) if config.relay_chunks else n for n in fan]
    chunks_out = [sum(sender[r * layout.experts_per_rank : (r + 1) * layout.experts_per_rank]) for r in range(layout.num_ranks)]
    sync = config.copy_cost * max(max(a * m, b) for a, b in zip(copies_in, chunks_out)) // m
    if not config.copy_overlap:
        return max(load) + sync
    n = config.copy_chunks
    times = []
    for r in range(layout.num_ranks):
        replica = load[r] - master[r]
        busy = max(load[r], sync // n + replica, sync + replica * (n + 2) // (3 * n))
        times.append(busy if copies_in[r] else load[r])
    return max(times)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=layouts_and_loads(),
    cost_fraction=st.sampled_from([0.01, 0.1, 0.5, 2.0]),
    overlap=st.booleans(),
    chunks=st.sampled_from([1, 2, 8]),
)
def test_costed_peak_at_most_masters_only(case, cost_fraction, overlap, chunks):
    layout, loads = case
    total = int(loads.sum())
    cost = min(MAX_COPY_COST, max(1, int(cost_fraction * total / layout.num_ranks)))
    config = QuotaConfig(copy_cost=cost, copy_overlap=overlap, copy_chunks=chunks if overlap else 1)
    plan = QuotaPlanner(config, backend="torch")(loads, layout)
    check_plan(plan, loads)
    masters_only = int(loads.sum(dim=0).view(layout.num_ranks, layout.experts_per_rank).sum(dim=1).max()) if total else 0
    assert _costed_peak_of(plan, layout, config) <= masters_only


def test_relay_send_table_matches_trees():
    from ultraep.comm.relay import relay_send_chunks
    from ultraep.planners.quota import relay_send_table

    for chunks in (1, 4, 8):
        table = relay_send_table(64, chunks)
        assert table.dtype == torch.int64
        assert table.shape == (65,)
        assert table.tolist() == [relay_send_chunks(n, chunks) for n in range(65)]
    # 8 chunks: a chain for up to 12 copies (8 + n - 1 chunk times), then a binary tree.
    assert relay_send_table(16, 8).tolist()[:14] == [0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    # 0: direct copies, n whole copies from the master.
    assert relay_send_table(5, 0).tolist() == [0, 1, 2, 3, 4, 5]


def test_copy_cost_in_assignments_for_a_swiglu_expert():
    from ultraep.planners.quota import copy_cost_in_assignments

    hidden, ffn = 4096, 14336
    size = 6 * hidden * ffn  # bytes of bf16 gate, up and down == forward FLOPs of one assignment
    # 1.75 PFLOP/s over 720 GB/s: one copy takes as long as 2431 assignments' GEMM.
    assert copy_cost_in_assignments(size, size, 720e9, 1.75e15) == 2431
    with pytest.raises(ValueError, match="link_bytes_per_s must be a positive finite number, got 0"):
        copy_cost_in_assignments(size, size, 0, 1.75e15)


@pytest.mark.parametrize(
    "settings_, error, message",
    [
        ({"copy_cost": -1}, ValueError, "copy_cost must be in"),
        ({"copy_cost": 2**24 + 1}, ValueError, "copy_cost must be in"),
        ({"copy_cost": True}, TypeError, "copy_cost must be an int, got True"),
        ({"copy_chunks": 0}, ValueError, "copy_chunks must be in"),
        ({"copy_overlap": 1}, TypeError, "copy_overlap must be a bool, got 1"),
        ({"gemm_passes": 0}, ValueError, "gemm_passes must be in \\[1, 16\\], got 0; use 1 for inference and 3"),
        ({"gemm_passes": 3.0}, TypeError, "gemm_passes must be an int, got 3.0"),
        ({"relay_chunks": -1}, ValueError, "relay_chunks must be in \\[0, 1024\\], got -1; pass ManagerConfig.num_chunks"),
        ({"relay_chunks": 4.0}, TypeError, "relay_chunks must be an int, got 4.0"),
        ({"stop_at_target": 1}, TypeError, "stop_at_target must be a bool, got 1; use True or False"),
        ({"prefer_local": 1}, TypeError, "prefer_local must be a bool, got 1"),
        ({"num_rounds": 2.5}, TypeError, "num_rounds must be None or an int, got 2.5"),
        ({"num_rounds": True}, TypeError, "num_rounds must be None or an int, got True"),
        ({"balance_target": "1.01"}, TypeError, "balance_target must be a float, got '1.01'"),
        ({"min_replica_fraction": None}, TypeError, "min_replica_fraction must be a float, got None"),
    ],
)
def test_copy_settings_are_validated(settings_, error, message):
    with pytest.raises(error, match=message):
        QuotaConfig(**settings_)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_master_quota_anchor_reaches_mean(backend):
    # Six ranks with one expert and one slot each. Rank 0 produces every assignment. At the threshold
    # 16 (the rounded-up mean of 93 / 6) ranks 0 and 5 must shed 6 and rank 2 must shed 1, into
    # spares of 6 (rank 3), 5 (rank 1) and 5 (rank 4). Taken by their masters' remaining quota, the
    # pieces go to the receivers in spare order: 6 of expert 0 to rank 3, 5 of expert 5 to rank 1 and
    # 5 of expert 2 to rank 4. Rank 2 drops to 12 and takes the last 4 of expert 5's excess in the
    # next round. The other anchors end at 17 on this load.
    loads = torch.zeros(6, 6, dtype=torch.int64)
    loads[0] = torch.tensor([22, 11, 17, 10, 11, 22])
    plan = QuotaPlanner(QuotaConfig(balance_target=1.0), backend=backend)(loads, ExpertLayout(6, 1, 1))
    assert plan.rank_load().tolist() == [16, 16, 16, 16, 16, 13]
    assert plan.replica_expert_ids.view(-1).tolist() == [-1, 5, 5, 0, 2, -1]
    assert plan.quota.tolist() == [16, 0, 11, 5, 12, 4, 10, 6, 11, 5, 13, 0]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_one_slot_donor_swap(backend):
    # Four ranks with two experts and one slot each; rank 0 produces every assignment. Expert loads
    # are 0, 44 | 17, 19 | 0, 0 | 0, 0 (mean 20). Ranks 2 and 3 take at most 20 each in their one
    # slot, so rank 0 and rank 1 cannot both shed to them: one of them would need two experts. The
    # plan at 20 swaps: rank 0 sheds 40 of expert 1 (its excess 24 plus the over-drain) to ranks 2
    # and 3, then takes 16 of expert 3 from rank 1 into its own slot. Donors that shed only their
    # excess end at 21.
    loads = torch.zeros(4, 8, dtype=torch.int64)
    loads[0] = torch.tensor([0, 44, 17, 19, 0, 0, 0, 0])
    plan = QuotaPlanner(QuotaConfig(balance_target=1.0), backend=backend)(loads, ExpertLayout(4, 2, 1))
    assert plan.rank_load().tolist() == [20, 20, 20, 20]
    assert plan.replica_expert_ids.view(-1).tolist() == [3, -1, 1, 1]
    assert plan.quota.tolist() == [0, 4, 16, 17, 3, 0, 0, 0, 20, 0, 0, 20]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_one_slot_best_fit(backend):
    # Five ranks with two experts and one slot each; rank 0 produces every assignment. Expert loads
    # are 47, 18 | 0, 0 | 11, 9 | 0, 0 | 0, 0 (mean 17). At 17 the donors shed 48 and 3, and ranks 1,
    # 3 and 4 have 17 of spare each, so each must take exactly 17. Best fit gives rank 1 the bin
    # that just covers its spare, expert 1 (18), and ranks 3 and 4 two pieces of expert 0 (47).
    # Rank 0 drops to 14 and takes 3 of expert 5 from rank 2. Without the best-fit receivers the
    # plan ends at 19.
    loads = torch.zeros(5, 10, dtype=torch.int64)
    loads[0] = torch.tensor([47, 18, 0, 0, 11, 9, 0, 0, 0, 0])
    plan = QuotaPlanner(QuotaConfig(balance_target=1.0), backend=backend)(loads, ExpertLayout(5, 2, 1))
    assert plan.rank_load().tolist() == [17, 17, 17, 17, 17]
    assert plan.replica_expert_ids.view(-1).tolist() == [5, 1, -1, 0, 0]
    assert plan.quota.tolist() == [13, 1, 3, 0, 0, 17, 11, 6, 0, 0, 0, 17, 0, 0, 17]


# Expert loads of a top-1 microbatch at 10 ranks x 6 experts with one hot rank: rank 6 carries 7,467 of
# 10,240 assignments. It is seed 265 of hot_rank_loads in benchmarks/planner_hard.py, and the MILP
# (HiGHS) proves its one-slot optimum 1086.
_HOT_RANK_LOADS = (
    511, 148, 595, 170, 3, 157, 0, 25, 9, 6, 120, 6, 7, 30, 48, 62, 37, 20, 11, 57, 4, 9, 1, 10, 102, 0, 7, 7, 66, 22,
    19, 17, 1, 7, 61, 36, 1372, 264, 195, 2416, 2871, 349, 2, 0, 57, 0, 16, 12, 12, 37, 88, 21, 0, 24, 12, 0, 37, 0, 24, 40,
)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_one_slot_rotated_lines(backend, monkeypatch):
    # Rank 6 must shed about 6,400 into eight receivers with 880-1000 of spare each, so groups of three
    # receivers must cover its experts of 2,871 and 2,416 almost exactly. Without the rotated lines
    # the best plan ends at 1105, 1.75% above the optimum; a rotated line ends at 1095, within 1%.
    loads = torch.zeros(10, 60, dtype=torch.int64)
    loads[0] = torch.tensor(_HOT_RANK_LOADS)
    layout = ExpertLayout(10, 6, 1)
    plan = QuotaPlanner(QuotaConfig(balance_target=1.0), backend=backend)(loads, layout)
    check_plan(plan, loads)
    assert int(plan.rank_load().max()) == 1095
    monkeypatch.setattr(quota_module, "_num_rotations", lambda slots: 0)
    unrotated = QuotaPlanner(QuotaConfig(balance_target=1.0), backend="torch")(loads, layout)
    assert int(unrotated.rank_load().max()) == 1105
    # With two slots, where no rotations run, the same load balances to the mean.
    two_slots = QuotaPlanner(QuotaConfig(balance_target=1.0), backend=backend)(loads, ExpertLayout(10, 6, 2))
    assert int(two_slots.rank_load().max()) == 1024


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_ladder_starts_at_capacity_floor(backend):
    # Three ranks with two experts and one slot each; rank 0 produces every assignment. Expert loads
    # are 30, 30 | 0, 0 | 30, 20, so the rank loads are 60, 0 and 50 (rounded-up mean 37). Rank 1 can
    # take one expert of at most 30, so ranks 0 and 2 keep at least 80 and one of them at least 40.
    # A ladder that starts at 37 steps over 40 (its thresholds near it are 39 and 41) and ends at 41.
    loads = torch.zeros(3, 6, dtype=torch.int64)
    loads[0] = torch.tensor([30, 30, 0, 0, 30, 20])
    plan = QuotaPlanner(QuotaConfig(balance_target=1.0), backend=backend)(loads, ExpertLayout(3, 2, 1))
    assert plan.rank_load().tolist() == [40, 30, 40]
    assert plan.replica_expert_ids.view(-1).tolist() == [-1, 4, 0]
    assert plan.quota.tolist() == [10, 30, 0, 0, 0, 30, 0, 20, 20]


def test_load_floor_below_milp_optimum():
    from ultraep.planners.milp import solve_milp
    from ultraep.planners.quota import load_floor

    gen = torch.Generator().manual_seed(3)
    raised = 0
    for layout in [ExpertLayout(3, 2, 1), ExpertLayout(4, 3, 1), ExpertLayout(4, 2, 2), ExpertLayout(5, 2, 1)] * 3:
        loads = torch.randint(0, 40, (layout.num_ranks, layout.num_experts), generator=gen)
        cold = int(torch.randint(0, layout.num_ranks, (1,), generator=gen))
        loads[:, cold * layout.experts_per_rank : (cold + 1) * layout.experts_per_rank] //= 10
        floor = int(load_floor(loads, layout))
        ceil_mean = -(-int(loads.sum()) // layout.num_ranks)
        optimum = solve_milp(loads, layout, time_limit=20.0)
        assert optimum.status == "optimal"
        assert ceil_mean <= floor <= optimum.lower_bound, (layout, loads.tolist())
        raised += floor > ceil_mean
    assert raised >= 3  # the cold rank lifts the floor above the mean in several instances
    # Without redundant slots every plan keeps the masters' loads, so the floor is the busiest rank.
    loads = torch.tensor([[5, 1, 0, 2, 9, 9]])
    assert int(load_floor(loads.expand(3, 6), ExpertLayout(3, 2, 0))) == 54


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_copy_cost_first_chunk_term_decides(backend):
    # Rank 0 produces every assignment: experts 0, 1, 2 (one per rank) carry 2, 35 and 57.
    # Copying 30 of expert 2 to rank 0 costs sync = 15 (one copy in, one out). Rank 0 then takes
    # max(32, 15 // 3 + 30, 15 + 30 * 5 // 9) = 35, the first-chunk term, and rank 1 takes 35 too.
    # Adding a replica of expert 1 on rank 2 ties that peak at 35 with one more replica, so one wins.
    loads = torch.zeros(3, 3, dtype=torch.int64)
    loads[0] = torch.tensor([2, 35, 57])
    config = QuotaConfig(copy_cost=15, copy_overlap=True, copy_chunks=3)
    plan = QuotaPlanner(config, backend=backend)(loads, ExpertLayout(3, 1, 1))
    assert plan.quota.tolist() == [2, 30, 35, 0, 27, 0]
    assert plan.replica_expert_ids.tolist() == [[2], [-1], [-1]]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("gemm_passes, replicas, quota", [(1, [-1, 0], [95, 0, 90, 5]), (3, [-1, -1], [100, 0, 90, 0])])
def test_training_copy_hides_behind_forward_only(backend, gemm_passes, replicas, quota):
    # Rank 0 produces every assignment: expert 0 (rank 0) carries 100, expert 1 (rank 1) 90. Moving 5
    # of expert 0 to rank 1 balances both at 95, and its copy (60) arrives during rank 1's 90 of
    # master work. In training that work is 30 of forward and 60 of backward, and the copy can hide
    # only behind the forward: rank 1 takes 5 + 90 + (60 - 30) = 125, worse than the masters' 100.
    loads = torch.zeros(2, 2, dtype=torch.int64)
    loads[0] = torch.tensor([100, 90])
    config = QuotaConfig(copy_cost=60, copy_overlap=True, gemm_passes=gemm_passes)
    plan = QuotaPlanner(config, backend=backend)(loads, ExpertLayout(2, 1, 1))
    assert plan.replica_expert_ids.view(-1).tolist() == replicas
    assert plan.quota.tolist() == quota


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_copy_cost_counts_relay_tree_time(backend):
    # Expert 1 (89 of 160 assignments, mean 32) needs copies; copies overlap the masters (one chunk).
    # One copy to rank 3: the sync is one copy, 32, and rank 3 takes 32 + 31 = 63, the peak (rank 1
    # keeps 58). Two copies go along a chain, 1 + 1 / m copy times with m relay chunks. With m = 4 the
    # sync is 32 * 5 // 4 = 40 and the best two-copy plan (rank 1 keeps 48, ranks 2 and 4 take 23 and
    # 18) also peaks at 40 + 23 = 63, so the plan with fewer replicas wins. With m = 8 the sync is
    # 32 * 9 // 8 = 36 and the two-copy plan peaks at 59. With direct copies (relay_chunks=0) the master
    # sends both, a sync of 64, so one copy wins as with m = 4.
    loads = torch.zeros(5, 5, dtype=torch.int64)
    loads[0] = torch.tensor([14, 89, 20, 12, 25])
    layout = ExpertLayout(5, 1, 1)
    plans = {}
    for relay_chunks in (0, 4, 8):
        config = QuotaConfig(copy_cost=32, copy_overlap=True, relay_chunks=relay_chunks)
        plans[relay_chunks] = QuotaPlanner(config, backend=backend)(loads, layout)
        assert _costed_peak_of(plans[relay_chunks], layout, config) == {0: 63, 4: 63, 8: 59}[relay_chunks]
    assert torch.equal(plans[0].quota, plans[4].quota)
    assert plans[4].replica_expert_ids.view(-1).tolist() == [-1, -1, -1, 1, -1]
    assert plans[4].quota.tolist() == [14, 0, 58, 0, 20, 0, 12, 31, 25, 0]
    assert plans[8].replica_expert_ids.view(-1).tolist() == [-1, -1, 1, -1, 1]
    assert plans[8].quota.tolist() == [14, 0, 48, 0, 20, 23, 12, 0, 25, 18]


def test_first_drain_steps_stop_above_bar():
    # Ten ranks, mean rank load 1000, balance target 1.0. By threshold the steps run 0 (1000), 1 (1010),
    # 3 (1020), 2 (1030), 5 (1030, a tie after step 2), 4 (1040), then 6-20. Step 0 meets the target;
    # the lowest peak so far then falls 1050, 1035, 1035, 1030. Step 5 ties the bar of 1030 and takes
    # part. Step 4 lies above it, so it and every step after drop out, though those peak at 900.
    from ultraep.planners import quota

    num_steps = len(quota._MEAN_STEPS) + len(quota._GAP_STEPS)
    families = quota._RECEIVER_ORDERS * len(quota._ANCHORS)
    step_threshold = [1000, 1010, 1030, 1020, 1040, 1030] + [1050 + 10 * k for k in range(num_steps - 6)]
    step_peak = [1050, 1035, 1030, 1040, 1045, 1060] + [900] * (num_steps - 6)
    num_late = 5
    # Family 0 has each step's lowest peak, and the other families peak 7 higher.
    max_load = torch.tensor([p + 7 * (f > 0) for f in range(families) for p in step_peak] + [800] * num_late)
    thresholds = torch.tensor(step_threshold * families + [1000] * num_late)
    late = torch.tensor([False] * (families * num_steps) + [True] * num_late)
    empty = torch.zeros(late.numel(), 0, dtype=torch.int64)
    state = quota._CandidateState(thresholds, empty, empty, empty[:, :, None], empty[:, :, None], torch.tensor(10_000), late)
    first_drain = quota._first_drain_steps(state, max_load, 10, quota._to_fixed_point(1.0), False)
    taking_part = first_drain[: families * num_steps].view(families, num_steps)
    assert [s for s in range(num_steps) if taking_part[0, s]] == [0, 1, 2, 3, 5]
    assert bool((taking_part == taking_part[0]).all())
    assert not bool(first_drain[families * num_steps :].any())

    # With balance target 1.045 every step up to 1045 takes part. With stop_at_target the ladder ends
    # after step 1, whose plan peaks at 1035, at or below the target.
    target_q = quota._to_fixed_point(1.045)
    searched = quota._first_drain_steps(state, max_load, 10, target_q, False)[: families * num_steps].view(families, num_steps)
    assert [s for s in range(num_steps) if searched[0, s]] == [0, 1, 2, 3, 4, 5]
    stopped = quota._first_drain_steps(state, max_load, 10, target_q, True)[: families * num_steps].view(families, num_steps)
    assert [s for s in range(num_steps) if stopped[0, s]] == [0, 1]
    assert bool((stopped == stopped[0]).all())


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_ladder_parts_overlap(backend):
    # Four ranks with three experts and two slots each, copies costed as in training. The ladder's
    # second part starts below the end of its first: the step at 1040 comes after steps up to 1054 in
    # ladder order. Its plan peaks at 1043 with the sync counted and wins. Stopping the first drain at
    # the first step in ladder order above the lowest peak so far would end at 1044.
    loads = torch.tensor(
        [
            [31, 181, 33, 105, 51, 63, 82, 21, 238, 42, 55, 122],
            [37, 175, 38, 106, 35, 44, 80, 33, 224, 44, 75, 133],
            [41, 171, 35, 99, 49, 60, 80, 32, 235, 40, 56, 126],
            [19, 182, 30, 111, 40, 63, 79, 26, 231, 47, 75, 121],
        ]
    )
    config = QuotaConfig(balance_target=1.0, copy_cost=240, copy_overlap=True, copy_chunks=4, gemm_passes=3)
    plan = QuotaPlanner(config, backend=backend)(loads, ExpertLayout(4, 3, 2))
    assert plan.replica_expert_ids.view(-1).tolist() == [-1, -1, 8, -1, -1, -1, 8, -1]
    assert plan.rank_load().tolist() == [973, 1040, 1043, 1040]


# Resident replicas: slots that still hold an expert's current weights from an earlier microbatch.


def _hot_expert_loads() -> torch.Tensor:
    """4 ranks x 1 expert; expert 0 carries 400 of 700 assignments, the others 100 each."""
    return torch.diag(torch.tensor([400, 100, 100, 100], dtype=torch.int64))


def test_resident_replicas_need_no_copy():
    # One copy costs 300 assignments and every rank waits for it, so any copied replica makes the slowest
    # rank at least 175 + 300 > 400: without resident slots the masters-only plan wins. Ranks 2 and 3
    # still hold expert 0, so replicas there cost nothing: the master keeps T and each takes T - 100,
    # which balances expert 0 near T = 200, and rank 1 gets no replica because it would need a copy.
    layout = ExpertLayout(4, 1, 1)
    planner = QuotaPlanner(copy_cost=300)
    loads = _hot_expert_loads()
    without = planner(loads, layout)
    assert int(without.num_replicas()) == 0
    resident = torch.tensor([[-1], [-1], [0], [0]])
    plan = planner(loads, layout, resident=resident)
    check_plan(plan, loads)
    assert plan.replica_expert_ids.tolist() == [[-1], [-1], [0], [0]]
    assert 200 <= int(plan.rank_load().max()) < 400


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_resident_replicas_win_ties(backend):
    # No copy cost. Expert 0 carries 400 of 800 assignments over 5 ranks, and balance target 1.2 allows a
    # max rank load of 192: at the threshold 187 three receivers of 100 suffice (71 each). Without a
    # table the planner picks ranks 1 to 3. Ranks 3 and 4 still contain expert 0, and among the equally
    # good plans with three replicas the one that copies only to rank 1 wins.
    layout = ExpertLayout(5, 1, 1)
    loads = torch.diag(torch.tensor([400, 100, 100, 100, 100]))
    planner = QuotaPlanner(balance_target=1.2, backend=backend)
    assert planner(loads, layout).replica_expert_ids.view(-1).tolist() == [-1, 0, 0, 0, -1]
    plan = planner(loads, layout, resident=torch.tensor([[-1], [-1], [-1], [0], [0]]))
    check_plan(plan, loads)
    assert plan.replica_expert_ids.view(-1).tolist() == [-1, 0, -1, 0, 0]
    assert int(plan.rank_load().max()) == 187


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_resident_table_is_checked(backend):
    # "auto" runs the compiled C planner where it builds, which checks the values itself.
    layout = ExpertLayout(4, 1, 1)
    planner = QuotaPlanner(backend=backend)
    loads = _hot_expert_loads()
    with pytest.raises(ValueError, match=r"shape \[num_ranks, redundant_slots_per_rank\] = \[4, 1\]"):
        planner(loads, layout, resident=torch.full((4, 2), -1))
    with pytest.raises(TypeError, match="integer tensor"):
        planner(loads, layout, resident=torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"resident\[1, 0\] = 4 is not a logical expert id"):
        planner(loads, layout, resident=torch.tensor([[-1], [4], [-1], [-1]]))
    with pytest.raises(ValueError, match=r"resident\[2, 0\] = 2 is mastered on rank 2 itself"):
        planner(loads, layout, resident=torch.tensor([[-1], [-1], [2], [-1]]))
    with pytest.raises(TypeError, match="torch.Tensor or None"):
        planner(loads, layout, resident=[[0]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2, 8), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1),
    st.sampled_from([0, 40, 400]), st.booleans(),
)
def test_resident_plans_keep_invariants(num_ranks, experts_per_rank, slots, seed, copy_cost, overlap):
    layout = ExpertLayout(num_ranks, experts_per_rank, slots)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(layout.num_experts, generator=generator) ** 4
    loads = torch.stack([torch.bincount(torch.multinomial(weight, 300, True, generator=generator), minlength=layout.num_experts) for _ in range(num_ranks)])
    # Each slot contains a random expert of another rank, or nothing.
    expert = torch.randint(0, layout.num_experts, (num_ranks, slots), generator=generator)
    own = expert // experts_per_rank == torch.arange(num_ranks)[:, None]
    resident = torch.where(own | (torch.rand(num_ranks, slots, generator=generator) < 0.3), -1, expert)
    config = QuotaConfig(copy_cost=copy_cost, copy_overlap=overlap)
    plan = QuotaPlanner(config, backend="torch")(loads, layout, resident=resident)
    check_plan(plan, loads, min_replica_quota=1)
    # The masters-only plan stays a candidate, so no plan is slower than no balancing by the plain peak
    # when copies are free.
    if copy_cost == 0:
        assert int(plan.rank_load().max()) <= int(masters_only_plan(loads, layout).rank_load().max())


def test_subclass_plan_rejects_resident():
    # A subclass that overrides plan() cannot take the table, so passing one is an error, not a no-op.
    class Fixed(QuotaPlanner):
        def plan(self, loads, layout):
            return masters_only_plan(loads, layout)

    layout = ExpertLayout(4, 1, 1)
    with pytest.raises(TypeError, match="Fixed overrides plan\\(\\), which takes no resident table"):
        Fixed()(_hot_expert_loads(), layout, resident=torch.full((4, 1), -1))
