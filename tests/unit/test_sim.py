"""Tests of the throughput simulator: cost model, LP reroute baseline, replay and the simulate command."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ultraep.layout import ExpertLayout
from ultraep.plan import Plan, check_plan
from ultraep.planners.base import Planner, masters_only_plan
from ultraep.planners.eplb import EplbPlanner
from ultraep.planners.lp_reroute import LpRerouteConfig, LpReroutePlanner, _lp_quotas
from ultraep.planners.quota import QuotaConfig
from ultraep.planners.registry import make_planner
from ultraep.sim.command import add_simulate_arguments, build_workloads, run_simulate
from ultraep.sim.cost import (
    CostSettings,
    ideal_layer_costs,
    layer_costs,
    relay_fill_time,
    replica_sync_traffic,
    sync_time,
)
from ultraep.sim.hardware import Efficiency, HardwareConfig, get_hardware
from ultraep.sim.models import MODELS, ModelConfig, get_model
from ultraep.sim.replay import (
    PolicySpec,
    SimulationResult,
    Workload,
    default_policies,
    evaluate,
    largest_divisor_at_most,
    mean_over_models,
    plan_policies,
    read_csv,
    read_json,
    replay,
    synthetic_workload,
    token_trace_workload,
    write_csv,
    write_json,
)
from ultraep.traces import load_bundled_trace, microbatch_loads, moving_hot_loads, zipf_loads

TRACES_DIR = Path(__file__).resolve().parents[3] / "shared" / "traces"

# Fixed planner times so that results do not depend on how fast this host plans.
FIXED_PLANNER_TIMES = {"quota": 20e-6, "lp_reroute": 50e-6}


def small_workload(seed: int = 0) -> Workload:
    return synthetic_workload("zipf", 4, 16, 2048, 4, skew=1.2, num_microbatches=3, num_layers=2, seed=seed, warmup_microbatches=4)


def small_policies() -> tuple[PolicySpec, ...]:
    return default_policies((1, 2), (2,), eplb_window=2, eplb_interval=2)


@pytest.fixture(scope="module")
def small_plans():
    """The small workload and every small policy's plans, planned once for the module."""
    workload = small_workload()
    return workload, plan_policies(workload, small_policies(), progress=False)


# Hand-sized model and hardware: F = 60 FLOPs per assignment, W = 60 bytes per expert, 4 bytes per
# dispatched assignment; the GPU does 60 FLOP/s and moves 60 B/s from HBM and 4 B/s over NVLink.
TINY_MODEL = ModelConfig(
    name="tiny", display_name="tiny", num_experts=2, top_k=1, hidden_size=2, expert_intermediate_size=5, num_moe_layers=1, source="test"
)
TINY_HARDWARE = HardwareConfig(
    name="tiny", display_name="tiny", peak_flops=60.0, hbm_bytes_per_s=60.0, nvlink_bytes_per_s=4.0,
    network_bytes_per_s=1.0, domain_size=2, source="test",
)
EXACT = Efficiency(gemm=1.0, hbm=1.0, nvlink=1.0, network=1.0)


def tiny_settings(mode: str) -> CostSettings:
    return CostSettings(mode=mode, efficiency=EXACT, tile_rows=2, sync_scheme="direct")


# Two ranks, one master slot and one redundant slot each. Expert 0 has load 12, expert 1 load 4; each
# rank produces 8 assignments. The balanced plan puts a replica of expert 0 on rank 1 with quota 4.
TWO_RANK_LAYOUT = ExpertLayout(num_ranks=2, experts_per_rank=1, redundant_slots_per_rank=1)
TWO_RANK_LOADS = torch.tensor([[8, 0], [4, 4]])
NONE_QUOTA = torch.tensor([[12, 0, 4, 0]])
NONE_REPLICAS = torch.tensor([[[-1], [-1]]])
BALANCED_QUOTA = torch.tensor([[8, 0, 4, 4]])
BALANCED_REPLICAS = torch.tensor([[[-1], [0]]])
SOURCE = torch.tensor([[8, 8]])


@pytest.mark.parametrize(
    ("mode", "none_time", "balanced_time", "ideal_time"),
    [
        # prefill: none = dispatch 6 + GEMM 13 + combine 6 on rank 0. Balanced = planner 2 + sync 60 B / 4 B/s
        # = 15 + rank 1 (4 + 5 + 5 + 4). Ideal = 4 + 9 + 4.
        pytest.param("prefill", 25.0, 35.0, 17.0, id="prefill"),
        # train adds backward: none 6 + 26 + 6; balanced resync 15 + (4 + 20 + 4) + grad 120 B / 4 B/s = 30;
        # ideal 4 + 18 + 4.
        pytest.param("train", 63.0, 108.0, 43.0, id="train"),
    ],
)
def test_two_rank_case_matches_hand_computation(mode, none_time, balanced_time, ideal_time):
    settings = tiny_settings(mode)
    none = layer_costs(NONE_QUOTA, NONE_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings)
    balanced = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings, planner_time_s=2.0
    )
    ideal = ideal_layer_costs(SOURCE, ExpertLayout(2, 1), TINY_MODEL, TINY_HARDWARE, settings)
    assert none.total_s.tolist() == [none_time]
    assert balanced.total_s.tolist() == [balanced_time]
    assert ideal.total_s.tolist() == [ideal_time]
    assert balanced.sync_s.tolist() == [15.0]
    assert balanced.max_rank_load.tolist() == [8.0]


def test_two_rank_bytes_moved():
    balanced = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, tiny_settings("train")
    )
    # 60 B forward + 60 B re-sync + 30 params x 4 B gradient.
    assert balanced.bytes_moved.tolist() == [240.0]


def test_relay_tree_spreads_the_masters_fan_out():
    layout = ExpertLayout(num_ranks=4, experts_per_rank=1, redundant_slots_per_rank=1)
    replicas = torch.tensor([[[-1], [0], [0], [0]]])
    relay = replica_sync_traffic(replicas, replicas >= 0, layout, 10.0, 4, CostSettings(sync_scheme="relay"))
    direct = replica_sync_traffic(replicas, replicas >= 0, layout, 10.0, 4, CostSettings(sync_scheme="direct"))
    # 4 chunks, 3 copies: a chain 0 -> 1 -> 2 -> 3 of depth 3, filled in 2 chunk times.
    assert relay.out_nvlink.tolist() == [[10.0, 10.0, 10.0, 0.0]]
    assert relay.in_nvlink.tolist() == [[0.0, 10.0, 10.0, 10.0]]
    assert (relay.depth.tolist(), relay.fill_chunks.tolist()) == ([3], [2])
    assert direct.out_nvlink.tolist() == [[30.0, 0.0, 0.0, 0.0]]
    assert (direct.depth.tolist(), direct.fill_chunks.tolist()) == ([1], [0])


def test_step_latency_counts_every_schedule_step():
    layout = ExpertLayout(num_ranks=4, experts_per_rank=1, redundant_slots_per_rank=1)
    replicas = torch.tensor([[[-1], [0], [0], [0]]])
    hardware = get_hardware("gb200-nvl72")
    latency = 1e-5
    for scheme, chunked, steps, levels in (("relay", False, 6, 3), ("direct", False, 1, 1), ("direct", True, 4, 1)):
        base = CostSettings(sync_scheme=scheme)
        slow = CostSettings(sync_scheme=scheme, step_latency_s=latency)
        traffic = replica_sync_traffic(replicas, replicas >= 0, layout, 1e6, 4, base, chunked_copies=chunked)
        # A chain of 3 in 4 chunks takes 4 + 3 - 1 steps; a direct copy 1 step, or 4 in chunks.
        assert traffic.num_steps.tolist() == [steps]
        added = sync_time(traffic, hardware, slow) - sync_time(traffic, hardware, base)
        assert added.item() == pytest.approx(steps * latency)
        fill_added = relay_fill_time(traffic, hardware, slow) - relay_fill_time(traffic, hardware, base)
        assert fill_added.item() == pytest.approx((levels - 1) * latency)
    empty = replica_sync_traffic(replicas, torch.zeros_like(replicas, dtype=torch.bool), layout, 1e6, 4, base)
    assert empty.num_steps.tolist() == [0]


@pytest.mark.parametrize("latency", [-1e-6, float("nan"), True])
def test_step_latency_rejects_bad_values(latency):
    with pytest.raises(ValueError, match="step_latency_s must be a finite number >= 0"):
        CostSettings(step_latency_s=latency)


@pytest.mark.parametrize(("num_ranks", "chunks"), [(16, 8), (16, 2), (9, 4), (40, 8)])
def test_sync_traffic_follows_the_runtime_trees(num_ranks, chunks):
    from ultraep.comm import plan_weight_sync

    layout = ExpertLayout(num_ranks=num_ranks, experts_per_rank=1, redundant_slots_per_rank=1)
    placement = [[-1]] + [[0]] * (num_ranks - 1)
    replicas = torch.tensor([placement])
    settings = CostSettings(sync_scheme="relay", sync_chunks=chunks)
    traffic = replica_sync_traffic(replicas, replicas >= 0, layout, 1.0, num_ranks, settings)
    plan = plan_weight_sync(layout, placement, mode="relay", num_chunks=chunks)
    assert traffic.out_nvlink[0].tolist() == plan.copies_sent_per_rank()
    assert traffic.depth.tolist() == [plan.depth]
    # The fill, (depth - 1) * fan_out chunks, is the runtime's link time beyond the busiest sender's
    # copies, or up to one level's fan-out more when the deepest level is not full.
    fan_out = int(max(plan.copies_sent_per_rank()))
    assert traffic.fill_chunks.tolist() == [(plan.depth - 1) * fan_out]
    runtime_fill = round((plan.link_time() - fan_out) * chunks)
    assert 0 <= traffic.fill_chunks.item() - runtime_fill < fan_out


def test_sync_across_domains_uses_the_network():
    layout = ExpertLayout(num_ranks=4, experts_per_rank=1, redundant_slots_per_rank=1)
    replicas = torch.tensor([[[-1], [-1], [0], [-1]]])
    traffic = replica_sync_traffic(replicas, replicas >= 0, layout, 10.0, 2, CostSettings(sync_scheme="direct"))
    assert traffic.out_network.tolist() == [[10.0, 0.0, 0.0, 0.0]]
    assert traffic.in_network.tolist() == [[0.0, 0.0, 10.0, 0.0]]
    assert traffic.out_nvlink.sum().item() == 0.0


def test_none_equals_ideal_on_uniform_loads():
    layout = ExpertLayout(num_ranks=8, experts_per_rank=4, redundant_slots_per_rank=0)
    loads = torch.full((8, 32), 16, dtype=torch.int64)
    plan = make_planner("none")(loads, layout)
    model, hardware = get_model("deepseek-v3"), get_hardware("h100-hgx")
    for mode in ("train", "prefill"):
        settings = CostSettings(mode=mode)
        none = layer_costs(plan.quota[None], plan.replica_expert_ids[None], loads.sum(dim=1)[None], layout, model, hardware, settings)
        ideal = ideal_layer_costs(loads.sum(dim=1)[None], layout, model, hardware, settings)
        assert torch.equal(none.total_s, ideal.total_s)


def _per_sample_costs(workload, plans, model, hardware, settings):
    """Return (ideal [num_samples], {label: [num_samples]}) layer times over every microbatch."""
    num_samples = workload.num_microbatches * workload.num_layers
    source = workload.loads.sum(dim=3).reshape(num_samples, workload.num_ranks)
    base = ExpertLayout.from_num_experts(workload.num_experts, workload.num_ranks)
    scale = model.top_k / workload.trace_top_k
    ideal = ideal_layer_costs(source, base, model, hardware, settings, assignment_scale=scale).total_s
    times = {}
    for policy_plans in plans:
        layout = policy_plans.layout
        times[policy_plans.spec.label] = layer_costs(
            policy_plans.quota.reshape(num_samples, layout.num_slots),
            policy_plans.replica_expert_ids.reshape(num_samples, layout.num_ranks, layout.redundant_slots_per_rank),
            source,
            layout,
            model,
            hardware,
            settings,
            assignment_scale=scale,
            replica_lifetime=policy_plans.spec.replica_lifetime,
            synced=policy_plans.synced.reshape(num_samples, layout.num_ranks, layout.redundant_slots_per_rank),
        ).total_s
    return ideal, times


@pytest.mark.parametrize("mode", ["train", "prefill"])
@pytest.mark.parametrize("hardware_name", ["gb200-nvl72", "h100-hgx"])
def test_ideal_never_slower_than_any_policy(small_plans, mode, hardware_name):
    workload, plans = small_plans
    settings = CostSettings(mode=mode)
    for model in MODELS.values():
        ideal, times = _per_sample_costs(workload, plans, model, get_hardware(hardware_name), settings)
        for label, total in times.items():
            assert bool((ideal <= total).all()), f"{model.name} {label}: ideal slower than the policy"


def test_ideal_never_slower_on_the_bundled_trace():
    formed = microbatch_loads(load_bundled_trace(), 8, 256, num_microbatches=4)
    workload = Workload(formed.loads[:, :2].contiguous(), 6, "bundled", "token", False, formed.description, 256.0, 2)
    plans = plan_policies(workload, small_policies(), progress=False)
    ideal, times = _per_sample_costs(workload, plans, get_model("qwen3-235b"), get_hardware("gb200-nvl72"), CostSettings())
    for label, total in times.items():
        assert bool((ideal <= total).all()), label


@pytest.mark.parametrize("scale", [pytest.param("flops", id="flops"), pytest.param("bandwidth", id="bandwidth")])
def test_times_fall_when_hardware_gets_faster(small_plans, scale):
    workload, plans = small_plans
    base = get_hardware("h100-hgx")
    faster = base.scaled(**{scale: 2.0})
    model = get_model("glm-4.5-air")
    for mode in ("train", "prefill"):
        settings = CostSettings(mode=mode)
        slow_ideal, slow = _per_sample_costs(workload, plans, model, base, settings)
        fast_ideal, fast = _per_sample_costs(workload, plans, model, faster, settings)
        assert bool((fast_ideal <= slow_ideal).all())
        assert float(fast_ideal.sum()) < float(slow_ideal.sum())
        for label in slow:
            assert bool((fast[label] <= slow[label]).all()), label
            assert float(fast[label].sum()) < float(slow[label].sum()), label


def test_replay_is_reproducible_with_a_fixed_seed():
    model, hardware = get_model("qwen3-235b"), get_hardware("gb200-nvl72")

    def run(seed):
        workload = synthetic_workload("moving", 4, 16, 256, 4, num_microbatches=2, num_layers=1, seed=seed, warmup_microbatches=2)
        return workload, replay(workload, model, hardware, CostSettings(), small_policies(), planner_time_s=FIXED_PLANNER_TIMES, progress=False)

    first_workload, first = run(3)
    second_workload, second = run(3)
    assert torch.equal(first_workload.loads, second_workload.loads)
    # Wall times of the planner calls are measured, so they are the only fields allowed to differ.
    assert [dataclasses.replace(row, planner_wall_us=0.0) for row in first.rows] == [
        dataclasses.replace(row, planner_wall_us=0.0) for row in second.rows
    ]
    other_workload, _ = run(4)
    assert not torch.equal(other_workload.loads, first_workload.loads)


def test_resampled_token_workload_is_reproducible():
    trace = load_bundled_trace()
    first = token_trace_workload(trace, 16, 4096, resample=True, seed=7, num_microbatches=1, warmup_microbatches=0)
    second = token_trace_workload(trace, 16, 4096, resample=True, seed=7, num_microbatches=1, warmup_microbatches=0)
    assert torch.equal(first.loads, second.loads)
    assert first.resampled
    assert "RESAMPLED" in first.kind_label


def test_replay_throughput_and_speedup_are_consistent(small_plans):
    workload, plans = small_plans
    result = evaluate(
        workload, plans, get_model("deepseek-v3"), get_hardware("gb200-nvl72"), CostSettings(), planner_time_s=FIXED_PLANNER_TIMES
    )
    none = result.row("none")
    assert none.speedup_over_none == 1.0
    assert none.imbalance_after_mean == none.imbalance_before_mean
    for row in result.rows:
        assert row.throughput_pct_of_ideal <= 100.0
        assert math.isclose(row.speedup_over_none, row.throughput_pct_of_ideal / none.throughput_pct_of_ideal, rel_tol=1e-9)
    quota = result.row("quota s=2")
    assert quota.imbalance_after_mean < none.imbalance_before_mean
    assert quota.planner_time_us == pytest.approx(20.0)
    assert quota.planner_time_source == "set"
    assert result.row("eplb s=2").planner_time_us == 0.0


@pytest.fixture(scope="module")
def small_result(small_plans) -> SimulationResult:
    workload, plans = small_plans
    return evaluate(
        workload, plans, get_model("mixtral-8x7b"), get_hardware("h200-hgx"), CostSettings(mode="prefill"),
        planner_time_s=FIXED_PLANNER_TIMES,
    )


def test_json_round_trip(tmp_path, small_result):
    result = small_result
    result.to_json(tmp_path / "one.json")
    assert SimulationResult.from_json(tmp_path / "one.json") == result
    write_json([result, result], tmp_path / "two.json")
    assert read_json(tmp_path / "two.json") == [result, result]


def test_csv_round_trip(tmp_path, small_result):
    result = small_result
    result.to_csv(tmp_path / "one.csv")
    assert SimulationResult.from_csv(tmp_path / "one.csv") == [result]
    other = dataclasses.replace(result, model="other")
    write_csv([result, other], tmp_path / "two.csv")
    assert read_csv(tmp_path / "two.csv") == [result, other]


def test_mean_over_models_averages_throughput(small_plans):
    workload, plans = small_plans
    results = [
        evaluate(workload, plans, model, get_hardware("gb200-nvl72"), CostSettings(), planner_time_s=FIXED_PLANNER_TIMES)
        for model in MODELS.values()
    ]
    mean = mean_over_models(results)
    for idx, row in enumerate(mean.rows):
        expected = sum(r.rows[idx].throughput_pct_of_ideal for r in results) / len(results)
        assert row.throughput_pct_of_ideal == pytest.approx(expected)
        assert row.imbalance_after_mean == results[0].rows[idx].imbalance_after_mean
    assert mean.model.startswith("mean over 4 models")


def test_format_table_labels_synthetic_data(small_result):
    text = small_result.format_table()
    assert "SYNTHETIC" in text
    assert "throughput % of ideal" in text
    assert "quota s=1" in text


def _lp_and_eplb_sequence():
    zipf = zipf_loads(8, 32, 128, 4, 1.3, num_microbatches=6, num_layers=1, seed=1)[:, 0]
    moving = moving_hot_loads(8, 32, 128, 4, num_microbatches=6, num_layers=1, seed=2)[:, 0]
    return [pytest.param(zipf, id="zipf_static"), pytest.param(moving, id="moving_hot")]


@pytest.mark.parametrize("loads_sequence", _lp_and_eplb_sequence())
@pytest.mark.parametrize("slots", [1, 2])
def test_lp_reroute_beats_even_split(loads_sequence, slots):
    layout = ExpertLayout.from_num_experts(32, 8, slots)
    lp = LpReroutePlanner(window=2, interval=2)
    eplb = EplbPlanner(window=2, interval=2)
    improved = 0
    for loads in loads_sequence:
        lp_plan = lp(loads, layout)
        even_plan = eplb(loads, layout)
        check_plan(lp_plan, loads)
        assert torch.equal(lp_plan.replica_expert_ids, even_plan.replica_expert_ids)
        assert int(lp_plan.rank_load().max()) <= int(even_plan.rank_load().max())
        improved += int(lp_plan.rank_load().max()) < int(even_plan.rank_load().max())
        lp.observe(loads, layout)
        eplb.observe(loads, layout)
    assert improved > 0


def test_lp_reroute_hand_case_balances_exactly():
    # Expert 0 (load 10) on rank 0 with a replica on rank 1; expert 1 (load 2) on rank 1. The LP gives
    # the replica 4, so both ranks carry 6; the even split gives 5 and 5, leaving ranks at 5 and 7.
    layout = ExpertLayout(num_ranks=2, experts_per_rank=1, redundant_slots_per_rank=1)
    quota = _lp_quotas(torch.tensor([10, 2]), torch.tensor([[-1], [0]]), layout)
    assert quota.tolist() == [6, 0, 2, 4]
    check_plan(Plan(layout, torch.tensor([[-1], [0]]), quota), torch.tensor([[5, 1], [5, 1]]))


def test_lp_reroute_rounding_keeps_expert_totals():
    # Three instances of expert 0 (load 10) over three ranks with fixed loads 0, 1, 2: the LP optimum
    # t = 13/3 is fractional, and rounding must still give quotas that sum to 10.
    layout = ExpertLayout(num_ranks=3, experts_per_rank=1, redundant_slots_per_rank=1)
    quota = _lp_quotas(torch.tensor([10, 1, 2]), torch.tensor([[-1], [0], [0]]), layout)
    replica_ids = torch.tensor([[-1], [0], [0]])
    plan = Plan(layout, replica_ids, quota)
    check_plan(plan, torch.tensor([[10, 1, 2], [0, 0, 0], [0, 0, 0]]))
    assert int(plan.rank_load().max()) == 5


def test_lp_reroute_without_history_is_masters_only():
    layout = ExpertLayout(num_ranks=2, experts_per_rank=1, redundant_slots_per_rank=1)
    plan = LpReroutePlanner()(torch.tensor([[5, 1], [5, 1]]), layout)
    assert plan.quota.tolist() == [10, 0, 2, 0]


@pytest.mark.skipif(not TRACES_DIR.is_dir(), reason=f"real traces folder {TRACES_DIR} is missing")
def test_step_load_trace_workload_from_real_file():
    from ultraep.sim.replay import load_trace_workload
    from ultraep.traces import load_trace

    trace = load_trace(TRACES_DIR / "harmoeny_qwen15moe_top1_step_loads.npz")
    workload = load_trace_workload(trace, 12, warmup_microbatches=4, label="qwen15")
    assert workload.data_kind == "step_loads"
    assert workload.loads.shape == (80, 12, 12, 60)
    assert torch.equal(workload.loads.sum(dim=2), trace.loads)
    assert "split evenly" in workload.description


def test_largest_divisor_at_most():
    assert largest_divisor_at_most(64, 64) == 64
    assert largest_divisor_at_most(60, 64) == 60
    assert largest_divisor_at_most(8, 64) == 8
    assert largest_divisor_at_most(64, 48) == 32
    assert largest_divisor_at_most(64, 0) == 0


def _args(tmp_path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    argv = [
        "--synthetic", "zipf", "--ranks", "4", "--tokens-per-rank", "32", "--microbatches", "2", "--eplb-window", "2",
        "--eplb-interval", "2", "--quota-slots", "1", "--baseline-slots", "1", "--planner-time-us", "quota=25",
        "--planner-time-us", "lp_reroute=40", "--model", "mixtral-8x7b", "--no-progress",
        "--csv", str(tmp_path / "out.csv"), "--json", str(tmp_path / "out.json"),
    ]
    args = parser.parse_args(argv)
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_simulate_command_writes_files(tmp_path, capsys):
    assert run_simulate(_args(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    assert "speedup over none" in printed
    assert "bytes moved/layer: replica weight copies" in printed
    runs = read_json(tmp_path / "out.json")
    assert [row.policy for row in runs[0].rows] == ["none", "eplb s=1", "lp_reroute s=1", "quota s=1", "quota s=1 layer-buffers"]
    assert read_csv(tmp_path / "out.csv") == runs


def test_simulate_names_the_num_experts_flag(tmp_path, capsys):
    path = tmp_path / "ids.npy"
    np.save(path, np.zeros((64, 2), dtype=np.int64))
    args = _args(tmp_path, synthetic=None, trace=[str(path)])
    assert run_simulate(args) == 2
    message = capsys.readouterr().err
    assert "pass --num-experts N, the logical experts per layer" in message
    assert "load_trace" not in message


def test_planner_times_skip_first_call(monkeypatch):
    # The first planner call of a policy loads libraries and fills caches; a run with one measured
    # plan must not report it. Every planner built here records the order of its calls.
    calls = []

    class Recorder(Planner):
        name = "recorder"

        def plan(self, loads, layout):
            calls.append(self)
            return masters_only_plan(loads, layout)

    monkeypatch.setattr(PolicySpec, "make_planner", lambda self: Recorder())
    formed = microbatch_loads(load_bundled_trace(), 8, 256, num_microbatches=1)
    workload = Workload(formed.loads[:, :1].contiguous(), 6, "bundled", "token", False, formed.description, 256.0, 0)
    (plans,) = plan_policies(workload, [PolicySpec("quota s=1", "quota", 1)], progress=False)
    assert plans.planner_wall_s.shape == (1, 1)
    assert len(calls) == 2
    assert calls[0] is not calls[1]


def test_planner_time_rejects_unknown_policy(tmp_path, capsys):
    assert run_simulate(_args(tmp_path, planner_time_us=["qouta=0"])) == 2
    assert re.search(r"no planner or policy named 'qouta'; use one of .*quota s=1", capsys.readouterr().err)


def test_quota_setting_reaches_every_quota_policy(tmp_path, capsys):
    args = _args(tmp_path, quota_setting=["min_replica_quota=1000000", "prefer_local=false"])
    assert run_simulate(args) == 0
    assert "quota settings min_replica_quota=1000000, prefer_local=false" in capsys.readouterr().out.splitlines()[0]
    runs = read_json(tmp_path / "out.json")
    # No replica reaches a quota of 1,000,000 assignments, so every quota policy plans masters only.
    quota_rows = [row for row in runs[0].rows if row.policy.startswith("quota")]
    assert quota_rows and all(row.replicas_per_layer == 0.0 for row in quota_rows)


def test_simulate_header_names_training_only_flags_in_prefill(tmp_path, capsys):
    assert run_simulate(_args(tmp_path, mode="prefill", overlap_grad_reduce=True, overlap_sync=True)) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "forward weight sync in the background" in header
    assert "--overlap-grad-reduce ignored (no backward in prefill)" in header
    assert "optimizer step" not in header
    assert run_simulate(_args(tmp_path, mode="prefill", overlap_sync=True, pipeline_replicas=True, sync_chunks=8)) == 0
    assert "replicas computed chunk by chunk (8 chunks)" in capsys.readouterr().out.splitlines()[0]


def test_short_trace_resamples_and_fills(tmp_path):
    args = _args(tmp_path, synthetic=None, ranks=16, tokens_per_rank=4096, microbatches=1, eplb_window=0)
    resampled, unresampled = build_workloads(load_bundled_trace(), "bundled", args)
    assert (resampled.num_ranks, resampled.resampled, resampled.num_microbatches) == (16, True, 1)
    assert "RESAMPLES whole sequences" in resampled.description
    assert (unresampled.num_ranks, unresampled.resampled, unresampled.num_microbatches) == (8, False, 1)
    assert "largest EP size the trace fills" in unresampled.description
    assert unresampled.warmup_microbatches == 0


def test_token_trace_rank_count_follows_the_experts(tmp_path):
    args = _args(tmp_path, synthetic=None, ranks=48, tokens_per_rank=512, eplb_window=1)
    (workload,) = build_workloads(load_bundled_trace(), "bundled", args)
    assert workload.num_ranks == 32
    assert "EP48 does not divide the trace's 64 experts" in workload.description


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"planner_time_us": ["quota"]}, "POLICY=MICROSECONDS", id="planner_time_without_value"),
        pytest.param({"planner_time_us": ["quota=-1"]}, "POLICY=MICROSECONDS", id="negative_planner_time"),
        pytest.param({"quota_slots": "1,x"}, "comma-separated integers", id="bad_slot_list"),
        pytest.param({"quota_slots": "0"}, "must be >= 1", id="zero_slots"),
        pytest.param({"quota_buffers": "shared,global"}, "--quota-buffers must list shared and/or layer", id="bad_buffers"),
        pytest.param({"gemm_efficiency": 1.5}, r"--gemm-efficiency must be in \(0, 1\]", id="efficiency_above_one"),
        pytest.param({"eplb_window": 0}, r"--eplb-window must be in \[1, ", id="zero_eplb_window"),
        pytest.param({"microbatches_per_step": 0}, "--microbatches-per-step must be", id="zero_microbatches_per_step"),
        pytest.param({"quota_slots": "1,,2"}, "comma-separated integers", id="empty_slot_entry"),
        pytest.param({"quota_slots": ""}, "comma-separated integers", id="no_slots"),
        pytest.param({"quota_slots": "1,1"}, "names a slot count twice", id="repeated_slots"),
        pytest.param({"quota_slots": "7"}, r"--quota-slots 7 is too many at EP4 with 8 experts: .* 6 or fewer", id="too_many_slots"),
        pytest.param({"resident": True}, "--resident applies to --mode prefill", id="resident_in_training"),
        pytest.param({"resident": True, "mode": "prefill", "quota_buffers": "shared"}, "has no layer buffers", id="resident_without_layer_buffers"),
        pytest.param({"synthetic": None, "skew": 1.2}, "--skew 1.2 sets the skew of --synthetic zipf only", id="skew_without_zipf"),
        pytest.param({"trace": ["bundled"]}, "--synthetic and --trace exclude each other", id="synthetic_and_trace"),
        pytest.param({"microbatches": 0}, "--microbatches must be >= 1, got 0", id="zero_microbatches"),
        pytest.param({"pipeline_replicas": True}, "--pipeline-replicas needs --overlap-sync", id="pipeline_without_overlap"),
        pytest.param({"quota_setting": ["min_quota=5"]}, "--quota-setting takes NAME=VALUE with NAME one of", id="unknown_quota_setting"),
        pytest.param({"quota_setting": ["min_replica_quota"]}, "--quota-setting takes NAME=VALUE", id="quota_setting_without_value"),
        pytest.param({"quota_setting": ["min_replica_quota=1.5"]}, "--quota-setting min_replica_quota takes int, got '1.5'", id="quota_setting_not_int"),
        pytest.param({"quota_setting": ["prefer_local=maybe"]}, "--quota-setting prefer_local takes true or false, got 'maybe'", id="quota_setting_not_bool"),
        pytest.param({"quota_setting": ["min_replica_quota=0"]}, r"min_replica_quota must be in \[1, 34359738368\]", id="quota_setting_out_of_range"),
        pytest.param({"sync_chunks": 0}, "--sync-chunks must be >= 1, got 0", id="zero_sync_chunks"),
        pytest.param({"synthetic": None, "trace": ["/nonexistent/trace.npz"]}, "does not exist", id="missing_trace"),
    ],
)
def test_simulate_command_rejects_bad_input(tmp_path, capsys, overrides, message):
    assert run_simulate(_args(tmp_path, **overrides)) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("option", ["csv", "json"])
def test_simulate_checks_output_paths_before_running(tmp_path, capsys, option):
    assert run_simulate(_args(tmp_path, **{option: str(tmp_path)})) == 2
    captured = capsys.readouterr()
    assert f"--{option} {str(tmp_path)!r} is a folder" in captured.err
    assert captured.out == ""  # nothing ran
    assert run_simulate(_args(tmp_path, **{option: str(tmp_path / "missing" / "out")})) == 2
    assert "does not exist; create it first" in capsys.readouterr().err


def test_microbatches_cap_an_unresampled_trace(tmp_path):
    args = _args(tmp_path, synthetic=None, ranks=8, tokens_per_rank=512, microbatches=3, eplb_window=2)
    (workload,) = build_workloads(load_bundled_trace(), "bundled", args)
    assert (workload.num_microbatches, workload.warmup_microbatches) == (5, 2)
    assert "Only the first 5 of the 8 microbatches are used." in workload.description
    uncapped = build_workloads(load_bundled_trace(), "bundled", _args(tmp_path, synthetic=None, ranks=8, tokens_per_rank=512, microbatches=None))
    assert uncapped[0].num_microbatches == 8


def test_quota_slower_than_none_gets_a_note(tmp_path, capsys):
    # 16 tokens per rank: a measured planner time of 1 ms per layer costs more than any imbalance.
    args = _args(tmp_path, synthetic=None, ranks=64, tokens_per_rank=16, microbatches=1, mode="prefill", planner_time_us=["quota=1000"])
    assert run_simulate(args) == 0
    printed = capsys.readouterr().out
    assert "note: quota s=1 runs slower than none here" in printed
    assert "its planner time on the critical path (1000 us per layer, set)" in printed


# Error paths of the configuration and cost functions.


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        pytest.param(lambda: dataclasses.replace(MODELS["qwen3-235b"], top_k=0), ValueError, "top_k must be a positive int", id="model_top_k"),
        pytest.param(lambda: dataclasses.replace(MODELS["mixtral-8x7b"], top_k=9), ValueError, "exceeds num_experts", id="model_top_k_above_experts"),
        pytest.param(lambda: get_model("gpt-5"), ValueError, "unknown model 'gpt-5'", id="unknown_model"),
        pytest.param(lambda: get_hardware("tpu"), ValueError, "unknown hardware 'tpu'", id="unknown_hardware"),
        pytest.param(lambda: dataclasses.replace(TINY_HARDWARE, peak_flops=0.0), ValueError, "peak_flops must be a positive", id="hardware_flops"),
        pytest.param(lambda: dataclasses.replace(TINY_HARDWARE, domain_size=0), ValueError, "domain_size must be a positive int", id="hardware_domain"),
        pytest.param(lambda: TINY_HARDWARE.scaled(flops=0.0), ValueError, "scale factors must be positive", id="hardware_scale"),
        pytest.param(lambda: Efficiency(nvlink=0.0), ValueError, r"Efficiency.nvlink must be in \(0, 1\]", id="efficiency_zero"),
        pytest.param(lambda: CostSettings(mode="decode"), ValueError, "mode must be one of", id="settings_mode"),
        pytest.param(lambda: CostSettings(sync_scheme="tree"), ValueError, "sync_scheme must be one of", id="settings_sync"),
        pytest.param(lambda: CostSettings(efficiency=0.5), TypeError, "efficiency must be an Efficiency", id="settings_efficiency"),
        pytest.param(lambda: CostSettings(sync_chunks=0), ValueError, "sync_chunks must be a positive int", id="settings_chunks"),
        pytest.param(lambda: PolicySpec("x", "quota", -1), ValueError, "redundant_slots_per_rank must be an int >= 0", id="policy_slots"),
        pytest.param(lambda: PolicySpec("x", "quota", 1, replica_lifetime="forever"), ValueError, "replica_lifetime must be one of", id="policy_lifetime"),
        pytest.param(lambda: LpRerouteConfig(window=0), ValueError, "LpRerouteConfig.window must be in", id="lp_window"),
        pytest.param(lambda: LpReroutePlanner(LpRerouteConfig(), window=2), TypeError, "either config or settings", id="lp_config_and_settings"),
        pytest.param(lambda: mean_over_models([]), ValueError, "at least one result", id="mean_of_nothing"),
        pytest.param(lambda: synthetic_workload("bursty", 4, 16, 32, 2), ValueError, "generator must be 'zipf' or 'moving'", id="synthetic_kind"),
    ],
)
def test_invalid_configuration_raises(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_workload_checks():
    loads = torch.zeros(2, 1, 2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="Workload.loads must be a"):
        Workload(loads[0], 1, "x", "token", False, "", 1.0)
    with pytest.raises(TypeError, match="Workload.loads must be int64"):
        Workload(loads.float(), 1, "x", "token", False, "", 1.0)
    with pytest.raises(ValueError, match="data_kind must be one of"):
        Workload(loads, 1, "x", "video", False, "", 1.0)
    with pytest.raises(ValueError, match="at least one microbatch must be measured"):
        Workload(loads, 1, "x", "token", False, "", 1.0, warmup_microbatches=2)


def test_layer_costs_checks():
    settings = tiny_settings("prefill")
    call = dict(layout=TWO_RANK_LAYOUT, model=TINY_MODEL, hardware=TINY_HARDWARE, settings=settings)
    with pytest.raises(TypeError, match="quota must be a torch.Tensor"):
        layer_costs([[8, 0, 4, 4]], BALANCED_REPLICAS, SOURCE, **call)
    with pytest.raises(TypeError, match="quota must be an integer tensor"):
        layer_costs(BALANCED_QUOTA.float(), BALANCED_REPLICAS, SOURCE, **call)
    with pytest.raises(ValueError, match=r"source_load must have shape \[1, 2\]"):
        layer_costs(BALANCED_QUOTA, BALANCED_REPLICAS, torch.tensor([[8, 8, 0]]), **call)
    with pytest.raises(ValueError, match="assignment_scale must be a positive finite number"):
        layer_costs(BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, **call, assignment_scale=0.0)
    with pytest.raises(ValueError, match="planner_time_s must be a finite number >= 0"):
        layer_costs(BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, **call, planner_time_s=-1.0)
    with pytest.raises(ValueError, match="replica_lifetime must be one of"):
        layer_costs(BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, **call, replica_lifetime="step")
    for lifetime in ("persistent", "layer"):
        with pytest.raises(ValueError, match=f"replica_lifetime='{lifetime}' needs synced"):
            layer_costs(BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, **call, replica_lifetime=lifetime)
    with pytest.raises(ValueError, match="source_load must be a"):
        ideal_layer_costs(torch.tensor([8, 8]), ExpertLayout(2, 1), TINY_MODEL, TINY_HARDWARE, settings)


def test_persistent_replicas_pay_only_for_moved_slots():
    settings = tiny_settings("prefill")
    moved = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings,
        replica_lifetime="persistent", synced=torch.tensor([[[False], [True]]]),
    )
    kept = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings,
        replica_lifetime="persistent", synced=torch.tensor([[[False], [False]]]),
    )
    assert moved.sync_s.tolist() == [15.0]
    assert kept.sync_s.tolist() == [0.0]
    assert kept.total_s.tolist() == [18.0]


@pytest.mark.parametrize(
    ("mode", "microbatches_per_step", "synced", "sync", "total"),
    [
        # Prefill: only a replica whose expert changed is copied (15 s); otherwise none (35 - 15 = 20).
        pytest.param("prefill", 1, True, 15.0, 35.0, id="prefill_moved"),
        pytest.param("prefill", 1, False, 0.0, 20.0, id="prefill_kept"),
        # Train, one microbatch per step: every forward copies (the weights changed), no re-sync:
        # 108 s of the hand computation minus the 15 s re-sync.
        pytest.param("train", 1, False, 15.0, 93.0, id="train_one_microbatch"),
        # Train, 3 microbatches per step, expert kept: each backward changed the weight version, so
        # every forward copies again.
        pytest.param("train", 3, False, 15.0, 93.0, id="train_accumulation_kept"),
        pytest.param("train", 3, True, 15.0, 93.0, id="train_accumulation_moved"),
    ],
)
def test_layer_buffers_copy_changed_slots_and_skip_resync(mode, microbatches_per_step, synced, sync, total):
    settings = dataclasses.replace(tiny_settings(mode), microbatches_per_step=microbatches_per_step)
    costs = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings,
        planner_time_s=2.0, replica_lifetime="layer", synced=torch.tensor([[[False], [synced]]]),
    )
    assert costs.sync_s.tolist() == [sync]
    assert costs.resync_s.tolist() == [0.0]
    assert costs.total_s.tolist() == [total]
    if mode == "train":
        assert costs.grad_reduce_s.tolist() == [30.0]


@pytest.mark.parametrize(
    ("mode", "total"),
    [
        # Rank 1 runs its master (5 s) while the copy (15 s) arrives, then its replica (5 s):
        # 4 + max(5, 15) + 5 + 4 = 28 against 18 without the sync, so 10 s of the sync are exposed.
        # Rank 0 has no replica and does not wait: 4 + 9 + 4 = 17. Total = planner 2 + 10 + 18.
        pytest.param("prefill", 30.0, id="prefill"),
        # Training adds the unchanged backward: 108 - 15 + 10.
        pytest.param("train", 103.0, id="train"),
    ],
)
def test_overlapped_sync_hides_behind_master_gemm(mode, total):
    settings = dataclasses.replace(tiny_settings(mode), overlap_sync=True)
    costs = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings, planner_time_s=2.0
    )
    assert costs.sync_s.tolist() == [10.0]
    assert costs.forward_s.tolist() == [18.0]
    assert costs.total_s.tolist() == [total]
    none = layer_costs(NONE_QUOTA, NONE_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings)
    assert none.total_s.tolist() == layer_costs(
        NONE_QUOTA, NONE_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, tiny_settings(mode)
    ).total_s.tolist()
    with pytest.raises(TypeError, match="overlap_sync must be a bool"):
        CostSettings(overlap_sync=1)


@pytest.mark.parametrize(
    ("sync_chunks", "expert_phase"),
    [
        # Rank 1: master 5 s, replica 5 s (gate and up 10/3 s, down 5/3 s), copy 15 s in n chunks. The
        # gate and up projections keep pace with the chunks. After the copy ends, the last chunk's gate
        # and up (10/(3n) s) and the down projection (5/3 s) remain.
        # Expert phase: max(5 + 5, 15/n + 5, 15 + 10/(3n) + 5/3); n = 1 gives max(5, 15) + 5 = 20.
        pytest.param(1, 20.0, id="one_chunk"),
        pytest.param(2, 15.0 + 5.0 / 3.0 + 5.0 / 3.0, id="two_chunks"),
        pytest.param(5, 15.0 + 2.0 / 3.0 + 5.0 / 3.0, id="five_chunks"),
    ],
)
def test_pipelined_replicas_compute_chunks_as_they_arrive(sync_chunks, expert_phase):
    settings = dataclasses.replace(tiny_settings("prefill"), overlap_sync=True, pipeline_replicas=True, sync_chunks=sync_chunks)
    costs = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings, planner_time_s=2.0
    )
    # Rank 1 sets the layer time: dispatch 4 + expert phase + combine 4, against 4 + 10 + 4 = 18 without
    # the sync, so expert_phase - 10 of the sync is exposed (rank 0 takes 17 s).
    assert costs.forward_s.tolist() == [18.0]
    assert costs.sync_s.tolist() == pytest.approx([expert_phase - 10.0])
    assert costs.total_s.tolist() == pytest.approx([2.0 + 18.0 + expert_phase - 10.0])
    with pytest.raises(ValueError, match="pipeline_replicas=True needs overlap_sync=True"):
        CostSettings(pipeline_replicas=True)
    with pytest.raises(TypeError, match="pipeline_replicas must be a bool"):
        CostSettings(overlap_sync=True, pipeline_replicas=1)


def test_overlapped_grad_reduce_hides_behind_backward():
    settings = dataclasses.replace(tiny_settings("train"), overlap_grad_reduce=True)
    costs = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings, planner_time_s=2.0
    )
    # The 30 s reduce runs behind the shortest backward GEMM of any rank: rank 0's 2 x 9 = 18 s (rank 1
    # has 2 x 10). The all-to-all does not cover it. 12 s stay exposed: 108 - 30 + 12.
    assert costs.backward_s.tolist() == [28.0]
    assert costs.grad_reduce_s.tolist() == [12.0]
    assert costs.total_s.tolist() == [90.0]
    assert costs.bytes_moved.tolist() == [240.0]
    prefill = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE,
        dataclasses.replace(tiny_settings("prefill"), overlap_grad_reduce=True), planner_time_s=2.0,
    )
    assert prefill.total_s.tolist() == [35.0]
    with pytest.raises(TypeError, match="overlap_grad_reduce must be a bool"):
        CostSettings(overlap_grad_reduce=1)


def test_default_policies_offer_both_quota_buffers():
    labels = [spec.label for spec in default_policies((1, 2), (2,))]
    assert labels[-4:] == ["quota s=1", "quota s=2", "quota s=1 layer-buffers", "quota s=2 layer-buffers"]
    lifetimes = {spec.label: spec.replica_lifetime for spec in default_policies((2,), (2,), quota_buffers=("layer",))}
    assert lifetimes["quota s=2 layer-buffers"] == "layer"
    assert "quota s=2" not in lifetimes
    with pytest.raises(ValueError, match="quota_buffers must name some of"):
        default_policies((2,), (2,), quota_buffers=("global",))


def test_result_row_lookup_names_policies(small_result):
    with pytest.raises(KeyError, match="policies are"):
        small_result.row("magic")


def test_mean_over_models_rejects_different_policies(small_result):
    result = small_result
    other = dataclasses.replace(result, rows=result.rows[:2])
    with pytest.raises(ValueError, match="same policies in the same order"):
        mean_over_models([result, other])


def test_model_sizes_follow_swiglu():
    model = get_model("deepseek-v3")
    assert model.params_per_expert == 3 * 7168 * 2048
    assert model.bytes_per_expert == 2 * 3 * 7168 * 2048
    assert model.flops_per_assignment == 2 * 3 * 7168 * 2048
    assert {m.num_experts for m in MODELS.values()} == {128, 256, 8}


def test_hidden_backward_traffic_leaves_the_critical_path():
    settings = dataclasses.replace(tiny_settings("train"), hide_backward_replica_traffic=True)
    balanced = layer_costs(
        BALANCED_QUOTA, BALANCED_REPLICAS, SOURCE, TWO_RANK_LAYOUT, TINY_MODEL, TINY_HARDWARE, settings, planner_time_s=2.0
    )
    # 108 s of the hand computation minus the 15 s re-sync and the 30 s gradient reduce.
    assert balanced.total_s.tolist() == [63.0]
    assert balanced.bytes_moved.tolist() == [240.0]
    with pytest.raises(TypeError, match="hide_backward_replica_traffic must be a bool"):
        CostSettings(hide_backward_replica_traffic=1)


def test_copy_cost_settings_follow_model_link_and_sync():
    from ultraep.sim.replay import copy_cost_settings

    model = get_model("mixtral-8x7b")
    workload = Workload(
        loads=torch.zeros(1, 1, 8, 8, dtype=torch.int64), trace_top_k=6, label="w", data_kind="synthetic",
        resampled=False, description="test", tokens_per_rank=4096,
    )
    gb200 = get_hardware("gb200-nvl72")
    # W == F for a bf16 SwiGLU expert, so the cost is achieved FLOP/s over achieved link bytes/s,
    # divided by the assignment scale top_k / trace top-k = 2 / 6.
    expected = round(gb200.peak_flops * 0.7 / (gb200.nvlink_bytes_per_s * 0.8) / (2 / 6))
    assert copy_cost_settings(workload, model, gb200, CostSettings(mode="prefill")) == (
        ("copy_cost", expected), ("copy_overlap", False), ("copy_chunks", 1), ("gemm_passes", 1), ("relay_chunks", 4),
    )
    # Training: three GEMM passes per assignment against one copy per forward.
    training = dict(copy_cost_settings(workload, model, gb200, CostSettings(mode="train")))
    assert training["copy_cost"] == round(gb200.peak_flops * 0.7 / (gb200.nvlink_bytes_per_s * 0.8) / (2 / 6) / 3)
    assert training["gemm_passes"] == 3
    pipelined = CostSettings(overlap_sync=True, pipeline_replicas=True, sync_chunks=8)
    assert dict(copy_cost_settings(workload, model, gb200, pipelined))["copy_chunks"] == 8
    assert dict(copy_cost_settings(workload, model, gb200, pipelined))["relay_chunks"] == 8
    direct = CostSettings(sync_scheme="direct", sync_chunks=8)
    assert dict(copy_cost_settings(workload, model, gb200, direct))["relay_chunks"] == 0
    # An EP group larger than the NVLink domain copies over the network.
    h200 = get_hardware("h200-hgx")
    wide = dataclasses.replace(workload, loads=torch.zeros(1, 1, 16, 16, dtype=torch.int64))
    network_cost = round(h200.peak_flops * 0.7 / (h200.network_bytes_per_s * 0.85) / (2 / 6))
    assert dict(copy_cost_settings(wide, model, h200, CostSettings(mode="prefill")))["copy_cost"] == network_cost


@pytest.mark.parametrize("tokens_per_rank", [32, 4096])
def test_copy_cost_auto_skips_costly_replicas(tmp_path, tokens_per_rank):
    rows = {}
    for copy_cost in ("auto", "off"):
        args = _args(tmp_path, copy_cost=copy_cost, tokens_per_rank=tokens_per_rank, mode="prefill", overlap_sync=True)
        assert run_simulate(args) == 0
        rows[copy_cost] = {row.policy: row for row in read_json(tmp_path / "out.json")[0].rows}
    auto, free = rows["auto"]["quota s=1"], rows["off"]["quota s=1"]
    assert free.replicas_per_layer > 0
    if tokens_per_rank == 32:
        # 32 tokens per rank of Mixtral experts: a 352 MB copy outweighs the whole microbatch's GEMMs.
        assert auto.replicas_per_layer == 0
    assert auto.throughput_pct_of_ideal >= free.throughput_pct_of_ideal


def test_plan_for_models_shares_and_caches(small_plans):
    from ultraep.sim.replay import plan_for_models

    workload, _ = small_plans
    policies = default_policies((1,), (1,))
    models = [get_model("mixtral-8x7b"), get_model("deepseek-v3")]
    hardware, settings = get_hardware("gb200-nvl72"), CostSettings()
    cache: dict = {}
    first = plan_for_models(workload, policies, models, hardware, settings, cache=cache)
    again = plan_for_models(workload, policies, models, hardware, settings, cache=cache)
    for plans, repeat in zip(first, again):
        assert all(a is b for a, b in zip(plans, repeat))  # served from the cache
    for spec, mixtral, deepseek in zip(policies, *first):
        if spec.planner == "quota":
            costs = {dict(p.spec.settings)["copy_cost"] for p in (mixtral, deepseek)}
            assert len(costs) == 2  # top-2 and top-8 models weigh a copy differently
        else:
            assert mixtral is deepseek


def test_quota_setting_replaces_one_copy_setting(tmp_path, capsys):
    # copy_chunks from --quota-setting keeps the automatic copy_cost and copy_overlap.
    args = _args(tmp_path, tokens_per_rank=32, mode="prefill", overlap_sync=True, quota_setting=["copy_chunks=1"])
    assert run_simulate(args) == 0
    assert "quota plans with each model's copy cost (copy_chunks from --quota-setting)" in capsys.readouterr().out
    row = read_json(tmp_path / "out.json")[0].row("quota s=1")
    assert row.replicas_per_layer == 0  # the automatic copy cost still rules out every replica at 32 tokens


def test_copy_chunks_need_copy_overlap():
    with pytest.raises(ValueError, match=r"copy_chunks=8 needs copy_overlap=True"):
        QuotaConfig(copy_cost=10, copy_chunks=8)


def test_csv_keeps_runs_without_copy_bound(tmp_path, small_result):
    # Results read from older JSON files have no copy bound (NaN): their rows must stay one run.
    result = dataclasses.replace(small_result, copy_bound_pct_of_ideal=math.nan)
    write_csv([result], tmp_path / "nan.csv")
    runs = read_csv(tmp_path / "nan.csv")
    assert len(runs) == 1
    assert len(runs[0].rows) == len(result.rows)


def test_lower_bound_below_plans_beating_ideal():
    # Two ranks with two experts each. A rank whose load sits on one expert saves the second
    # instance's weight-read floor, so such a plan beats the ideal. It must not beat the bound.
    from ultraep.sim.cost import layer_time_lower_bound

    layout = ExpertLayout(2, 2, 0)
    source_load = torch.tensor([[40, 40]])
    settings = CostSettings(mode="prefill")
    forward, backward = layer_time_lower_bound(source_load, layout, TINY_MODEL, TINY_HARDWARE, settings)
    ideal = ideal_layer_costs(source_load, layout, TINY_MODEL, TINY_HARDWARE, settings)
    one_expert = layer_costs(
        torch.tensor([[40, 0, 40, 0]]), torch.empty(1, 2, 0, dtype=torch.int64), source_load, layout,
        TINY_MODEL, TINY_HARDWARE, settings,
    )
    assert float(one_expert.total_s[0]) < float(ideal.total_s[0])
    assert float(forward[0] + backward[0]) <= float(one_expert.total_s[0])


def test_quota_setting_chunks_with_implied_overlap():
    from ultraep.cli import parse_quota_settings

    # --copy-cost auto with --overlap-sync supplies copy_overlap=True, which copy_chunks=8 needs.
    assert parse_quota_settings(["copy_chunks=8"], {"copy_overlap": True}) == (("copy_chunks", 8),)
    with pytest.raises(ValueError, match=r"--quota-setting: QuotaConfig.copy_chunks=8 needs copy_overlap=True"):
        parse_quota_settings(["copy_chunks=8"])


def test_resident_planning_skips_repeat_copies():
    # Expert 0 (rank 0) stays hot for 6 microbatches on 4 ranks x 1 expert with 1 slot, while the cold
    # ranks' loads shift, and a copy costs 150 assignments. Both policies copy expert 0 to two ranks
    # in the first microbatch. Later the plain planner picks receivers by their spare and in
    # microbatch 1 moves a replica to a rank whose slot is empty. Given the slots' contents, the
    # planner keeps expert 0 on the ranks that hold it and copies nothing after the first microbatch.
    cold = torch.tensor([[100, 100, 100], [130, 100, 70], [100, 70, 130], [70, 130, 100], [130, 70, 100], [100, 100, 100]])
    expert_load = torch.cat([torch.full((6, 1), 400), cold], dim=1)
    loads = torch.diag_embed(expert_load)[:, None].contiguous()  # [6 microbatches, 1 layer, 4, 4]
    workload = Workload(loads, 1, "persistent hot expert", "synthetic", False, "", 175.0)
    settings = (("copy_cost", 150),)
    plain = PolicySpec("plain", "quota", 1, settings, "layer")
    resident = PolicySpec("resident", "quota", 1, settings, "layer", plan_with_resident=True)
    plain_plans, resident_plans = plan_policies(workload, [plain, resident], progress=False)
    copies = lambda plans: plans.synced.view(6, 4).sum(dim=1).tolist()  # noqa: E731
    assert copies(plain_plans) == [2, 1, 0, 0, 0, 0]
    assert copies(resident_plans) == [2, 0, 0, 0, 0, 0]
    assert bool((resident_plans.replica_expert_ids == resident_plans.replica_expert_ids[0]).all())
    with pytest.raises(ValueError, match="plan_with_resident needs replica_lifetime='layer'"):
        PolicySpec("bad", "quota", 1, (), "microbatch", plan_with_resident=True)


def test_evaluate_rejects_microbatches_without_assignments(small_plans):
    workload, plans = small_plans
    empty = dataclasses.replace(workload, loads=torch.zeros_like(workload.loads))
    with pytest.raises(ValueError, match="hold no assignments, so there is no throughput to compare"):
        evaluate(empty, plans, get_model("deepseek-v3"), get_hardware("gb200-nvl72"), CostSettings(), planner_time_s=FIXED_PLANNER_TIMES)
