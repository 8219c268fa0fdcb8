"""Safety: empty microbatches, ranks that disagree, bad input on one rank and timeouts raise on every rank."""

from __future__ import annotations

import re
import time

import pytest
import torch

from dist_harness import run_ranks
from moe_cases import (
    assert_close_rel,
    expert_parameters,
    make_inputs,
    make_layers,
    make_manager,
    run_layers,
)
from ultraep.comm import CommunicationError
from ultraep.layout import ExpertLayout
from ultraep.plan import Plan
from ultraep.planners import QuotaPlanner, masters_only_plan
from ultraep.runtime import RankAgreementError


def _empty_worker(rank: int, world_size: int, empty_ranks: tuple[int, ...]) -> None:
    manager = make_manager(world_size, redundant_slots_per_rank=1)
    num_tokens = 0 if rank in empty_ranks else 32
    results = {}
    for balance in (True, False):
        layers = make_layers(manager, balance)
        x = make_inputs(rank, num_tokens).requires_grad_(True)
        out = run_layers(layers, x)
        (out * 1.5).sum().backward()
        assert out.shape == (num_tokens, x.shape[1])
        results[balance] = [out.detach(), x.grad] + [w.grad.clone() for w in expert_parameters(layers)]
        assert manager.in_flight() == []
    if len(empty_ranks) < world_size:
        assert manager.stats[0].num_replicas >= 0
    for idx, (a, b) in enumerate(zip(results[True], results[False], strict=True)):
        assert_close_rel(a, b, f"tensor {idx}")


@pytest.mark.parametrize(
    ("world_size", "empty_ranks"),
    [
        pytest.param(2, (1,), id="two_ranks_one_empty"),
        pytest.param(4, (0, 2), id="four_ranks_two_empty"),
        pytest.param(2, (0, 1), id="two_ranks_all_empty"),
    ],
)
def test_empty_microbatch_on_some_ranks(tmp_path, world_size, empty_ranks):
    run_ranks(_empty_worker, world_size, tmp_path, empty_ranks)


class DivergentPlanner(QuotaPlanner):
    """Plans like QuotaPlanner except on rank 1, where it returns the masters-only plan: a broken planner."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def plan(self, loads: torch.Tensor, layout: ExpertLayout) -> Plan:
        return masters_only_plan(loads, layout) if self.rank == 1 else super().plan(loads, layout)


def _expect_agreement_error(rank: int, world_size: int, case: str) -> str:
    """Run one disagreement case; every rank must raise, and return its message."""
    config = {"sync_mode": "direct" if (case == "config" and rank == 1) else "auto"}
    planner = DivergentPlanner(rank) if case == "plan" else None
    manager = make_manager(world_size, redundant_slots_per_rank=1, planner=planner, **config)
    layers = make_layers(manager, True, num_layers=2)
    x = make_inputs(rank, 32)
    layer = layers[1] if (case == "layer_order" and rank == 1) else layers[0]

    if case == "load_matrix" and rank == 1:
        # A corrupted copy of the gathered load matrix on rank 1 only.
        real_gather = manager._all_gather

        def corrupted(payload, description):
            gathered = real_gather(payload, description)
            if description.startswith("load all-gather"):
                gathered[0, 0] += 5
            return gathered

        manager._all_gather = corrupted
    if case == "topk_ids" and rank == 1:
        real_route = manager.route

        def bad_route(layer_id, microbatch_id, topk_ids, master_weights, **kwargs):
            return real_route(layer_id, microbatch_id, topk_ids + manager.layout.num_experts, master_weights, **kwargs)

        manager.route = bad_route

    try:
        layer(x)
    except (RankAgreementError, ValueError) as err:
        return f"{type(err).__name__}: {err} {' '.join(getattr(err, '__notes__', []))}"
    raise AssertionError(f"rank {rank}: case {case!r} raised nothing")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param("plan", r"the plan differs on ranks \[1\] from ranks \[0, 2, 3\]", id="different_plan"),
        pytest.param("load_matrix", r"the load matrix differs on ranks \[1\] from ranks \[0, 2, 3\]", id="different_load_matrix"),
        pytest.param("config", r"manager configuration .* differs: ranks \[1\] differ from ranks \[0, 2, 3\]", id="different_config"),
        pytest.param("layer_order", r"different layers, microbatches .*: ranks \[1\] differ", id="different_layer"),
    ],
)
def test_disagreeing_rank_raises_everywhere(tmp_path, case, expected):
    messages = run_ranks(_expect_agreement_error, 4, tmp_path, case)
    for rank, message in enumerate(messages):
        assert message.startswith("RankAgreementError"), f"rank {rank}: {message}"
        assert "layer 0 microbatch 0" in message or case == "layer_order", f"rank {rank}: {message}"
        assert re.search(expected, message), f"rank {rank}: {message}"


def test_invalid_topk_ids_on_one_rank_raises_everywhere(tmp_path):
    messages = run_ranks(_expect_agreement_error, 2, tmp_path, "topk_ids")
    assert messages[1].startswith("ValueError: topk_ids")
    assert "ranks [1] rejected their input for layer 0 microbatch 0" in messages[1]
    assert messages[0].startswith("RankAgreementError: ranks [1] rejected their input for layer 0 microbatch 0")


def _timeout_worker(rank: int, world_size: int, skip: str, linger_s: float, config: dict | None = None) -> str:
    """Rank 1 skips a phase and stays alive for ``linger_s`` seconds (0: exits at once, closing its connections)."""
    manager = make_manager(world_size, redundant_slots_per_rank=1, timeout_s=1.0, **(config or {}))
    layer = make_layers(manager, True, num_layers=1)[0]
    topk_ids = torch.tensor([[2, 3]] * 16)  # experts 2 and 3 live on rank 1; rank 0 gets a replica
    if rank == 1:
        if skip == "sync":
            with torch.no_grad():
                manager.route(0, 0, topk_ids, layer.master_weights())
        time.sleep(linger_s)
        return "skipped"
    try:
        with torch.no_grad():
            routing = manager.route(0, 0, topk_ids, layer.master_weights())
            assert routing.plan.replica_expert_ids[0].tolist() != [-1]
            manager.replicate(routing)
            if manager.replica_chunks > 1:
                manager.wait_replicas(routing, chunk=0)
    except CommunicationError as err:
        return str(err)
    raise AssertionError("rank 0 did not time out")


@pytest.mark.parametrize(
    ("skip", "linger_s", "expected"),
    [
        pytest.param(
            "sync", 4.0, "weight sync (forward) of layer 0 microbatch 0, step 1 of 1 failed on rank 0 while "
            "exchanging data with ranks [1]: ", id="weight_sync_timeout",
        ),
        pytest.param(
            "sync", 0.0, "weight sync (forward) of layer 0 microbatch 0, step 1 of 1 failed on rank 0 while "
            "exchanging data with ranks [1]: ", id="weight_sync_peer_gone",
        ),
        pytest.param(
            "route", 4.0, "load all-gather of layer 0 microbatch 0 failed on rank 0 while exchanging data with "
            "ranks [1]: ", id="all_gather_timeout",
        ),
    ],
)
def test_timeout_names_layer_and_ranks(tmp_path, skip, linger_s, expected):
    results = run_ranks(_timeout_worker, 2, tmp_path, skip, linger_s, group_timeout_s=10.0)
    assert expected in results[0], results[0]
    if linger_s:
        assert "Timed out" in results[0] or "timed out" in results[0], results[0]


def test_pipelined_sync_failure_reaches_a_chunk_wait(tmp_path):
    results = run_ranks(
        _timeout_worker, 2, tmp_path, "sync", 0.0, {"overlap_sync": True, "pipeline_replicas": True, "num_chunks": 2},
        group_timeout_s=10.0,
    )
    expected = "weight sync (forward) of layer 0 microbatch 0, step 1 of 2 failed on rank 0 while exchanging data with ranks [1]: "
    assert expected in results[0], results[0]
