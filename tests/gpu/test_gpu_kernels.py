"""Compiled Triton kernels on a CUDA GPU: bit-identical to the references, no host sync, CUDA-graph capture.

Run: ``.venv/bin/python -m pytest tests/gpu -m gpu``. Every test skips without a CUDA device, without
Triton, or when ``TRITON_INTERPRET`` is set (the kernels would then not be compiled). The first call
of each layout compiles its kernels, which takes seconds per layout.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from ultraep.kernels import count_load, plan_quota, reroute_ids, resolve_backend
from ultraep.layout import ExpertLayout
from ultraep.plan import check_plan
from ultraep.planners.quota import QuotaConfig, QuotaPlanner, plan_reference
from ultraep.reroute import count_local_load, reroute

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install 'ultraep[triton]')"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="TRITON_INTERPRET is set, so the kernels would run in the interpreter instead of compiled",
    ),
]

DEVICE = "cuda"

LAYOUTS = [
    pytest.param((8, 8, 2), id="ep8_e64_s2"),
    pytest.param((16, 8, 1), id="ep16_e128_s1"),
    pytest.param((64, 4, 2), id="ep64_e256_s2"),
    pytest.param((5, 3, 2), id="ep5_e15_s2_padded"),
]


def _microbatch(layout: ExpertLayout, num_tokens: int, topk: int, seed: int, skew: float = 6.0) -> list[torch.Tensor]:
    """Per-rank topk_ids on the GPU, skewed towards a few hot experts, with 5% padding."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    weights = torch.rand(layout.num_experts, generator=gen, device=DEVICE) ** skew + 1e-3
    topk_ids = []
    for _ in range(layout.num_ranks):
        ids = torch.multinomial(weights, num_tokens * topk, replacement=True, generator=gen).view(num_tokens, topk)
        ids[torch.rand(ids.shape, generator=gen, device=DEVICE) < 0.05] = -1
        topk_ids.append(ids)
    return topk_ids


def _loads(topk_ids: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    return torch.stack([count_local_load(ids, num_experts) for ids in topk_ids])  # [num_ranks, num_experts]


def test_auto_selects_triton_on_cuda():
    assert resolve_backend("auto", DEVICE) == "triton"


@pytest.mark.parametrize("shape", LAYOUTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_match_reference_on_cuda(shape, seed):
    layout = ExpertLayout(*shape)
    topk_ids = _microbatch(layout, num_tokens=1024, topk=8, seed=seed)

    counts = torch.stack([count_load(ids, layout.num_experts, backend="triton") for ids in topk_ids])
    loads = _loads(topk_ids, layout.num_experts)
    assert torch.equal(counts, loads)

    for config in (QuotaConfig(), QuotaConfig(balance_target=1.0, prefer_local=False)):
        plan = plan_quota(loads, layout, config, backend="triton")
        expected_cpu = plan_reference(loads.cpu(), layout, config)
        expected_cuda = plan_reference(loads, layout, config)
        native_cpu = QuotaPlanner(config, backend="auto")(loads.cpu(), layout)
        assert torch.equal(plan.replica_expert_ids.cpu(), expected_cpu.replica_expert_ids)
        assert torch.equal(plan.quota.cpu(), expected_cpu.quota)
        assert torch.equal(plan.quota, expected_cuda.quota)
        assert torch.equal(native_cpu.quota, expected_cpu.quota)
        check_plan(plan, loads, min_replica_quota=config.min_replica_quota)

    plan = QuotaPlanner()(loads, layout)
    for src_rank in sorted({0, layout.num_ranks // 2, layout.num_ranks - 1}):
        got = reroute_ids(topk_ids[src_rank], plan, loads, src_rank, backend="triton")
        expected = reroute(topk_ids[src_rank].cpu(), plan.to("cpu"), loads.cpu(), src_rank)
        assert torch.equal(got.cpu(), expected), f"src_rank {src_rank}"


def test_plan_kernel_repeats_identically():
    # Programs finish in varying order and the last one chooses; the plan must never change.
    layout = ExpertLayout(64, 4, 2)
    loads = _loads(_microbatch(layout, num_tokens=2048, topk=8, seed=7), layout.num_experts)
    first = plan_quota(loads, layout, backend="triton")
    for _ in range(50):
        again = plan_quota(loads, layout, backend="triton")
        assert torch.equal(again.replica_expert_ids, first.replica_expert_ids)
        assert torch.equal(again.quota, first.quota)


def test_hot_path_never_syncs_with_host():
    layout = ExpertLayout(16, 8, 2)
    topk_ids = _microbatch(layout, num_tokens=2048, topk=8, seed=3)
    loads = _loads(topk_ids, layout.num_experts)
    plan_quota(loads, layout, backend="triton")  # compile outside the checked region
    reroute_ids(topk_ids[0], QuotaPlanner()(loads, layout), loads, 0, backend="triton")
    count_load(topk_ids[0], layout.num_experts, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts = count_load(topk_ids[0], layout.num_experts, backend="triton")
        plan = plan_quota(loads, layout, backend="triton")
        routed = reroute_ids(topk_ids[0], plan, loads, 0, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(counts, loads[0])
    assert torch.equal(routed.cpu(), reroute(topk_ids[0].cpu(), plan.to("cpu"), loads.cpu(), 0))


@pytest.mark.parametrize("shape", [pytest.param((8, 8, 2), id="ep8_e64_s2"), pytest.param((64, 4, 2), id="ep64_e256_s2")])
def test_cuda_graph_replay_matches_eager(shape):
    layout = ExpertLayout(*shape)
    num_tokens, topk, src_rank = 1024, 8, 1
    static_ids = torch.stack(_microbatch(layout, num_tokens, topk, seed=11))  # [num_ranks, num_tokens, topk]

    def step(all_ids: torch.Tensor):
        # Count on every rank (the all-gather is simulated by stacking), plan, reroute this rank.
        loads = torch.stack([count_load(all_ids[r], layout.num_experts, backend="triton") for r in range(layout.num_ranks)])
        plan = plan_quota(loads, layout, backend="triton")
        routed = reroute_ids(all_ids[src_rank], plan, loads, src_rank, backend="triton")
        return loads, plan.replica_expert_ids, plan.quota, routed

    # Warm up (compiles the kernels) on a side stream, as graph capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static_ids)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static_ids)

    for seed in (12, 13, 14):
        static_ids.copy_(torch.stack(_microbatch(layout, num_tokens, topk, seed=seed, skew=3.0 + seed % 4)))
        graph.replay()
        torch.cuda.synchronize()
        eager = step(static_ids)
        for name, replayed, expected in zip(("loads", "replica_expert_ids", "quota", "routed"), captured, eager):
            assert torch.equal(replayed, expected), f"{name} differs after replay with seed {seed}"
        ids_cpu = static_ids.cpu()
        reference_plan = plan_reference(captured[0].cpu(), layout, QuotaConfig())
        assert torch.equal(captured[2].cpu(), reference_plan.quota)
        expected_routed = reroute(ids_cpu[src_rank], reference_plan, captured[0].cpu(), src_rank)
        assert torch.equal(captured[3].cpu(), expected_routed)
