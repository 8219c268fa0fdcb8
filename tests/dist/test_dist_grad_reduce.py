"""Grad reduce across ranks: fixed order, bitwise reproducible, zeroed buffers, zero-quota replicas give exact zeros."""

from __future__ import annotations

import torch

from dist_harness import run_ranks
from moe_cases import assert_close_rel, expert_parameters, make_inputs, make_layers, make_manager, run_layers
from ultraep.comm import WeightSpec, plan_grad_reduce, reduce_replica_grads
from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners import Planner, masters_only_plan

SPEC = WeightSpec(((2,), (3,)))


def _reduce_and_check(reduce_plan, layout, spec, rank, grad_buffer, master_grads) -> None:
    """Run the reduce with a NaN-filled scratch buffer and check that the gradient buffer ends zeroed."""
    scratch = torch.full((reduce_plan.scratch_rows, spec.numel), float("nan"))
    reduce_replica_grads(
        reduce_plan, layout=layout, spec=spec, rank=rank, replica_grad_buffer=grad_buffer,
        master_grads=master_grads, scratch=scratch,
    )
    assert torch.equal(grad_buffer, torch.zeros_like(grad_buffer)), "the gradient buffer must be zero afterwards"


def _order_worker(rank: int, world_size: int) -> list[torch.Tensor]:
    """Expert 0 (rank 0) has replicas in slots 5, 8 and 11 (ranks 1, 2, 3); values where float32
    addition order changes the result show that the sum runs in ascending slot id."""
    layout = ExpertLayout(world_size, 2, 1)
    placement = [[-1], [0], [0], [0]]
    per_rank_value = {1: 1.0e8, 2: 1.0, 3: -1.0e8}
    grad_buffer = torch.full((1, SPEC.numel), float("nan"))
    if rank in per_rank_value:
        grad_buffer[0] = per_rank_value[rank]
    master_grads = [torch.full((2, 2), 0.5), torch.full((2, 3), 0.5)]
    reduce_plan = plan_grad_reduce(layout, placement, scratch_rows=1)
    assert [t.src_slot_id for t in reduce_plan.transfers] == [5, 8, 11]
    _reduce_and_check(reduce_plan, layout, SPEC, rank, grad_buffer, master_grads)
    return master_grads


def test_reduce_adds_in_ascending_slot_order(tmp_path):
    results = run_ranks(_order_worker, 4, tmp_path)
    # Hand-checked in float32: ((0.5 + 1e8) + 1) + -1e8 = 0.0 (0.5 and 1 are lost next to 1e8).
    expected = torch.tensor(0.5, dtype=torch.float32)
    for value in (1.0e8, 1.0, -1.0e8):
        expected = expected + torch.tensor(value, dtype=torch.float32)
    assert expected.item() == 0.0
    assert torch.equal(results[0][0][0], torch.full((2,), 0.0))
    assert torch.equal(results[0][1][0], torch.full((3,), 0.0))
    # Expert 1 has no replica: its gradient is untouched.
    assert torch.equal(results[0][0][1], torch.full((2,), 0.5))


def _tree_worker(rank: int, world_size: int) -> list[torch.Tensor]:
    """Expert 0 (rank 0) has replicas on ranks 1-4, reduced along a chain of 4 in 2 chunks."""
    layout = ExpertLayout(world_size, 2, 1)
    spec = WeightSpec(((4, 2), (4, 3)))
    placement = [[-1], [0], [0], [0], [0]]
    reduce_plan = plan_grad_reduce(layout, placement, mode="relay", num_chunks=2, scratch_rows=1)
    assert reduce_plan.relay_expert_ids == (0,)
    assert len([t for t in reduce_plan.transfers if t.dst_rank == 0]) == 2  # one sender x 2 chunks
    assert reduce_plan.num_steps == 5  # the chain's end sends chunk c in step c, the master gets it in c + 3
    grad_buffer = torch.full((1, spec.numel), float("nan"))
    if rank > 0:
        # Distinct integers per rank and element: every sum is exact, so any lost or doubled row shows.
        grad_buffer[0] = torch.arange(spec.numel, dtype=torch.float32) + 1000.0 * rank
    master_grads = [torch.zeros(2, 4, 2), torch.zeros(2, 4, 3)]
    _reduce_and_check(reduce_plan, layout, spec, rank, grad_buffer, master_grads)
    return master_grads


def test_reduce_through_relays_sums_every_replica(tmp_path):
    results = run_ranks(_tree_worker, 5, tmp_path)
    row = 4 * torch.arange(20, dtype=torch.float32) + 1000.0 * (1 + 2 + 3 + 4)
    assert torch.equal(results[0][0][0].reshape(-1), row[:8])
    assert torch.equal(results[0][1][0].reshape(-1), row[8:])
    assert torch.equal(results[0][0][1], torch.zeros(4, 2)), "expert 1 has no replica"
    for rank in range(1, 5):
        assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in results[rank]), f"rank {rank} masters no replica"


def _repeat_worker(rank: int, world_size: int) -> list[list[torch.Tensor]]:
    manager = make_manager(world_size, redundant_slots_per_rank=2)
    runs = []
    for _ in range(3):
        layers = make_layers(manager, True)
        out = run_layers(layers, make_inputs(rank, 48))
        (out * make_inputs(rank, 48, seed=3)).sum().backward()
        assert manager.stats[0].num_replicas > 0
        assert torch.equal(manager.replica_grads, torch.zeros_like(manager.replica_grads))
        runs.append([w.grad.clone() for w in expert_parameters(layers)])
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b), "grad reduce must be bitwise reproducible within a process"
    return runs[0]


def test_reduce_is_bitwise_reproducible(tmp_path):
    first = run_ranks(_repeat_worker, 4, tmp_path / "first")
    second = run_ranks(_repeat_worker, 4, tmp_path / "second")
    for rank, (a_grads, b_grads) in enumerate(zip(first, second, strict=True)):
        for a, b in zip(a_grads, b_grads, strict=True):
            assert torch.equal(a, b), f"rank {rank}: gradients differ between two launches"


class ZeroQuotaReplicaPlanner(Planner):
    """Masters-only quotas plus a replica of expert 0 with quota 0 in the last rank's first redundant slot."""

    name = "zero_quota_replica"

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        base = masters_only_plan(loads, layout)
        replica_expert_ids = base.replica_expert_ids.clone()
        replica_expert_ids[layout.num_ranks - 1, 0] = 0
        return Plan(layout, replica_expert_ids, base.quota)


def _zero_quota_worker(rank: int, world_size: int) -> None:
    manager = make_manager(world_size, redundant_slots_per_rank=1, planner=ZeroQuotaReplicaPlanner())
    grads = {}
    for balance in (True, False):
        for buffer in (manager.replica_weights, manager.replica_grads, manager.reduce_scratch):
            buffer.fill_(float("nan"))
        layers = make_layers(manager, balance)
        run_layers(layers, make_inputs(rank, 32)).sum().backward()
        if balance:
            assert manager.stats[0].num_replicas == 1
            assert manager.stats[0].forward_sync_bytes == 0, "a replica with quota 0 needs no weights"
        grads[balance] = [w.grad.clone() for w in expert_parameters(layers)]
        assert torch.equal(manager.replica_grads, torch.zeros_like(manager.replica_grads))
    for idx, (a, b) in enumerate(zip(grads[True], grads[False], strict=True)):
        assert torch.isfinite(a).all(), f"master gradient {idx} is not finite"
        assert_close_rel(a, b, f"master gradient {idx}")


def test_zero_quota_replica_gives_zero_gradient(tmp_path):
    run_ranks(_zero_quota_worker, 2, tmp_path)
