"""Argument errors of the manager and the MoE layer, each with the message users see."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks
from moe_cases import FFN_HIDDEN_SIZE, HIDDEN_SIZE, make_inputs, make_layers, make_manager
from ultraep.layout import ExpertLayout
from ultraep.planners.registry import make_planner
from ultraep.runtime import ManagerConfig, MoELayer, RankAgreementError, ReplicaManager, swiglu_weight_shapes


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        pytest.param({"sync_mode": "tree"}, r"sync_mode must be one of \('direct', 'relay', 'auto'\), got 'tree'", id="sync_mode"),
        pytest.param({"num_chunks": 0}, r"num_chunks must be an int in \[1, 1024\], got 0", id="num_chunks"),
        pytest.param({"num_chunks": 1025}, r"num_chunks must be an int in \[1, 1024\], got 1025", id="num_chunks_too_many"),
        pytest.param({"timeout_s": 0}, r"timeout_s must be None or a number of seconds in \(0, 1e\+09\], got 0", id="timeout"),
        pytest.param({"timeout_s": True}, r"timeout_s must be None or a number of seconds .*got True", id="timeout_bool"),
        pytest.param({"timeout_s": "5"}, r"timeout_s must be None or a number of seconds .*got '5'", id="timeout_str"),
        pytest.param({"timeout_s": float("inf")}, r"timeout_s must be None or a number of seconds .*got inf", id="timeout_inf"),
        pytest.param({"buffer_layers": -1}, r"buffer_layers must be an int >= 0 .*got -1", id="buffer_layers"),
        pytest.param({"buffer_layers": True}, r"buffer_layers must be an int >= 0 .*got True", id="buffer_layers_bool"),
        pytest.param({"pipeline_replicas": True}, r"pipeline_replicas=True needs overlap_sync=True", id="pipeline_without_overlap"),
        pytest.param(
            {"pipeline_replicas": True, "overlap_sync": True, "num_chunks": 1},
            r"pipeline_replicas=True needs num_chunks >= 2 to split the copies, got num_chunks=1", id="pipeline_one_chunk",
        ),
        pytest.param(
            {"plan_with_resident": True, "reuse_cached_weights": False},
            r"plan_with_resident=True needs reuse_cached_weights=True", id="resident_without_reuse",
        ),
    ],
)
def test_manager_config_rejects_bad_values(settings, match):
    with pytest.raises(ValueError, match=match):
        ManagerConfig(**settings)


@pytest.mark.parametrize(
    "name",
    ["overlap_sync", "overlap_grad_reduce", "pipeline_replicas", "reuse_cached_weights", "plan_with_resident", "check_plans", "check_values", "record_timings"],
)
def test_manager_config_rejects_non_bool_switches(name):
    with pytest.raises(TypeError, match=f"ManagerConfig.{name} must be a bool, got 'yes'"):
        ManagerConfig(**{name: "yes"})


def test_manager_requires_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ReplicaManager(ExpertLayout(2, 2, 1), swiglu_weight_shapes(4, 8))


def _argument_worker(rank: int, world_size: int) -> None:
    shapes = swiglu_weight_shapes(HIDDEN_SIZE, FFN_HIDDEN_SIZE)
    with pytest.raises(ValueError, match=r"layout.num_ranks=4 but the process group has 2 ranks"):
        ReplicaManager(ExpertLayout(4, 2, 1), shapes)
    with pytest.raises(TypeError, match="layout must be an ExpertLayout"):
        ReplicaManager((2, 2, 1), shapes)
    with pytest.raises(TypeError, match="dtype must be a floating point torch.dtype"):
        ReplicaManager(ExpertLayout(2, 2, 1), shapes, dtype=torch.int64)
    with pytest.raises(ValueError, match="plan_with_resident=True needs a QuotaPlanner, .* got PairingPlanner"):
        ReplicaManager(ExpertLayout(2, 2, 1), shapes, planner=make_planner("pairing"), config=ManagerConfig(plan_with_resident=True))
    with pytest.raises(TypeError, match="planner must be a Planner instance such as QuotaPlanner"):
        ReplicaManager(ExpertLayout(2, 2, 1), shapes, planner="quota")
    with pytest.raises(TypeError, match="config must be a ManagerConfig, got dict"):
        ReplicaManager(ExpertLayout(2, 2, 1), shapes, config={"check_plans": False})
    with pytest.raises(TypeError, match="weight_shapes must be a sequence of shapes"):
        ReplicaManager(ExpertLayout(2, 2, 1), [4])

    manager = make_manager(world_size, redundant_slots_per_rank=1)
    with pytest.raises(ValueError, match=r"do not match a SwiGLU expert with hidden_size=8"):
        MoELayer(manager, 0, 8, FFN_HIDDEN_SIZE)
    with pytest.raises(ValueError, match=r"topk must be an int in \[1, num_experts=4\], got 5"):
        MoELayer(manager, 0, HIDDEN_SIZE, FFN_HIDDEN_SIZE, topk=5)
    layer = make_layers(manager, True, num_layers=1)[0]
    with pytest.raises(ValueError, match=r"hidden_states must end in hidden_size=16, got shape \[3, 5\]"):
        layer(torch.zeros(3, 5))

    # Input errors of route() are raised on every rank (here every rank makes the same mistake).
    topk_ids = torch.zeros(4, 2, dtype=torch.int64)
    weights = layer.master_weights()
    with pytest.raises(ValueError, match="layer_id must be an int >= 0, got -1"):
        manager.route(-1, 0, topk_ids, weights)
    with pytest.raises(TypeError, match="topk_ids must be a torch.Tensor, got list"):
        manager.route(0, 0, [[0, 1]], weights)
    with pytest.raises(TypeError, match="master_weights are torch.float64 on cpu but the manager's buffers are torch.float32"):
        manager.route(0, 0, topk_ids, [w.double() for w in weights])
    with pytest.raises(ValueError, match=r"master_weights has 2 tensors but the weight spec has 3"):
        manager.route(0, 0, topk_ids, weights[:2])
    routing = manager.route(0, 0, topk_ids, weights)
    manager.release(0, 0)
    assert manager.in_flight() == []
    with pytest.raises(RuntimeError, match="replicate: layer 0 microbatch 0 is not in flight on rank"):
        manager.replicate(routing)


def test_manager_and_layer_reject_bad_arguments(tmp_path):
    run_ranks(_argument_worker, 2, tmp_path)


def _cache_record_worker(rank: int, world_size: int) -> str:
    manager = make_manager(world_size, redundant_slots_per_rank=1)
    layer = make_layers(manager, True, num_layers=1)[0]
    if rank == 1:
        manager._held[0][0][0] = (5, 0, 0)  # a corrupted record of what rank 0's redundant slot contains
    try:
        layer(make_inputs(rank, 8))
    except RankAgreementError as err:
        return str(err)
    raise AssertionError(f"rank {rank} raised nothing")


def test_diverged_slot_record_raises_everywhere(tmp_path):
    messages = run_ranks(_cache_record_worker, 2, tmp_path)
    for message in messages:
        assert "record of which expert each redundant slot holds differs" in message
        assert "invalidate_cached_weights()" in message


def test_manager_warns_when_the_planner_assumes_another_weight_sync(caplog):
    from ultraep.planners import QuotaPlanner
    from ultraep.runtime.manager import _warn_on_copy_model_mismatch

    pipelined = ManagerConfig(overlap_sync=True, pipeline_replicas=True, num_chunks=8)
    with caplog.at_level("WARNING", logger="ultraep.runtime.manager"):
        _warn_on_copy_model_mismatch(QuotaPlanner(copy_cost=100), pipelined)
    assert "build the planner with QuotaConfig(copy_overlap=True, copy_chunks=8)" in caplog.text
    assert "QuotaConfig(relay_chunks=8)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ultraep.runtime.manager"):
        matching = QuotaPlanner(copy_cost=100, copy_overlap=True, copy_chunks=8, relay_chunks=8)
        _warn_on_copy_model_mismatch(matching, pipelined)
        _warn_on_copy_model_mismatch(QuotaPlanner(), pipelined)  # copies counted as free: nothing to match
        # Direct copies are modelled with relay_chunks=0.
        _warn_on_copy_model_mismatch(QuotaPlanner(copy_cost=100, relay_chunks=0), ManagerConfig(sync_mode="direct"))
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="ultraep.runtime.manager"):
        _warn_on_copy_model_mismatch(QuotaPlanner(copy_cost=100), ManagerConfig(sync_mode="direct"))
    assert "QuotaConfig(relay_chunks=0)" in caplog.text
