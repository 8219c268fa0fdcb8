"""Equivalence: the balanced MoE layer computes the same function and gradients as the unbalanced one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_ranks
from moe_cases import assert_close_rel, expert_parameters, make_inputs, make_layers, make_manager, run_layers


def _train_step(manager, balance: bool, rank: int, num_tokens: int) -> dict:
    """Two MoE layers sharing the manager's buffers: forward, backward, one SGD step."""
    layers = make_layers(manager, balance)
    x = make_inputs(rank, num_tokens).requires_grad_(True)
    out = run_layers(layers, x)
    target = make_inputs(rank, num_tokens, seed=11)
    loss = (out * target).sum()
    loss.backward()
    result = {
        "out": out.detach().clone(),
        "x_grad": x.grad.clone(),
        "expert_grads": [w.grad.clone() for w in expert_parameters(layers)],
        "router_grads": [layer.router_weight.grad.clone() for layer in layers],
        "stats": {layer_id: (s.num_replicas, s.imbalance_before, s.imbalance_after) for layer_id, s in manager.stats.items()},
    }
    params = [p for layer in layers for p in layer.parameters()]
    # Plain SGD by hand: torch.optim's first use imports torch._dynamo, seconds per spawned rank.
    with torch.no_grad():
        for param in params:
            param.add_(param.grad, alpha=-0.1)
    result["params_after_step"] = [p.detach().clone() for p in params]
    result["in_flight"] = manager.in_flight()
    return result


def _equivalence_worker(rank: int, world_size: int, sync_mode: str, redundant_slots_per_rank: int) -> dict:
    manager = make_manager(world_size, redundant_slots_per_rank=redundant_slots_per_rank, sync_mode=sync_mode)
    balanced = _train_step(manager, True, rank, num_tokens=40)
    unbalanced = _train_step(manager, False, rank, num_tokens=40)

    for layer_id, (num_replicas, before, after) in balanced["stats"].items():
        assert num_replicas > 0, f"layer {layer_id}: the skewed routing must create replicas"
        assert after < before, f"layer {layer_id}: imbalance {before} -> {after} did not improve"
    assert balanced["in_flight"] == [] and unbalanced["in_flight"] == []
    assert_close_rel(balanced["out"], unbalanced["out"], "output")
    assert_close_rel(balanced["x_grad"], unbalanced["x_grad"], "input gradient")
    for idx, (a, b) in enumerate(zip(balanced["expert_grads"], unbalanced["expert_grads"], strict=True)):
        assert_close_rel(a, b, f"master gradient {idx}")
    for idx, (a, b) in enumerate(zip(balanced["router_grads"], unbalanced["router_grads"], strict=True)):
        assert_close_rel(a, b, f"router gradient {idx}")
    for idx, (a, b) in enumerate(zip(balanced["params_after_step"], unbalanced["params_after_step"], strict=True)):
        assert_close_rel(a, b, f"parameter {idx} after the optimizer step")
    return balanced["stats"]


@pytest.mark.parametrize(
    ("world_size", "sync_mode", "redundant_slots_per_rank"),
    [
        pytest.param(2, "direct", 1, id="two_ranks_direct"),
        pytest.param(4, "relay", 1, id="four_ranks_relay"),
        pytest.param(4, "auto", 2, id="four_ranks_auto_two_slots"),
    ],
)
def test_balanced_matches_unbalanced(tmp_path, world_size, sync_mode, redundant_slots_per_rank):
    stats = run_ranks(_equivalence_worker, world_size, tmp_path, sync_mode, redundant_slots_per_rank)
    # Stats come from the plans, which every rank computes identically.
    assert all(s == stats[0] for s in stats)


def _pipeline_worker(rank: int, world_size: int) -> None:
    """Two microbatches in flight per layer (forward mb0, forward mb1, backward mb0, backward mb1)."""
    manager = make_manager(world_size, redundant_slots_per_rank=1)
    grads = {}
    for balance in (True, False):
        layers = make_layers(manager, balance)
        outputs = []
        for microbatch_id in (0, 1):
            x = make_inputs(rank, 24 + 8 * microbatch_id, seed=20 + microbatch_id)
            outputs.append(run_layers(layers, x, microbatch_id))
        if balance:
            assert manager.in_flight() == [(0, 0), (0, 1), (1, 0), (1, 1)]
            assert manager.stats[0].num_replicas > 0
        for microbatch_id in (0, 1):
            outputs[microbatch_id].square().sum().backward()
        assert manager.in_flight() == []
        grads[balance] = [w.grad.clone() for w in expert_parameters(layers)]
    for idx, (a, b) in enumerate(zip(grads[True], grads[False], strict=True)):
        assert_close_rel(a, b, f"master gradient {idx} with two microbatches in flight")


def test_pipeline_microbatches_keep_plans(tmp_path):
    run_ranks(_pipeline_worker, 2, tmp_path)


def _buffers_worker(rank: int, world_size: int) -> None:
    """The shared buffers are allocated once: the same storage before and after two training steps."""
    manager = make_manager(world_size, redundant_slots_per_rank=1)
    pointers = [t.data_ptr() for t in (manager.replica_weights, manager.replica_grads, manager.reduce_scratch)]
    layers = make_layers(manager, True)
    for _ in range(2):
        out = run_layers(layers, make_inputs(rank, 32))
        out.sum().backward()
    assert [t.data_ptr() for t in (manager.replica_weights, manager.replica_grads, manager.reduce_scratch)] == pointers
    assert torch.equal(manager.replica_grads, torch.zeros_like(manager.replica_grads))
    dist.barrier()


def test_buffers_allocated_once(tmp_path):
    run_ranks(_buffers_worker, 2, tmp_path)


def _reference_moe(x, router_weight, w_gate, w_up, w_down, topk):
    """Single-process Mixtral-style MoE over all logical experts, written without dispatch."""
    probs, ids = torch.topk(x @ router_weight.T, topk, dim=-1)
    probs = torch.softmax(probs, dim=-1)
    out = torch.zeros_like(x)
    for k in range(topk):
        gate, up, down = w_gate[ids[:, k]], w_up[ids[:, k]], w_down[ids[:, k]]
        # gate, up, down: [num_tokens, ffn, hidden]
        hidden = torch.nn.functional.silu(torch.bmm(x[:, None], gate.transpose(1, 2))) * torch.bmm(x[:, None], up.transpose(1, 2))
        out = out + probs[:, k, None] * torch.bmm(hidden, down)[:, 0]
    return out


def _reference_worker(rank: int, world_size: int) -> None:
    """The distributed balanced layer equals one process running every expert on every rank's tokens:
    gradients are neither lost nor counted twice (scaled by the number of ranks or replicas)."""
    manager = make_manager(world_size, redundant_slots_per_rank=1)
    layer = make_layers(manager, True, num_layers=1)[0]
    num_tokens = [24 + 8 * r for r in range(world_size)]
    inputs = [make_inputs(r, num_tokens[r]) for r in range(world_size)]
    targets = [make_inputs(r, num_tokens[r], seed=5) for r in range(world_size)]

    x = inputs[rank].clone().requires_grad_(True)
    (layer(x) * targets[rank]).sum().backward()
    assert manager.stats[0].num_replicas > 0
    router_grad = layer.router_weight.grad.clone()
    dist.all_reduce(router_grad)  # the router is replicated: its gradient is the sum over ranks

    # Every rank's master weights, gathered outside the manager.
    full = []
    for weight in layer.master_weights():
        parts = [torch.empty_like(weight) for _ in range(world_size)]
        dist.all_gather(parts, weight.detach().contiguous())
        full.append(torch.cat(parts).requires_grad_(True))  # [num_experts, ...]
    router = layer.router_weight.detach().clone().requires_grad_(True)
    ref_inputs = [t.clone().requires_grad_(True) for t in inputs]
    ref_loss = sum((_reference_moe(t, router, *full, topk=2) * g).sum() for t, g in zip(ref_inputs, targets, strict=True))
    ref_loss.backward()

    first = rank * manager.layout.experts_per_rank
    last = first + manager.layout.experts_per_rank
    for idx, (weight, ref) in enumerate(zip(layer.master_weights(), full, strict=True)):
        assert_close_rel(weight.grad, ref.grad[first:last], f"master gradient {idx} against the single-process reference")
    assert_close_rel(x.grad, ref_inputs[rank].grad, "input gradient against the single-process reference")
    assert_close_rel(router_grad, router.grad, "summed router gradient against the single-process reference")


@pytest.mark.parametrize("world_size", [2, 4], ids=["two_ranks", "four_ranks"])
def test_matches_single_process_reference(tmp_path, world_size):
    run_ranks(_reference_worker, world_size, tmp_path)


def _lifecycle_worker(rank: int, world_size: int) -> None:
    """Per-microbatch state is released by whichever phase runs last, in every mode of use."""
    # No redundant slots: the layer runs unbalanced through the same path.
    manager = make_manager(world_size, redundant_slots_per_rank=0)
    layers = make_layers(manager, True)
    run_layers(layers, make_inputs(rank, 16)).sum().backward()
    assert manager.in_flight() == []
    assert all(torch.isfinite(w.grad).all() for w in expert_parameters(layers))

    manager = make_manager(world_size, redundant_slots_per_rank=1)
    layers = make_layers(manager, True)
    # Inference: no backward will come.
    with torch.no_grad():
        run_layers(layers, make_inputs(rank, 16))
    assert manager.in_flight() == []
    # Frozen experts, trainable input: the re-sync runs in backward, grad reduce does not.
    for w in expert_parameters(layers):
        w.requires_grad_(False)
    x = make_inputs(rank, 16).requires_grad_(True)
    run_layers(layers, x).sum().backward()
    assert manager.in_flight() == []
    assert torch.isfinite(x.grad).all()
    for w in expert_parameters(layers):
        w.requires_grad_(True)

    # A forward whose backward never runs keeps its state; reusing the key raises on every rank.
    run_layers(layers, make_inputs(rank, 16))
    assert manager.in_flight() == [(0, 0), (1, 0)]
    with pytest.raises(RuntimeError, match=r"layer 0 microbatch 0 is still in flight on rank \d+: its backward has not run"):
        run_layers(layers, make_inputs(rank, 16))
    manager.release_all()
    run_layers(layers, make_inputs(rank, 16)).sum().backward()
    assert manager.in_flight() == []


def test_state_released_in_every_mode(tmp_path):
    run_ranks(_lifecycle_worker, 2, tmp_path)


def _overlap_equivalence_worker(rank: int, world_size: int, buffer_layers: int) -> dict:
    blocking = make_manager(world_size, redundant_slots_per_rank=1)
    overlapped = make_manager(
        world_size, redundant_slots_per_rank=1, overlap_sync=True, overlap_grad_reduce=True, buffer_layers=buffer_layers,
        record_timings=True,
    )
    reference = _train_step(blocking, True, rank, num_tokens=40)
    unbalanced = _train_step(overlapped, False, rank, num_tokens=40)
    balanced = _train_step(overlapped, True, rank, num_tokens=40)
    assert balanced["in_flight"] == []
    assert overlapped._pending_reduces == []
    # Both layers synced and reduced in the background; the backward's end added the reduced gradients.
    assert sorted(overlapped.timings["sync_wait"]) == [0, 1]
    assert list(overlapped.timings["reduce_wait"]) == [0]
    for other, name in ((reference, "blocking sync and reduce"), (unbalanced, "no balancing")):
        assert_close_rel(balanced["out"], other["out"], f"output against {name}")
        assert_close_rel(balanced["x_grad"], other["x_grad"], f"input gradient against {name}")
        for idx, (a, b) in enumerate(zip(balanced["expert_grads"], other["expert_grads"], strict=True)):
            assert_close_rel(a, b, f"master gradient {idx} against {name}")
        for idx, (a, b) in enumerate(zip(balanced["params_after_step"], other["params_after_step"], strict=True)):
            assert_close_rel(a, b, f"parameter {idx} after the step against {name}")
    assert all(num_replicas > 0 for num_replicas, _, _ in balanced["stats"].values())
    return balanced["stats"]


@pytest.mark.parametrize(("world_size", "buffer_layers"), [(2, 0), (4, 2)], ids=["two_ranks_shared", "four_ranks_layer_buffers"])
def test_overlapped_sync_and_reduce_match_blocking(tmp_path, world_size, buffer_layers):
    stats = run_ranks(_overlap_equivalence_worker, world_size, tmp_path, buffer_layers)
    assert all(s == stats[0] for s in stats)
