import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan, check_plan
from ultraep.planners.quota import QuotaPlanner
from ultraep.reroute import count_local_load, reroute, source_quota


def _random_microbatch(seed, num_ranks, experts_per_rank, topk, num_tokens, padding=0.1):
    gen = torch.Generator().manual_seed(seed)
    num_experts = num_ranks * experts_per_rank
    probs = torch.rand(num_experts, generator=gen) ** 4 + 1e-3
    topk_ids = []
    for _ in range(num_ranks):
        if num_tokens == 0:
            ids = torch.zeros(0, topk, dtype=torch.int64)
        else:
            ids = torch.multinomial(probs, num_tokens * topk, replacement=True, generator=gen).view(num_tokens, topk)
            ids[torch.rand(num_tokens, topk, generator=gen) < padding] = -1
        topk_ids.append(ids)
    loads = torch.stack([count_local_load(ids, num_experts) for ids in topk_ids])
    return topk_ids, loads


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    num_ranks=st.integers(1, 8),
    experts_per_rank=st.integers(1, 4),
    slots=st.integers(0, 3),
    topk=st.integers(1, 4),
    num_tokens=st.integers(0, 60),
)
def test_reroute_meets_every_quota_exactly(seed, num_ranks, experts_per_rank, slots, topk, num_tokens):
    layout = ExpertLayout(num_ranks, experts_per_rank, slots)
    topk_ids, loads = _random_microbatch(seed, num_ranks, experts_per_rank, topk, num_tokens)
    plan = QuotaPlanner(balance_target=1.0)(loads, layout)
    check_plan(plan, loads)
    split = source_quota(plan, loads)
    assert torch.equal(split.sum(dim=0), plan.quota)
    assert torch.equal(split.sum(dim=1), loads.sum(dim=1))
    slot_to_expert = plan.physical_to_logical()
    received = torch.zeros(layout.num_slots, dtype=torch.int64)
    for src_rank, ids in enumerate(topk_ids):
        slots_out = reroute(ids, plan, loads, src_rank)
        assert slots_out.shape == ids.shape
        assert slots_out.dtype == torch.int64
        # Padding passes through; every real assignment goes to an instance of its own expert.
        assert torch.equal(slots_out == -1, ids == -1)
        routed = slots_out[slots_out >= 0]
        assert torch.equal(slot_to_expert[routed], ids[ids >= 0])
        per_slot = torch.bincount(routed, minlength=layout.num_slots)
        assert torch.equal(per_slot, split[src_rank])
        received += per_slot
    assert torch.equal(received, plan.quota)


def test_local_instance_served_first():
    # Rank 1 holds a replica of expert 0 with quota 6 and produced 4 assignments of expert 0 itself:
    # all 4 stay on rank 1; rank 0's first 8 go to the master, its last 2 to the replica.
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[10, 0, 0, 0], [4, 0, 0, 0]])
    plan = Plan(layout, torch.tensor([[-1], [0]]), torch.tensor([8, 0, 0, 0, 0, 6]))
    check_plan(plan, loads)
    assert source_quota(plan, loads).tolist() == [[8, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 4]]
    rank0 = reroute(torch.zeros(10, 1, dtype=torch.int64), plan, loads, 0)
    assert rank0.view(-1).tolist() == [0] * 8 + [5, 5]
    rank1 = reroute(torch.zeros(4, 1, dtype=torch.int64), plan, loads, 1)
    assert rank1.view(-1).tolist() == [5, 5, 5, 5]


def test_reroute_depends_only_on_token_order():
    layout = ExpertLayout(2, 1, 1)
    loads = torch.tensor([[6, 0], [0, 0]])
    plan = Plan(layout, torch.tensor([[-1], [0]]), torch.tensor([3, 0, 0, 3]))
    ids = torch.tensor([[0, -1], [0, 0], [-1, 0], [0, 0]])
    out = reroute(ids, plan, loads, 0)
    assert out.tolist() == [[0, -1], [0, 0], [-1, 3], [3, 3]]


def test_duplicate_ids_in_one_token_both_routed():
    layout = ExpertLayout(3, 1, 1)
    ids = torch.tensor([[0, 0], [1, 2]])
    assert count_local_load(ids, 3).tolist() == [2, 1, 1]
    loads = torch.stack([count_local_load(ids, 3), torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)])
    plan = QuotaPlanner()(loads, layout)
    out = reroute(ids, plan, loads, 0)
    assert (out >= 0).all()
    assert plan.physical_to_logical()[out].tolist() == [[0, 0], [1, 2]]


def test_padding_never_counted_or_wrapped():
    ids = torch.tensor([[0, 1], [-1, -1], [2, 3], [-1, -1]])
    assert count_local_load(ids, 4).tolist() == [1, 1, 1, 1]


def test_empty_microbatch_returns_empty_int64():
    layout = ExpertLayout(2, 2, 1)
    loads = torch.zeros(2, 4, dtype=torch.int64)
    plan = QuotaPlanner()(loads, layout)
    out = reroute(torch.zeros(0, 2, dtype=torch.int64), plan, loads, 1)
    assert out.shape == (0, 2)
    assert out.dtype == torch.int64


def test_reroute_errors_name_the_bad_value():
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    plan = QuotaPlanner()(loads, layout)
    with pytest.raises(ValueError, match=r"topk_ids\[1\] contains expert id 4, outside \[0, 3\]"):
        reroute(torch.tensor([[0], [4]]), plan, loads, 0)
    with pytest.raises(ValueError, match="contains expert id -2"):
        reroute(torch.tensor([[0], [-2]]), plan, loads, 0)
    with pytest.raises(ValueError, match=r"loads\[0, 1\] = 1 but topk_ids on rank 0 hold 0 assignments of expert 1"):
        reroute(torch.tensor([[0], [-1]]), plan, loads, 0)
    with pytest.raises(ValueError, match="src_rank=2 is outside"):
        reroute(torch.tensor([[0], [1]]), plan, loads, 2)
    with pytest.raises(TypeError, match="integer expert ids"):
        reroute(torch.tensor([[0.0], [1.0]]), plan, loads, 0)
    with pytest.raises(ValueError, match=r"shape \[num_tokens, topk\]"):
        reroute(torch.tensor([0, 1]), plan, loads, 0)
    with pytest.raises(TypeError, match="src_rank must be an int, got float 1.0"):
        reroute(torch.tensor([[0], [1]]), plan, loads, 1.0)
    with pytest.raises(TypeError, match="src_rank must be an int, got bool True"):
        reroute(torch.tensor([[0], [1]]), plan, loads, True)


def test_plan_of_other_loads_is_rejected():
    # The plan balances other loads: its quotas of expert 0 sum to 9, not 6, so rerouting with it
    # would send assignments to instances of the wrong expert.
    layout = ExpertLayout(2, 2, 1)
    ids = torch.tensor([[0, 1], [0, -1], [0, 0]])
    loads = torch.tensor([[4, 1, 0, 0], [2, 0, 1, 1]])
    stale = QuotaPlanner()(torch.tensor([[0, 0, 0, 0], [9, 0, 0, 0]]), layout)
    message = r"the plan does not fit this load matrix: quotas of expert 0 sum to 9 but its load is 6"
    with pytest.raises(ValueError, match=message):
        reroute(ids, stale, loads, 0)
    with pytest.raises(ValueError, match=message):
        source_quota(stale, loads)
    # Without the value checks the split is computed as asked, and its rows no longer sum to the loads.
    split = source_quota(stale, loads, check_values=False)
    assert not torch.equal(split.sum(dim=1), loads.sum(dim=1))


def test_source_quota_rejects_bad_load_matrices():
    layout = ExpertLayout(2, 2, 1)
    loads = torch.tensor([[4, 1, 0, 0], [2, 0, 1, 1]])
    plan = QuotaPlanner()(loads, layout)
    with pytest.raises(TypeError, match="must be an integer tensor"):
        source_quota(plan, loads.double())
    with pytest.raises(ValueError, match=r"must have shape \[num_ranks, num_experts\]"):
        source_quota(plan, loads.t().contiguous())
    with pytest.raises(ValueError, match=r"loads\[1, 0\] = -2 is negative"):
        source_quota(plan, torch.tensor([[4, 1, 0, 0], [-2, 0, 1, 1]]))


@pytest.mark.parametrize("num_experts", [0, -3, 2.5, True])
def test_count_local_load_rejects_bad_expert_counts(num_experts):
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        count_local_load(torch.tensor([[0, 1]]), num_experts)


def test_unchecked_out_of_range_ids_uncounted():
    ids = torch.tensor([[0, 7], [-5, 1]])
    assert count_local_load(ids, 4, check_values=False).tolist() == [1, 1, 0, 0]
