"""Weight sync across ranks: relay and direct fill the same slots; cached slots are not copied again."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_harness import run_ranks
from moe_cases import FFN_HIDDEN_SIZE, assert_close_rel, expert_parameters, make_inputs, make_layers, make_manager, run_layers
from ultraep.comm import WeightSpec, chunk_bounds, execute_weight_sync, plan_weight_sync
from ultraep.layout import ExpertLayout

SPEC = WeightSpec(((3, 5), (5, 3), (7,)))


def expert_weights(expert_id: int) -> list[torch.Tensor]:
    """Weights that name their logical expert: weight i of expert e holds e * 1000 + i * 100 + position."""
    return [
        (expert_id * 1000 + idx * 100 + torch.arange(numel, dtype=torch.float32)).view(shape)
        for idx, (shape, numel) in enumerate(zip(SPEC.shapes, SPEC.numels, strict=True))
    ]


def expected_row(expert_id: int) -> torch.Tensor:
    return torch.cat([w.reshape(-1) for w in expert_weights(expert_id)])


def _master_weights(layout: ExpertLayout, rank: int) -> list[torch.Tensor]:
    first = rank * layout.experts_per_rank
    per_expert = [expert_weights(first + j) for j in range(layout.experts_per_rank)]
    return [torch.stack([weights[i] for weights in per_expert]) for i in range(len(SPEC.shapes))]


# 4 ranks, 2 experts per rank, 2 redundant slots per rank. Expert 0 (rank 0) has replicas on ranks
# 1, 2 and 3; expert 3 (rank 1) on ranks 0 and 2; expert 6 (rank 3) on rank 1.
FOUR_RANK_PLACEMENT = [[3, -1], [0, 6], [0, 3], [0, -1]]
TWO_RANK_PLACEMENT = [[2, 3], [0, -1]]


def _sync_worker(rank: int, world_size: int, placement: list[list[int]], num_chunks: int) -> dict:
    layout = ExpertLayout(world_size, 2, 2)
    masters = _master_weights(layout, rank)
    contents = {}
    for mode in ("direct", "relay", "auto"):
        buffer = torch.full((layout.redundant_slots_per_rank, SPEC.numel), float("nan"))
        sync_plan = plan_weight_sync(layout, placement, mode=mode, num_chunks=num_chunks)
        execute_weight_sync(sync_plan, layout=layout, spec=SPEC, rank=rank, master_weights=masters, replica_buffer=buffer)
        for idx, expert_id in enumerate(placement[rank]):
            if expert_id >= 0:
                assert torch.equal(buffer[idx], expected_row(expert_id)), f"{mode}: slot {idx} of rank {rank}"
            else:
                assert torch.isnan(buffer[idx]).all(), f"{mode}: empty slot {idx} of rank {rank} was written"
        contents[mode] = (buffer.nan_to_num(-1.0), sync_plan.relay_expert_ids, sync_plan.copies_sent_per_rank())
    return contents


@pytest.mark.parametrize(
    ("world_size", "placement", "num_chunks"),
    [
        pytest.param(2, TWO_RANK_PLACEMENT, 3, id="two_ranks"),
        pytest.param(4, FOUR_RANK_PLACEMENT, 4, id="four_ranks_fan_out"),
        pytest.param(4, FOUR_RANK_PLACEMENT, 50, id="four_ranks_more_chunks_than_elements"),
    ],
)
def test_relay_and_direct_fill_same_slots(tmp_path, world_size, placement, num_chunks):
    results = run_ranks(_sync_worker, world_size, tmp_path, placement, num_chunks)
    for rank, contents in enumerate(results):
        assert torch.equal(contents["relay"][0], contents["direct"][0]), f"rank {rank}"
        assert torch.equal(contents["auto"][0], contents["direct"][0]), f"rank {rank}"
    if world_size == 4:
        # relay: both experts with several receivers go through relays. auto: only expert 0, whose
        # master rank would send 3 copies while no rank receives more than 2.
        assert results[0]["relay"][1] == (0, 3)
        assert results[0]["auto"][1] == (0,)
        assert results[0]["relay"][2][0] < results[0]["direct"][2][0]
        assert results[0]["auto"][2][0] < results[0]["direct"][2][0]


def _skewed_topk(rank: int, num_tokens: int) -> torch.Tensor:
    """Every token picks experts 0 and 1 (both on rank 0), so replicas are needed."""
    return torch.tensor([[0, 1]] * num_tokens, dtype=torch.int64)


def _cache_worker(rank: int, world_size: int) -> None:
    manager = make_manager(world_size, redundant_slots_per_rank=1)
    layers = make_layers(manager, True, num_layers=2)
    weights = [layer.master_weights() for layer in layers]

    def forward(layer_id: int) -> int:
        with torch.no_grad():
            routing = manager.route(layer_id, 0, _skewed_topk(rank, 16), weights[layer_id])
            replicas = manager.replicate(routing)
            manager.resync_on_backward(routing, torch.zeros(0))
        assert manager.in_flight() == []
        # Every replica holds its expert's current master weights, wherever the master lives.
        rows = manager.slot_weights(layer_id)
        for idx, expert_id in enumerate(routing.plan.replica_expert_ids[rank].tolist()):
            if expert_id >= 0:
                assert replicas[0].shape[0] == manager.layout.redundant_slots_per_rank
                assert torch.isfinite(rows[idx]).all()
        return manager.stats[layer_id].forward_sync_bytes

    first = forward(0)
    assert first > 0, "the first sync must copy"
    assert forward(0) == 0, "same layer, same placement, same weights: nothing to copy"
    assert forward(1) > 0, "another layer's weights must be copied into the shared slots"
    assert forward(0) == first, "layer 0 must be copied again after layer 1 used the slots"

    # An in-place update visible to autograd changes the version.
    with torch.no_grad():
        if rank == 0:
            layers[0].w_up.mul_(0.5)
    assert forward(0) == first
    # A write autograd cannot see needs invalidate_cached_weights on every rank.
    if rank == 0:
        layers[0].w_up.data.mul_(2.0)
    assert forward(0) == 0
    manager.invalidate_cached_weights()
    assert forward(0) == first


def test_cached_slots_skip_copies(tmp_path):
    run_ranks(_cache_worker, 2, tmp_path)


def _resync_worker(rank: int, world_size: int) -> dict:
    manager = make_manager(world_size, redundant_slots_per_rank=1)
    layers = make_layers(manager, True, num_layers=2)
    out = run_layers(layers, make_inputs(rank, 32))
    out.sum().backward()
    # Layer 1 ran last, so its slots still hold its weights at its backward; layer 0 must re-sync.
    assert manager.stats[1].num_replicas > 0 and manager.stats[0].num_replicas > 0
    assert manager.stats[1].backward_sync_bytes == 0
    assert manager.stats[0].backward_sync_bytes == manager.stats[0].forward_sync_bytes > 0
    # Gradients were accumulated into the masters, so the next forward copies again.
    layers[0](make_inputs(rank, 32)).sum().backward()
    assert manager.stats[0].forward_sync_bytes > 0
    return {layer_id: s.forward_sync_bytes for layer_id, s in manager.stats.items()}


def test_backward_resyncs_only_reused_slots(tmp_path):
    run_ranks(_resync_worker, 2, tmp_path)


def _layer_buffers_worker(rank: int, world_size: int) -> dict:
    shared = make_manager(world_size, redundant_slots_per_rank=1)
    per_layer = make_manager(world_size, redundant_slots_per_rank=1, buffer_layers=2)
    assert per_layer.replica_weights.shape[:2] == (2, 1)
    assert per_layer.extra_memory_bytes - shared.extra_memory_bytes == shared.slot_weights(0).numel() * 4
    results = {}
    for name, manager in (("shared", shared), ("per_layer", per_layer)):
        layers = make_layers(manager, True, num_layers=2)
        x = make_inputs(rank, 32).requires_grad_(True)
        out = run_layers(layers, x)
        out.sum().backward()
        results[name] = {
            "out": out.detach(),
            "x_grad": x.grad,
            "expert_grads": [w.grad.clone() for w in expert_parameters(layers)],
            "stats": {i: (s.forward_sync_bytes, s.backward_sync_bytes) for i, s in manager.stats.items()},
        }
        if name == "per_layer":
            with torch.no_grad():
                # The gradients changed the weight versions, so this forward copies every replica.
                run_layers(layers, make_inputs(rank, 32))
                results["after_backward"] = {i: s.forward_sync_bytes for i, s in manager.stats.items()}
                # Same inputs, same plans, unchanged weights: every slot already holds its copy.
                run_layers(layers, make_inputs(rank, 32))
                results["inference_again"] = {i: s.forward_sync_bytes for i, s in manager.stats.items()}
            with pytest.raises(ValueError, match="layer_id=2 has no buffer set: ManagerConfig.buffer_layers=2"):
                manager._check_call(2, 0, make_inputs(rank, 4), layers[0].master_weights())
    assert torch.equal(results["shared"]["out"], results["per_layer"]["out"])
    assert torch.equal(results["shared"]["x_grad"], results["per_layer"]["x_grad"])
    for a, b in zip(results["shared"]["expert_grads"], results["per_layer"]["expert_grads"], strict=True):
        assert torch.equal(a, b)
    return results


def test_per_layer_buffers_skip_backward_resync(tmp_path):
    results = run_ranks(_layer_buffers_worker, 2, tmp_path)
    for rank_result in results:
        shared, per_layer = rank_result["shared"]["stats"], rank_result["per_layer"]["stats"]
        # Shared buffers: layer 0 re-syncs in the backward. Per-layer buffers: nothing is re-synced.
        assert shared[0][1] == shared[0][0] > 0
        assert per_layer[0] == (shared[0][0], 0)
        assert per_layer[1] == (shared[1][0], 0)
        assert rank_result["after_backward"] == {0: shared[0][0], 1: shared[1][0]}
        assert rank_result["inference_again"] == {0: 0, 1: 0}


def _overlap_worker(rank: int, world_size: int, sync_mode: str) -> dict:
    results = {}
    for overlap in (False, True):
        manager = make_manager(world_size, redundant_slots_per_rank=1, sync_mode=sync_mode, overlap_sync=overlap, record_timings=True)
        assert (manager.sync_group is not None) == overlap
        layers = make_layers(manager, True, num_layers=2)
        x = make_inputs(rank, 32).requires_grad_(True)
        out = run_layers(layers, x)
        out.sum().backward()
        assert manager.in_flight() == []
        results[overlap] = {
            "out": out.detach(),
            "x_grad": x.grad,
            "expert_grads": [w.grad.clone() for w in expert_parameters(layers)],
            "stats": {i: (s.num_replicas, s.forward_sync_bytes, s.backward_sync_bytes) for i, s in manager.stats.items()},
            "waited": sorted(manager.timings.get("sync_wait", {})),
        }
        if overlap:
            # A sync left running is finished by the next call that needs the slots.
            with torch.no_grad():
                routing = manager.route(0, 5, torch.tensor([[0, 1]] * 8), layers[0].master_weights())
                manager.replicate(routing)
                other = dataclasses.replace(routing, microbatch_id=6)
                with pytest.raises(RuntimeError, match="the sync in flight is for layer 0 microbatch 5"):
                    manager.wait_replicas(other)
                manager.release(0, 5)
                assert manager._pending_sync is None
    assert results[False]["waited"] == []
    assert results[True]["waited"] == [0, 1]
    assert results[True]["stats"] == results[False]["stats"]
    assert torch.equal(results[True]["out"], results[False]["out"])
    assert torch.equal(results[True]["x_grad"], results[False]["x_grad"])
    for a, b in zip(results[True]["expert_grads"], results[False]["expert_grads"], strict=True):
        assert torch.equal(a, b)
    return results[True]["stats"]


@pytest.mark.parametrize(("world_size", "sync_mode"), [(2, "direct"), (4, "relay")], ids=["two_ranks_direct", "four_ranks_relay"])
def test_overlapped_sync_matches_blocking_sync(tmp_path, world_size, sync_mode):
    stats = run_ranks(_overlap_worker, world_size, tmp_path, sync_mode)
    assert all(s == stats[0] for s in stats)
    assert stats[0][0][0] > 0, "the skewed routing must create replicas"


def _pipeline_worker(rank: int, world_size: int, sync_mode: str) -> dict:
    blocking = make_manager(world_size, redundant_slots_per_rank=1, sync_mode=sync_mode)
    pipelined = make_manager(
        world_size, redundant_slots_per_rank=1, sync_mode=sync_mode, overlap_sync=True, pipeline_replicas=True,
        num_chunks=3, record_timings=True,
    )
    assert (blocking.replica_chunks, pipelined.replica_chunks) == (1, 3)
    results = {}
    for name, manager in (("blocking", blocking), ("pipelined", pipelined)):
        layers = make_layers(manager, True, num_layers=2)
        x = make_inputs(rank, 32).requires_grad_(True)
        out = run_layers(layers, x)
        out.sum().backward()
        assert manager.in_flight() == []
        results[name] = {
            "out": out.detach(),
            "x_grad": x.grad,
            "expert_grads": [w.grad.clone() for w in expert_parameters(layers)],
            "stats": {i: (s.num_replicas, s.forward_sync_bytes, s.backward_sync_bytes) for i, s in manager.stats.items()},
        }
    # The same replicas and bytes; the chunked replica compute sums per-chunk outputs, so values agree to rounding.
    assert results["pipelined"]["stats"] == results["blocking"]["stats"]
    assert sorted(pipelined.timings["sync_wait"]) == [0, 1]
    # The chunk waits of one forward add up to one entry per layer.
    assert [len(pipelined.timings["sync_wait"][layer]) for layer in (0, 1)] == [1, 1]
    assert_close_rel(results["pipelined"]["out"], results["blocking"]["out"], "output")
    assert_close_rel(results["pipelined"]["x_grad"], results["blocking"]["x_grad"], "input gradient")
    for idx, (a, b) in enumerate(zip(results["pipelined"]["expert_grads"], results["blocking"]["expert_grads"], strict=True)):
        assert_close_rel(a, b, f"master gradient {idx}")

    # A chunk read right after its wait already holds its final rows: the wait does not return early.
    layer = make_layers(pipelined, True, num_layers=1)[0]
    pipelined.invalidate_cached_weights()
    pipelined.replica_weights.fill_(float("nan"))
    with torch.no_grad():
        routing = pipelined.route(0, 7, torch.tensor([[0, 1]] * 16), layer.master_weights())
        views = pipelined.replicate(routing)
        seen = []
        for chunk in range(pipelined.replica_chunks):
            pipelined.wait_replicas(routing, chunk=chunk)
            seen.append([v[:, slice(*chunk_bounds(FFN_HIDDEN_SIZE, chunk, 3))].clone() for v in views])
        with pytest.raises(ValueError, match=r"chunk must be None or an int in \[0, 2\] \(replica_chunks\), got 3"):
            pipelined.wait_replicas(routing, chunk=3)
        pipelined.wait_replicas(routing)
        filled = routing.plan.replica_expert_ids[rank].tolist() != [-1]
        for chunk, rows in enumerate(seen):
            for view, early in zip(views, rows, strict=True):
                final = view[:, slice(*chunk_bounds(FFN_HIDDEN_SIZE, chunk, 3))]
                if filled:
                    assert torch.isfinite(early).all(), f"chunk {chunk} was read before it arrived"
                    assert torch.equal(early, final)
        pipelined.release(0, 7)
    return {"stats": results["pipelined"]["stats"], "filled": filled}


@pytest.mark.parametrize(("world_size", "sync_mode"), [(2, "direct"), (4, "relay")], ids=["two_ranks_direct", "four_ranks_relay"])
def test_pipelined_replicas_match_blocking_sync(tmp_path, world_size, sync_mode):
    results = run_ranks(_pipeline_worker, world_size, tmp_path, sync_mode)
    assert all(r["stats"] == results[0]["stats"] for r in results)
    assert results[0]["stats"][0][0] > 0, "the skewed routing must create replicas"
    assert any(r["filled"] for r in results), "some rank must receive a replica in the chunk check"


def _pipeline_cached_worker(rank: int, world_size: int) -> dict:
    """Pipelined inference with per-layer buffers: the repeat forward finds every replica in place."""
    blocking = make_manager(world_size, redundant_slots_per_rank=2, buffer_layers=2)
    pipelined = make_manager(
        world_size, redundant_slots_per_rank=2, buffer_layers=2, overlap_sync=True, pipeline_replicas=True, num_chunks=3
    )
    outputs, moved = {}, {}
    with torch.no_grad():
        for name, manager in (("blocking", blocking), ("pipelined", pipelined)):
            layers = make_layers(manager, True, num_layers=2)
            first = run_layers(layers, make_inputs(rank, 32))
            first_bytes = {i: s.forward_sync_bytes for i, s in manager.stats.items()}
            again = run_layers(layers, make_inputs(rank, 32))
            moved[name] = (first_bytes, {i: s.forward_sync_bytes for i, s in manager.stats.items()})
            assert torch.equal(first, again), f"{name}: a forward without copies must give the same output"
            outputs[name] = again
    assert_close_rel(outputs["pipelined"], outputs["blocking"], "output")
    assert moved["pipelined"] == moved["blocking"]
    return moved["pipelined"]


def test_pipelined_replicas_reuse_cached_slots(tmp_path):
    results = run_ranks(_pipeline_cached_worker, 2, tmp_path)
    first, again = results[0]
    assert all(first[layer] > 0 for layer in (0, 1)), "the skewed routing must copy replicas in the first forward"
    assert again == {0: 0, 1: 0}


def _slot_cache_worker(rank: int, world_size: int, reuse: bool) -> dict:
    """Two alternating microbatches put replicas of different experts on rank 1; two slots hold both."""
    manager = make_manager(world_size, experts_per_rank=2, redundant_slots_per_rank=2, buffer_layers=1, reuse_cached_weights=reuse)
    layer = make_layers(manager, True, num_layers=1)[0]
    hot_expert_0 = torch.zeros(32, 1, dtype=torch.int64)  # every token to expert 0 (rank 0)
    hot_expert_1 = torch.ones(32, 1, dtype=torch.int64)  # every token to expert 1 (rank 0)
    rows, moved, first_seen = [], [], {}
    manager.replica_weights.fill_(float("nan"))
    with torch.no_grad():
        for microbatch_id, topk_ids in enumerate((hot_expert_0, hot_expert_1, hot_expert_0, hot_expert_1)):
            routing = manager.route(0, microbatch_id, topk_ids, layer.master_weights())
            views = manager.replicate(routing)
            rows.append(routing.plan.replica_expert_ids[1].tolist())
            moved.append(manager.stats[0].forward_sync_bytes)
            if rank == 1:
                # The slot holds the expert's weights, whether copied now or kept from before.
                expert = int(topk_ids[0, 0])
                weights = [view[rows[-1].index(expert)].clone() for view in views]
                assert all(torch.isfinite(w).all() for w in weights)
                for now, before in zip(weights, first_seen.setdefault(expert, weights), strict=True):
                    assert torch.equal(now, before)
            manager.release(0, microbatch_id)
    return {"rows": rows, "moved": moved}


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no_reuse"])
def test_replicas_return_to_the_slots_that_hold_them(tmp_path, reuse):
    results = run_ranks(_slot_cache_worker, 2, tmp_path, reuse)
    rows, moved = results[0]["rows"], results[0]["moved"]
    assert all(r == results[0] for r in results)
    copy_bytes = moved[0]
    assert copy_bytes > 0
    if reuse:
        # Expert 0 takes slot 0, expert 1 the unused slot 1, and both stay: the repeats copy nothing.
        assert rows == [[0, -1], [-1, 1], [0, -1], [-1, 1]]
        assert moved == [copy_bytes, copy_bytes, 0, 0]
    else:
        # Without the cache every replica takes slot 0 and every microbatch copies.
        assert rows == [[0, -1], [1, -1], [0, -1], [1, -1]]
        assert moved == [copy_bytes] * 4


def _resident_worker(rank: int, world_size: int, plan_with_resident: bool) -> dict:
    """Expert 0 stays hot for six microbatches while the cold experts' loads shift; a copy costs 150 assignments."""
    from ultraep.planners.quota import QuotaPlanner

    planner = QuotaPlanner(copy_cost=150)
    manager = make_manager(
        world_size, experts_per_rank=1, redundant_slots_per_rank=1, planner=planner, buffer_layers=1,
        plan_with_resident=plan_with_resident,
    )
    layer = make_layers(manager, True, num_layers=1)[0]
    manager.replica_weights.fill_(float("nan"))
    cold = [[100, 100, 100], [130, 100, 70], [100, 70, 130], [70, 130, 100], [130, 70, 100], [100, 100, 100]]
    rows, moved = [], []
    with torch.no_grad():
        for microbatch_id, counts in enumerate(cold):
            # Rank 0 produces every token: 400 for expert 0, then the cold counts for experts 1 to 3.
            ids = torch.repeat_interleave(torch.arange(4), torch.tensor([400, *counts]))[:, None]
            topk_ids = ids if rank == 0 else torch.zeros(0, 1, dtype=torch.int64)
            routing = manager.route(0, microbatch_id, topk_ids, layer.master_weights())
            views = manager.replicate(routing)
            rows.append(routing.plan.replica_expert_ids[:, 0].tolist())
            moved.append(manager.stats[0].forward_sync_bytes)
            # A replica's slot holds weights, copied now or kept from before (the buffers start as NaN).
            if routing.plan.replica_expert_ids[rank, 0].item() >= 0:
                assert all(torch.isfinite(view[0]).all() for view in views)
            manager.release(0, microbatch_id)
    return {"rows": rows, "moved": moved}


@pytest.mark.parametrize("plan_with_resident", [False, True], ids=["plain", "resident"])
def test_resident_planning_keeps_hot_expert(tmp_path, plan_with_resident):
    results = run_ranks(_resident_worker, 4, tmp_path, plan_with_resident)
    assert all(r == results[0] for r in results)
    rows, moved = results[0]["rows"], results[0]["moved"]
    copy_bytes = moved[0] // 2
    assert moved[0] == 2 * copy_bytes > 0, "the first microbatch copies expert 0 to two ranks"
    if plan_with_resident:
        # Expert 0 stays on the two ranks that hold it, and nothing is copied again.
        assert all(row == rows[0] for row in rows)
        assert moved[1:] == [0] * 5
    else:
        # The plain planner moves a replica to a rank whose slot holds nothing and copies it there.
        assert rows[1] != rows[0]
        assert moved[1] == copy_bytes
