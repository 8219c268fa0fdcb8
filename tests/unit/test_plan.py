import json

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
        pytest.param([[1], [0]], [6, 2, 0, 2, 2, 4], "rank 0 holds two instances of one expert", id="two_copies"),
        pytest.param([[7], [0]], [6, 2, 0, 2, 2, 4], "invalid expert id 7", id="bad_id"),
    ],
)
def test_check_plan_names_the_broken_invariant(replicas, quota, pattern):
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[10, 2, 2, 2], [0, 0, 0, 0]])
    plan = Plan(layout, torch.tensor(replicas), torch.tensor(quota))
    with pytest.raises(PlanInvariantError, match=pattern):
        check_plan(plan, loads)


def test_check_plan_minimum_replica_quota():
    plan, loads = _example_plan()
    with pytest.raises(PlanInvariantError, match="quota 4, below min_replica_quota=5"):
        check_plan(plan, loads, min_replica_quota=5)
