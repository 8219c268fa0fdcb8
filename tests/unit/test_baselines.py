"""Tests for the baseline planners (none, pairing, eplb), the MILP reference and the planner registry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan, check_plan
from ultraep.planners.base import Planner
from ultraep.planners.eplb import EplbConfig, EplbPlanner
from ultraep.planners.lp_reroute import LpRerouteConfig
from ultraep.planners.milp import MAX_MILP_CELLS, MilpConfig, MilpPlanner, MilpResult, solve_milp
from ultraep.planners.none import NonePlanner
from ultraep.planners.pairing import PairingPlanner
from ultraep.planners.quota import QuotaPlanner
from ultraep.planners.registry import PLANNER_NAMES, make_planner


def loads_from_expert_load(layout: ExpertLayout, expert_load: list[int]) -> torch.Tensor:
    """Spread per-expert loads over source ranks round-robin, so several source ranks contribute."""
    loads = torch.zeros(layout.num_ranks, layout.num_experts, dtype=torch.int64)
    for expert, load in enumerate(expert_load):
        share, remainder = divmod(load, layout.num_ranks)
        loads[:, expert] = share
        loads[:remainder, expert] += 1
    return loads


def random_loads(layout: ExpertLayout, seed: int, max_load: int = 1000, alpha: float = 1.2) -> torch.Tensor:
    """Return Zipf-like skewed loads: expert popularity ~ 1 / rank**alpha in a random order."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, layout.num_experts + 1, dtype=torch.float64) ** alpha
    weights = weights[torch.randperm(layout.num_experts, generator=generator)]
    noise = torch.rand(layout.num_ranks, layout.num_experts, generator=generator, dtype=torch.float64)
    return (weights[None, :] * noise * max_load).round().to(torch.int64)


def eplb_oracle() -> EplbPlanner:
    """EPLB that places from the current microbatch on every call (the benchmark oracle)."""
    return EplbPlanner(use_current=True, interval=1)


PLANNER_FACTORIES = [
    pytest.param(NonePlanner, id="none"),
    pytest.param(PairingPlanner, id="pairing"),
    pytest.param(eplb_oracle, id="eplb_oracle"),
    pytest.param(lambda: MilpPlanner(time_limit=20.0, replica_time_limit=5.0), id="milp"),
]

# (layout, per-expert loads): adversarial inputs every planner must plan exactly.
ADVERSARIAL_CASES = [
    pytest.param(ExpertLayout(4, 2, 1), [0] * 8, id="all_zero"),
    pytest.param(ExpertLayout(4, 2, 1), [5000, 0, 0, 0, 0, 0, 0, 0], id="one_hot_expert"),
    pytest.param(ExpertLayout(4, 2, 2), [7] * 8, id="all_equal"),
    pytest.param(ExpertLayout(1, 4, 2), [9, 1, 0, 3], id="one_rank"),
    pytest.param(ExpertLayout(4, 2, 0), [100, 1, 2, 3, 4, 5, 6, 7], id="zero_redundant_slots"),
    pytest.param(ExpertLayout(8, 1, 2), [3, 0, 0, 0, 0, 0, 0, 0], id="more_replicas_than_tokens"),
    pytest.param(ExpertLayout(4, 2, 1), [2_000_000_000, 70_000, 40_000, 0, 1, 3, 999_999, 5], id="far_above_int16"),
    pytest.param(ExpertLayout(4, 2, 1), [50, 50, 50, 50, 0, 0, 0, 0], id="ties"),
    pytest.param(ExpertLayout(2, 3, 1), [10, 10, 10, 0, 0, 0], id="too_few_slots"),
]


# --- every planner: exact plans on adversarial and random loads ---


@pytest.mark.parametrize("layout, expert_load", ADVERSARIAL_CASES)
@pytest.mark.parametrize("make", PLANNER_FACTORIES)
def test_planner_exact_on_adversarial_loads(make, layout, expert_load):
    loads = loads_from_expert_load(layout, expert_load)
    plan = make()(loads, layout)
    assert isinstance(plan, Plan)
    assert plan.replica_expert_ids.dtype == torch.int64
    assert plan.quota.dtype == torch.int64
    check_plan(plan, loads)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("make", PLANNER_FACTORIES)
def test_planner_exact_on_random_loads(make, seed):
    layout = ExpertLayout(4, 2, 1)
    loads = random_loads(layout, seed)
    check_plan(make()(loads, layout), loads)


layouts = st.builds(
    ExpertLayout,
    num_ranks=st.integers(1, 5),
    experts_per_rank=st.integers(1, 3),
    redundant_slots_per_rank=st.integers(0, 3),
)


@st.composite
def layouts_and_loads(draw):
    layout = draw(layouts)
    cell = st.one_of(st.integers(0, 5), st.integers(0, 1000), st.integers(0, 10**8))
    values = draw(st.lists(cell, min_size=layout.num_ranks * layout.num_experts, max_size=layout.num_ranks * layout.num_experts))
    return layout, torch.tensor(values, dtype=torch.int64).view(layout.num_ranks, layout.num_experts)


@settings(max_examples=60, deadline=None)
@given(case=layouts_and_loads())
def test_fast_planners_exact_property(case):
    layout, loads = case
    for planner in (NonePlanner(), PairingPlanner(), eplb_oracle()):
        check_plan(planner(loads, layout), loads)


@settings(max_examples=60, deadline=None)
@given(case=layouts_and_loads())
def test_fast_planners_deterministic(case):
    layout, loads = case
    for make in (PairingPlanner, eplb_oracle):
        assert make()(loads, layout).fingerprint() == make()(loads.clone(), layout).fingerprint()


def test_none_planner_keeps_all_load_on_masters():
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[10, 2, 0, 1], [0, 0, 2, 1]])
    plan = NonePlanner()(loads, layout)
    assert plan.replica_expert_ids.tolist() == [[-1], [-1]]
    assert plan.quota.tolist() == [10, 2, 0, 2, 2, 0]


# --- pairing ---


def test_pairing_hand_checked_single_refill():
    # Ranks carry 12 and 4; targets 8 and 8: rank 1 takes 4 assignments of expert 0 from rank 0.
    layout = ExpertLayout(2, 2, 1)
    loads = loads_from_expert_load(layout, [10, 2, 2, 2])
    plan = PairingPlanner()(loads, layout)
    assert plan.replica_expert_ids.tolist() == [[-1], [0]]
    assert plan.quota.tolist() == [6, 2, 0, 2, 2, 4]


def test_pairing_sender_overshoots_and_is_refilled():
    # Targets 4, 4, 4. Rank 2 takes its whole deficit 4 from rank 0 (largest excess 3), which drops
    # to 3 and is then refilled with 1 assignment of expert 1 from rank 1.
    layout = ExpertLayout(3, 1, 1)
    loads = loads_from_expert_load(layout, [7, 5, 0])
    plan = PairingPlanner()(loads, layout)
    assert plan.replica_expert_ids.tolist() == [[1], [-1], [0]]
    assert plan.quota.tolist() == [3, 1, 4, 0, 0, 4]
    assert plan.rank_load().tolist() == [4, 4, 4]


def test_pairing_takes_sender_expert_with_largest_quota():
    # Rank 1 needs 6; rank 0's expert 1 (10) covers it in one refill, expert 0 (2) would not.
    layout = ExpertLayout(2, 2, 1)
    loads = loads_from_expert_load(layout, [2, 10, 0, 0])
    plan = PairingPlanner()(loads, layout)
    assert plan.replica_expert_ids.tolist() == [[-1], [1]]
    assert plan.quota.tolist() == [2, 4, 0, 0, 0, 6]


def test_pairing_master_quota_drops_to_zero():
    layout = ExpertLayout(2, 2, 1)
    loads = loads_from_expert_load(layout, [3, 3, 0, 0])
    plan = PairingPlanner()(loads, layout)
    assert plan.replica_expert_ids.tolist() == [[-1], [0]]
    assert plan.quota.tolist() == [0, 3, 0, 0, 0, 3]


def test_pairing_keeps_largest_replicas_when_slots_short():
    # Rank 1 wants 9: expert 0 gives 6, expert 1 gives 3. One slot keeps the 6; the 3 returns home.
    layout = ExpertLayout(2, 3, 1)
    loads = loads_from_expert_load(layout, [6, 6, 6, 0, 0, 0])
    plan = PairingPlanner()(loads, layout)
    assert plan.replica_expert_ids.tolist() == [[-1], [0]]
    assert plan.quota.tolist() == [0, 6, 6, 0, 0, 0, 0, 6]
    assert plan.rank_load().tolist() == [12, 6]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(ExpertLayout(4, 4, 8), id="4_ranks"),
        pytest.param(ExpertLayout(8, 2, 8), id="8_ranks"),
        pytest.param(ExpertLayout(3, 5, 8), id="3_ranks_odd"),
    ],
)
def test_pairing_exact_balance_with_enough_slots(layout, seed):
    loads = random_loads(layout, seed, max_load=997)
    plan = PairingPlanner()(loads, layout)
    check_plan(plan, loads)
    total = int(loads.sum())
    rank_load = plan.rank_load()
    assert int(rank_load.max()) == math.ceil(total / layout.num_ranks)
    assert int(rank_load.min()) == total // layout.num_ranks


@settings(max_examples=40, deadline=None)
@given(layout=layouts, data=st.data())
def test_pairing_slot_limit_keeps_largest(layout, data):
    loads_values = data.draw(st.lists(st.integers(0, 500), min_size=layout.num_ranks * layout.num_experts, max_size=layout.num_ranks * layout.num_experts))
    loads = torch.tensor(loads_values, dtype=torch.int64).view(layout.num_ranks, layout.num_experts)
    unlimited = ExpertLayout(layout.num_ranks, layout.experts_per_rank, layout.num_experts)
    full = PairingPlanner()(loads, unlimited)
    limited = PairingPlanner()(loads, layout)
    check_plan(limited, loads)
    full_quota = full.quota.view(layout.num_ranks, unlimited.slots_per_rank)[:, layout.experts_per_rank :]
    limited_quota = limited.quota.view(layout.num_ranks, layout.slots_per_rank)[:, layout.experts_per_rank :]
    for rank in range(layout.num_ranks):
        expected_kept = sorted(
            ((int(q), int(e)) for e, q in zip(full.replica_expert_ids[rank], full_quota[rank]) if e >= 0),
            key=lambda item: (-item[0], item[1]),
        )[: layout.redundant_slots_per_rank]
        kept_replicas = sorted(
            (int(q), int(e)) for e, q in zip(limited.replica_expert_ids[rank], limited_quota[rank]) if e >= 0
        )
        assert kept_replicas == sorted(expected_kept)


# --- eplb ---


def test_eplb_never_two_instances_on_one_rank():
    layout = ExpertLayout(4, 2, 1)
    loads = loads_from_expert_load(layout, [1000, 10, 10, 10, 10, 10, 10, 10])
    planner = EplbPlanner(interval=1)
    planner.observe(loads, layout)
    plan = planner(loads, layout)
    check_plan(plan, loads)
    table = plan.physical_to_logical().view(layout.num_ranks, layout.slots_per_rank)
    assert ((table == 0).sum(dim=1) <= 1).all()
    assert int(plan.logical_replica_count().sum()) == 12
    # Expert 0 fills ranks 1..3; rank 0 masters experts 0 and 1, so its slot goes to expert 2.
    assert plan.replica_expert_ids.tolist() == [[2], [0], [0], [0]]


def test_eplb_even_split_remainder_to_master_first():
    layout = ExpertLayout(2, 2, 1)
    planner = EplbPlanner(interval=1)
    planner.observe(loads_from_expert_load(layout, [100, 1, 1, 1]), layout)
    plan = planner(loads_from_expert_load(layout, [7, 2, 3, 4]), layout)
    # Expert 1 would be next, but its master rank 0 has the only free slot, so expert 2 gets it.
    assert plan.replica_expert_ids.tolist() == [[2], [0]]
    # Expert 0: 7 = 4 (master) + 3; expert 2: 3 = 2 (master) + 1.
    assert plan.quota.tolist() == [4, 2, 1, 2, 4, 3]


def test_eplb_replica_quota_may_be_zero():
    layout = ExpertLayout(3, 1, 1)
    planner = EplbPlanner(interval=1)
    planner.observe(loads_from_expert_load(layout, [90, 0, 0]), layout)
    plan = planner(loads_from_expert_load(layout, [1, 0, 0]), layout)
    assert plan.replica_expert_ids.tolist() == [[-1], [0], [0]]
    assert plan.quota.tolist() == [1, 0, 0, 0, 0, 0]


def test_eplb_empty_history_is_masters_only():
    layout = ExpertLayout(4, 2, 1)
    loads = loads_from_expert_load(layout, [1000, 1, 1, 1, 1, 1, 1, 1])
    plan = EplbPlanner(interval=1)(loads, layout)
    assert (plan.replica_expert_ids == -1).all()
    assert plan.quota.tolist() == NonePlanner()(loads, layout).quota.tolist()


def test_eplb_use_current_sees_current_loads():
    layout = ExpertLayout(4, 2, 1)
    loads = loads_from_expert_load(layout, [1, 1, 1, 1, 1, 1, 1000, 1])
    plan = EplbPlanner(interval=1, use_current=True)(loads, layout)
    assert int((plan.replica_expert_ids == 6).sum()) == 3


def hot_expert_loads(layout: ExpertLayout, expert: int) -> torch.Tensor:
    expert_load = [1] * layout.num_experts
    expert_load[expert] = 1000
    return loads_from_expert_load(layout, expert_load)


def replicated_experts(plan: Plan) -> set[int]:
    return {int(e) for e in plan.replica_expert_ids.reshape(-1) if e >= 0}


def test_eplb_window_forgets_old_microbatches():
    layout = ExpertLayout(4, 2, 1)
    planner = EplbPlanner(window=2, interval=1)
    for expert in (0, 3, 5):
        planner.observe(hot_expert_loads(layout, expert), layout)
    assert planner.history_length == 2
    plan = planner(hot_expert_loads(layout, 0), layout)
    # Experts 3 and 5 are in the window and share the 4 slots; expert 0 fell out of it.
    assert 0 not in replicated_experts(plan)
    assert int((plan.replica_expert_ids == 3).sum()) == 2
    assert int((plan.replica_expert_ids == 5).sum()) == 2


def test_eplb_interval_reuses_placement():
    layout = ExpertLayout(4, 2, 1)
    planner = EplbPlanner(interval=3)
    planner.observe(hot_expert_loads(layout, 0), layout)
    placements = []
    for _ in range(4):
        loads = hot_expert_loads(layout, 5)
        placements.append(planner(loads, layout).replica_expert_ids.tolist())
        planner.observe(loads, layout)
    # Calls 0..2 keep the placement made at call 0, when expert 0 was hot. Call 3 re-places from a
    # window of one microbatch with expert 0 hot and three with expert 5 hot.
    assert placements[0] == placements[1] == placements[2]
    assert int((torch.tensor(placements[0]) == 0).sum()) == 3
    assert int((torch.tensor(placements[3]) == 5).sum()) == 3


def test_eplb_interval_counts_calls_from_reset():
    layout = ExpertLayout(4, 2, 1)
    planner = EplbPlanner(interval=100)
    planner(hot_expert_loads(layout, 0), layout)
    planner.observe(hot_expert_loads(layout, 7), layout)
    assert replicated_experts(planner(hot_expert_loads(layout, 7), layout)) == set()
    planner.reset()
    assert planner.history_length == 0
    planner.observe(hot_expert_loads(layout, 7), layout)
    assert 7 in replicated_experts(planner(hot_expert_loads(layout, 7), layout))


def test_eplb_hierarchical_keeps_replicas_in_node():
    layout = ExpertLayout(4, 2, 1)
    planner = EplbPlanner(policy="hierarchical", num_nodes=2, interval=1, use_current=True)
    plan = planner(hot_expert_loads(layout, 0), layout)
    check_plan(plan, hot_expert_loads(layout, 0))
    # Expert 0's node is ranks 0 and 1, so its only replica sits on rank 1.
    assert plan.replica_expert_ids[:, 0].tolist()[1] == 0
    assert int((plan.replica_expert_ids == 0).sum()) == 1
    for rank, expert in enumerate(plan.replica_expert_ids[:, 0].tolist()):
        if expert >= 0:
            assert expert // 4 == rank // 2


def test_eplb_global_spreads_across_nodes():
    layout = ExpertLayout(4, 2, 1)
    plan = EplbPlanner(interval=1, use_current=True)(hot_expert_loads(layout, 0), layout)
    assert int((plan.replica_expert_ids == 0).sum()) == 3


def test_eplb_hierarchical_rejects_indivisible_nodes():
    layout = ExpertLayout(6, 1, 1)
    planner = EplbPlanner(policy="hierarchical", num_nodes=4)
    with pytest.raises(ValueError, match=r"num_ranks=6 .*num_nodes=4"):
        planner(torch.zeros(6, 6, dtype=torch.int64), layout)
    with pytest.raises(ValueError, match=r"num_ranks=6 .*num_nodes=4"):
        planner.observe(torch.zeros(6, 6, dtype=torch.int64), layout)


def test_eplb_rejects_second_layout():
    planner = EplbPlanner()
    planner.observe(torch.zeros(2, 2, dtype=torch.int64), ExpertLayout(2, 1, 1))
    with pytest.raises(ValueError, match="one EplbPlanner per layer"):
        planner(torch.zeros(4, 4, dtype=torch.int64), ExpertLayout(4, 1, 1))


@pytest.mark.parametrize(
    "settings_, error, match",
    [
        pytest.param({"window": 0}, ValueError, r"window must be in \[1, 1000000\], got 0", id="window_zero"),
        pytest.param({"window": 2.5}, TypeError, "window must be an int", id="window_float"),
        pytest.param({"interval": 0}, ValueError, r"interval must be in \[1, 1000000\], got 0", id="interval_zero"),
        pytest.param({"interval": True}, TypeError, "interval must be an int", id="interval_bool"),
        pytest.param({"policy": "local"}, ValueError, r"policy must be one of \['global', 'hierarchical'\]", id="policy"),
        pytest.param({"num_nodes": 0}, ValueError, "num_nodes must be >= 1, got 0", id="num_nodes_zero"),
        pytest.param({"use_current": 1}, TypeError, "use_current must be a bool", id="use_current_int"),
    ],
)
def test_eplb_config_rejects_bad_settings(settings_, error, match):
    with pytest.raises(error, match=match):
        EplbConfig(**settings_)


def test_eplb_rejects_config_and_settings_together():
    with pytest.raises(TypeError, match="either config or settings"):
        EplbPlanner(EplbConfig(), window=3)


# --- milp ---


@pytest.mark.parametrize(
    "layout, expert_load, max_rank_load, num_replicas",
    [
        # Mean 8: rank 1 takes 4 of expert 0.
        pytest.param(ExpertLayout(2, 2, 1), [10, 2, 2, 2], 8, 1, id="one_replica_reaches_mean"),
        # Mean 7: rank 2 takes 6 of expert 0, rank 0 takes 3 of expert 1; one replica cannot do it.
        pytest.param(ExpertLayout(3, 1, 1), [10, 10, 1], 7, 2, id="chain_of_two"),
        # Rank 1's single slot moves one expert (10); rank 0 keeps 20 > mean 15.
        pytest.param(ExpertLayout(2, 3, 1), [10, 10, 10, 0, 0, 0], 20, 1, id="slot_bound_above_mean"),
        # Four instances of expert 0 share 100.
        pytest.param(ExpertLayout(4, 1, 1), [100, 0, 0, 0], 25, 3, id="one_hot_expert"),
        pytest.param(ExpertLayout(4, 2, 0), [9, 1, 2, 3, 4, 5, 6, 7], 13, 0, id="no_slots"),
    ],
)
def test_milp_hand_checked_optimum(layout, expert_load, max_rank_load, num_replicas):
    loads = loads_from_expert_load(layout, expert_load)
    result = solve_milp(loads, layout, time_limit=20.0)
    assert isinstance(result, MilpResult)
    check_plan(result.plan, loads)
    assert result.status == "optimal"
    assert result.replica_status == "optimal"
    assert result.max_rank_load == max_rank_load
    assert result.lower_bound == max_rank_load
    assert int(result.plan.rank_load().max()) == max_rank_load
    assert result.num_replicas == num_replicas
    assert result.replicas_lower_bound == num_replicas


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "layout",
    [pytest.param(ExpertLayout(4, 2, 1), id="4x2_one_slot"), pytest.param(ExpertLayout(3, 3, 2), id="3x3_two_slots")],
)
def test_milp_not_worse_than_any_planner(layout, seed):
    loads = random_loads(layout, seed)
    result = solve_milp(loads, layout, time_limit=20.0, replica_time_limit=5.0)
    check_plan(result.plan, loads)
    assert result.status == "optimal"
    assert result.max_rank_load >= math.ceil(int(loads.sum()) / layout.num_ranks)
    others = [NonePlanner(), PairingPlanner(), eplb_oracle(), QuotaPlanner()]
    for planner in others:
        other_max = int(planner(loads, layout).rank_load().max())
        assert result.max_rank_load <= other_max, planner.name


def test_milp_counts_far_above_int16():
    layout = ExpertLayout(2, 2, 1)
    loads = loads_from_expert_load(layout, [3_000_000_001, 70_000, 5, 0])
    result = solve_milp(loads, layout, time_limit=20.0)
    check_plan(result.plan, loads)
    assert result.max_rank_load == math.ceil(int(loads.sum()) / 2)


def test_milp_rejects_large_instance():
    layout = ExpertLayout(64, 4, 1)
    loads = torch.ones(64, 256, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"num_ranks=64 x num_experts=256 has 16384 cells.*allow_large=True"):
        solve_milp(loads, layout)
    with pytest.raises(ValueError, match="16384 cells"):
        MilpPlanner()(loads, layout)


def test_milp_allow_large_passes_size_check():
    # Without redundant slots the instance is solved without the solver, so this stays fast.
    layout = ExpertLayout(64, 4, 0)
    loads = torch.ones(64, 256, dtype=torch.int64)
    result = solve_milp(loads, layout, allow_large=True)
    assert 64 * 256 > MAX_MILP_CELLS
    assert result.max_rank_load == 256
    assert result.status == "optimal"


@pytest.mark.parametrize(
    "settings_, error, match",
    [
        pytest.param({"time_limit": 0}, ValueError, r"time_limit must be in \(0, 86400\]", id="time_limit_zero"),
        pytest.param({"replica_time_limit": -1.0}, ValueError, r"replica_time_limit must be in \(0, 86400\]", id="replica_negative"),
        pytest.param({"time_limit": "1"}, TypeError, "time_limit must be a number of seconds", id="time_limit_str"),
        pytest.param({"allow_large": "yes"}, TypeError, "allow_large must be a bool", id="allow_large_str"),
    ],
)
def test_milp_config_rejects_bad_settings(settings_, error, match):
    with pytest.raises(error, match=match):
        MilpConfig(**settings_)


def test_milp_solve_rejects_bad_time_limit():
    layout = ExpertLayout(2, 1, 1)
    with pytest.raises(ValueError, match="time_limit must be in"):
        solve_milp(torch.zeros(2, 2, dtype=torch.int64), layout, time_limit=-5)


def test_milp_planner_rejects_config_and_settings_together():
    with pytest.raises(TypeError, match="either config or settings"):
        MilpPlanner(MilpConfig(), time_limit=3.0)


# --- registry ---


@pytest.mark.parametrize(
    "name, planner_class",
    [
        pytest.param("quota", QuotaPlanner, id="quota"),
        pytest.param("none", NonePlanner, id="none"),
        pytest.param("pairing", PairingPlanner, id="pairing"),
        pytest.param("eplb", EplbPlanner, id="eplb"),
        pytest.param("milp", MilpPlanner, id="milp"),
    ],
)
def test_registry_builds_each_planner(name, planner_class):
    planner = make_planner(name)
    assert isinstance(planner, planner_class)
    assert isinstance(planner, Planner)
    assert planner.name == name


def test_registry_names():
    assert PLANNER_NAMES == ("quota", "none", "pairing", "eplb", "lp_reroute", "milp")


def test_registry_passes_settings():
    assert make_planner("eplb", window=4, policy="hierarchical", num_nodes=2).config == EplbConfig(
        window=4, policy="hierarchical", num_nodes=2
    )
    assert make_planner("milp", time_limit=5.0).config.time_limit == 5.0
    assert make_planner("quota", balance_target=1.0).config.balance_target == 1.0


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"unknown planner 'lplb'; valid names are \['quota', 'none', 'pairing', 'eplb', 'lp_reroute', 'milp'\]"):
        make_planner("lplb")


def test_registry_rejects_unknown_setting():
    with pytest.raises(TypeError, match=r"planner 'eplb' got unknown settings \['windows'\]; it takes only \["):
        make_planner("eplb", windows=3)
    with pytest.raises(TypeError, match=r"planner 'none' got unknown settings \['window'\]; it takes no settings"):
        make_planner("none", window=3)


def test_registry_checks_setting_bounds():
    with pytest.raises(ValueError, match="window must be in"):
        make_planner("eplb", window=0)


@pytest.mark.parametrize("name, owner", [("eplb", "EplbPlanner"), ("lp_reroute", "LpReroutePlanner")])
def test_periodic_planner_names_itself_on_layout_change(name, owner):
    planner = make_planner(name)
    planner(torch.ones(2, 4, dtype=torch.int64), ExpertLayout(2, 2, 1))
    with pytest.raises(ValueError, match=f"{owner} got layout .* use one {owner} per layer and layout"):
        planner(torch.ones(4, 4, dtype=torch.int64), ExpertLayout(4, 1, 1))


def test_lp_reroute_config_errors_name_its_own_fields():
    with pytest.raises(ValueError, match=r"LpRerouteConfig.window must be in \[1, "):
        LpRerouteConfig(window=0)


def test_global_eplb_rejects_a_node_count():
    with pytest.raises(ValueError, match="EplbConfig.num_nodes=3 applies to the hierarchical policy only"):
        EplbConfig(num_nodes=3)
