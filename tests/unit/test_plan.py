import json
import re

import pytest
import torch

from ultraep.layout import ExpertLayout, check_logical_to_physical
from ultraep.plan import Plan, PlanInvariantError, check_plan


def _example_plan() -> tuple[Plan, torch.Tensor]:
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[10, 2, 2, 2], [0, 0, 0, 0]])
    plan = Plan(layout, torch.tensor([[-1], [0]]), torch.tensor([6, 2, 0, 2, 2, 4]))
    return plan, loads


def test_maps_of_hand_checked_plan():
    plan, loads = _example_plan()
    check_plan(plan, loads)
    assert plan.physical_to_logical().tolist() == [0, 1, -1, 2, 3, 0]
    assert plan.logical_to_physical().tolist() == [[0, 5], [1, -1], [3, -1], [4, -1]]
    assert plan.logical_replica_count().tolist() == [2, 1, 1, 1]
    assert plan.rank_load().tolist() == [8, 8]
    assert plan.imbalance() == 1.0
    assert int(plan.num_replicas()) == 1
    check_logical_to_physical(plan.logical_to_physical(), plan.physical_to_logical())


def test_logical_to_physical_lists_master_first():
    # Expert 3's master sits on rank 1 (slot 4); replicas on ranks 0 and 2 have lower and higher ids.
    layout = ExpertLayout(3, 2, 1)
    plan = Plan(layout, torch.tensor([[3], [-1], [3]]), torch.zeros(9, dtype=torch.int64))
    assert plan.logical_to_physical()[3].tolist() == [4, 2, 8]


def test_dict_round_trip_is_json_stable():
    plan, _ = _example_plan()
    data = json.loads(json.dumps(plan.to_dict()))
    assert sorted(data) == sorted(
        [
            "num_ranks",
            "experts_per_rank",
            "redundant_slots_per_rank",
            "physical_to_logical",
            "logical_to_physical",
            "logical_replica_count",
            "quota",
            "rank_load",
            "imbalance",
        ]
    )
    assert data["logical_to_physical"] == [[0, 5], [1, -1], [3, -1], [4, -1]]
    again = Plan.from_dict(data)
    assert again.fingerprint() == plan.fingerprint()


def test_from_dict_rejects_moved_master():
    plan, _ = _example_plan()
    data = plan.to_dict()
    data["physical_to_logical"] = [1, 0, -1, 2, 3, 0]
    with pytest.raises(ValueError, match="moves a master"):
        Plan.from_dict(data)


def test_fingerprint_changes_with_quota():
    plan, _ = _example_plan()
    other = Plan(plan.layout, plan.replica_expert_ids, torch.tensor([5, 2, 0, 2, 2, 5]))
    assert other.fingerprint() != plan.fingerprint()


@pytest.mark.parametrize(
    "replicas, quota, pattern",
    [
        pytest.param([[-1], [0]], [6, 2, 0, 2, 2, 3], "quotas of expert 0 sum to 9 but its load is 10", id="quota_sum"),
        pytest.param([[-1], [0]], [11, 2, 0, 2, 2, -1], "quota of physical slot 5 is negative", id="negative"),
        pytest.param([[-1], [-1]], [6, 2, 4, 2, 2, 0], "empty redundant slot 0 of rank 0 has quota 4", id="empty_slot"),
        pytest.param([[1], [0]], [6, 2, 0, 2, 2, 4], "rank 0 hosts two instances of expert 1", id="two_copies"),
        pytest.param([[7], [0]], [6, 2, 0, 2, 2, 4], "invalid expert id 7", id="bad_id"),
    ],
)
def test_check_plan_names_the_broken_invariant(replicas, quota, pattern):
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[10, 2, 2, 2], [0, 0, 0, 0]])
    plan = Plan(layout, torch.tensor(replicas), torch.tensor(quota))
    with pytest.raises(PlanInvariantError, match=pattern):
        check_plan(plan, loads)


@pytest.mark.parametrize(
    "change, pattern",
    [
        pytest.param({"quota": [6, 2, 0]}, "'quota' must be a list of 6 ints, got 3 entries", id="short_quota"),
        pytest.param({"quota": [5.5, 2, 0, 2, 2, 4]}, "'quota' entry 0 is 5.5", id="fractional_quota"),
        pytest.param({"num_ranks": 2.7}, "'num_ranks' must be an int, got float 2.7", id="fractional_ranks"),
        pytest.param({"physical_to_logical": [0, 1, 9, 2, 3, 0], "quota": [6, 2, 0, 2, 2, 4]}, "invalid expert id 9", id="bad_id"),
        pytest.param({"physical_to_logical": [0, 1, 1, 2, 3, 0]}, "rank 0 hosts two instances of expert 1", id="two_copies"),
        pytest.param({"logical_to_physical": [[0, 2], [1, -1], [3, -1], [4, -1]]}, "'logical_to_physical' is", id="table"),
        pytest.param({"logical_replica_count": [1, 1, 1, 1]}, "'logical_replica_count' is", id="counts"),
        pytest.param({"rank_load": [8, 9]}, "'rank_load' is", id="rank_load"),
        pytest.param({"imbalance": 1.5}, "'imbalance' is 1.5", id="imbalance"),
    ],
)
def test_from_dict_rejects_inconsistent_plans(change, pattern):
    plan, _ = _example_plan()
    data = {**plan.to_dict(), **change}
    with pytest.raises(ValueError, match=re.escape(pattern)):
        Plan.from_dict(data)


def test_from_dict_round_trips_json():
    plan, _ = _example_plan()
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.fingerprint() == plan.fingerprint()


@pytest.mark.parametrize(
    "loads, error, pattern",
    [
        pytest.param(torch.tensor([[10.4, 2, 2, 2], [0, 0, 0, 0]]), TypeError, "must be an integer tensor", id="float"),
        pytest.param(torch.zeros(4, 2, dtype=torch.int64), ValueError, r"must have shape \[num_ranks, num_experts\]", id="transposed"),
        pytest.param(torch.tensor([10, 2, 2, 2]), ValueError, r"must have shape \[num_ranks, num_experts\]", id="vector"),
    ],
)
def test_check_plan_rejects_bad_load_matrices(loads, error, pattern):
    plan, _ = _example_plan()
    with pytest.raises(error, match=pattern):
        check_plan(plan, loads)


def test_check_plan_rejects_float_plan_tensors():
    plan, loads = _example_plan()
    with pytest.raises(PlanInvariantError, match="quota must be an integer tensor"):
        check_plan(Plan(plan.layout, plan.replica_expert_ids, plan.quota.double()), loads)
    with pytest.raises(PlanInvariantError, match="replica_expert_ids must be an integer tensor"):
        check_plan(Plan(plan.layout, plan.replica_expert_ids.float(), plan.quota), loads)


def test_check_plan_minimum_replica_quota():
    plan, loads = _example_plan()
    with pytest.raises(PlanInvariantError, match="quota 4, below min_replica_quota=5"):
        check_plan(plan, loads, min_replica_quota=5)


def test_check_plan_reads_int32_plans():
    plan, loads = _example_plan()
    narrow = Plan(plan.layout, plan.replica_expert_ids.int(), plan.quota.int())
    check_plan(narrow, loads)
    assert narrow.expert_load().tolist() == [10, 2, 2, 2]
