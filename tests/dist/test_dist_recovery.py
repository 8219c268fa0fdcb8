"""Cached replicas after fused optimizer steps, and grad reduce after a backward that raised (gloo, 2 ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from dist_harness import run_ranks
from moe_cases import assert_close_rel, expert_parameters, make_inputs, make_layers, make_manager, run_layers
from ultraep.planners import make_planner


def _fused_step_worker(rank: int, world_size: int, buffer_layers: int) -> int:
    manager = make_manager(world_size, buffer_layers=buffer_layers)
    (layer,) = make_layers(manager, True, num_layers=1)
    optimizer = torch.optim.SGD(layer.master_weights(), lr=0.5, fused=True)
    x = make_inputs(rank, 32)
    layer(x).pow(2).sum().backward()
    with torch.no_grad():
        layer(x)  # a forward between backward and step caches replicas of the old weights
    optimizer.step()  # a fused step leaves the weights' _version as it was
    with torch.no_grad():
        balanced = layer(x)
        replicas = int(manager.stats[0].num_replicas)
        layer.balance = False
        assert_close_rel(balanced, layer(x), f"rank {rank}: balanced output after a fused step")
    return replicas


@pytest.mark.parametrize("buffer_layers", [0, 1])
def test_fused_optimizer_step_refreshes_cached_replicas(tmp_path, buffer_layers):
    replicas = run_ranks(_fused_step_worker, 2, tmp_path, buffer_layers)
    assert min(replicas) >= 1  # the balanced forward used a replica


def _failed_backward_worker(rank: int, world_size: int) -> None:
    manager = make_manager(world_size, overlap_grad_reduce=True, timeout_s=20)
    reference_manager = make_manager(world_size)
    layers, reference = make_layers(manager, True), make_layers(reference_manager, False)

    def step(model, fail: bool):
        x = make_inputs(rank, 32).requires_grad_(True)
        if fail:
            x.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("hook failed")))
        for weight in expert_parameters(model):
            weight.grad = None
        run_layers(model, x).pow(2).sum().backward()
        return [weight.grad.clone() for weight in expert_parameters(model)]

    for model, owner in ((layers, manager), (reference, reference_manager)):
        with pytest.raises(RuntimeError, match="hook failed"):
            step(model, fail=True)
        owner.release_all()
    for _ in range(2):
        for got, expected in zip(step(layers, False), step(reference, False), strict=True):
            assert_close_rel(got, expected, f"rank {rank}: master gradient after a failed backward")


def test_release_all_clears_failed_backward_reduces(tmp_path):
    run_ranks(_failed_backward_worker, 2, tmp_path)


def _history_planner_worker(rank: int, world_size: int) -> None:
    for name in ("eplb", "lp_reroute"):
        with pytest.raises(TypeError, match="places replicas from a history of past loads"):
            make_manager(world_size, planner=make_planner(name))


def test_manager_rejects_history_based_planners(tmp_path):
    run_ranks(_history_planner_worker, 2, tmp_path)


def _recompute_worker(rank: int, world_size: int) -> None:
    manager = make_manager(world_size)
    layers = make_layers(manager, True)
    x = make_inputs(rank, 32).requires_grad_(True)
    out = torch.utils.checkpoint.checkpoint(lambda t: run_layers(layers, t), x, use_reentrant=False)
    with pytest.raises(RuntimeError, match="was routed again during a backward .* use_reentrant=True"):
        out.pow(2).sum().backward()


def test_non_reentrant_recompute_names_the_cause(tmp_path):
    run_ranks(_recompute_worker, 2, tmp_path)
