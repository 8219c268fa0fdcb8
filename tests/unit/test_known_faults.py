"""Faults reported against other balancers, each turned into a check of the right value."""

import pytest
import torch

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan, check_plan
from ultraep.planners.quota import QuotaPlanner
from ultraep.reroute import count_local_load, reroute


def test_hot_expert_never_doubled_on_one_rank():
    layout = ExpertLayout(4, 2, 1)
    loads = torch.tensor([[1000, 10, 10, 10, 10, 10, 10, 10]] + [[0] * 8] * 3)
    plan = QuotaPlanner()(loads, layout)
    check_plan(plan, loads)
    table = plan.physical_to_logical().view(4, 3)
    for rank in range(4):
        assert (table[rank] == 0).sum() <= 1
    assert int(plan.logical_replica_count()[0]) <= 4
    assert int(plan.logical_replica_count().sum()) <= 12
    assert int(plan.rank_load().max()) <= 268  # ceil(1070 / 4)


def test_padding_entry_never_read_as_last_slot():
    # Slot 5 holds a replica of expert 0: a -1 used as an index would land there.
    layout = ExpertLayout(2, 2, 1)
    topk_ids = torch.tensor([[1, 3]] * 8)
    loads = torch.stack([count_local_load(topk_ids, 4), torch.zeros(4, dtype=torch.int64)])
    plan = Plan(layout, torch.tensor([[2], [0]]), torch.tensor([0, 8, 0, 0, 8, 0]))
    check_plan(plan, loads)
    assert plan.logical_to_physical().tolist()[1] == [1, -1]
    out = reroute(topk_ids, plan, loads, 0)
    assert out[:, 0].tolist() == [1] * 8
    assert out[:, 1].tolist() == [4] * 8
    assert not (out == -1).any()
    assert not (out == 5).any()


def test_more_instances_than_tokens_gives_whole_quotas():
    layout = ExpertLayout(4, 1, 1)
    topk_ids = torch.tensor([[0], [0]])
    loads = torch.zeros(4, 4, dtype=torch.int64)
    loads[0] = count_local_load(topk_ids, 4)
    plan = QuotaPlanner()(loads, layout)
    check_plan(plan, loads)
    expert0 = plan.quota[plan.physical_to_logical() == 0]
    assert int(expert0.sum()) == 2
    assert (expert0 >= 0).all()
    out = reroute(topk_ids, plan, loads, 0)
    assert torch.equal(torch.bincount(out.view(-1), minlength=8), plan.quota)


def test_empty_microbatch_plans_and_reroutes():
    layout = ExpertLayout(2, 2, 1)
    topk_ids = torch.zeros(0, 2, dtype=torch.int64)
    loads = torch.zeros(2, 4, dtype=torch.int64)
    plan = QuotaPlanner()(loads, layout)
    check_plan(plan, loads)
    assert plan.logical_replica_count().tolist() == [1, 1, 1, 1]
    out = reroute(topk_ids, plan, loads, 0)
    assert out.shape == (0, 2)
    assert out.dtype == torch.int64


def test_padding_rows_add_no_load():
    topk_ids = torch.tensor([[0, 1], [-1, -1], [2, 3], [-1, -1]])
    loads = torch.stack([count_local_load(topk_ids, 4), torch.zeros(4, dtype=torch.int64)])
    assert loads[0].tolist() == [1, 1, 1, 1]
    plan = QuotaPlanner()(loads, ExpertLayout(2, 2, 1))
    assert int(plan.quota.sum()) == 4
    out = reroute(topk_ids, plan, loads, 0)
    assert out[1].tolist() == [-1, -1]
    assert out[3].tolist() == [-1, -1]
    assert (out[[0, 2]] >= 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ties_give_documented_plan(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    layout = ExpertLayout(4, 2, 1)
    loads = torch.full((4, 8), 7, device=device)
    plan = QuotaPlanner()(loads, layout)
    # Equal loads are already balanced: no replica, each master keeps its 28 assignments.
    assert plan.replica_expert_ids.cpu().tolist() == [[-1]] * 4
    assert plan.quota.cpu().tolist() == [28, 28, 0] * 4
