"""The compiled C quota planner against the PyTorch reference, and its build and fallback paths."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ultraep.kernels import native, plan_quota, resolve_backend
from ultraep.kernels.native import native_available, native_library_path, native_unavailable_reason, plan_quota_native
from ultraep.layout import MAX_TOTAL_LOAD, ExpertLayout
from ultraep.plan import check_plan
from ultraep.planners import quota as quota_module
from ultraep.planners.quota import QuotaConfig, QuotaPlanner, plan_reference

pytestmark = pytest.mark.skipif(not native_available(), reason=f"native planner unavailable: {native_unavailable_reason()}")

CONFIGS = [
    QuotaConfig(),
    QuotaConfig(balance_target=1.0, prefer_local=False),
    QuotaConfig(balance_target=1.05, min_replica_quota=3, min_replica_fraction=0.01),
    QuotaConfig(num_rounds=1),
    QuotaConfig(num_rounds=9, min_replica_fraction=0.0),
    QuotaConfig(copy_cost=40),
    QuotaConfig(copy_cost=150, copy_overlap=True),
    QuotaConfig(copy_cost=600, copy_overlap=True, copy_chunks=8, balance_target=1.0, relay_chunks=8),
    QuotaConfig(copy_cost=300, relay_chunks=1),
    QuotaConfig(copy_cost=120, copy_overlap=True, relay_chunks=0),
    QuotaConfig(stop_at_target=True),
    QuotaConfig(stop_at_target=True, balance_target=1.02, copy_cost=150, copy_overlap=True),
]


def _assert_same(loads, layout, config):
    expected = plan_reference(loads, layout, config)
    got = plan_quota_native(loads, layout, config)
    assert got.replica_expert_ids.dtype == torch.int64
    assert got.quota.dtype == torch.int64
    assert torch.equal(got.replica_expert_ids, expected.replica_expert_ids), (layout, config)
    assert torch.equal(got.quota, expected.quota), (layout, config)
    check_plan(got, loads, min_replica_quota=config.min_replica_quota)
    return got


def _hot_ranks(num_ranks, experts_per_rank, seed):
    """Top-1-like loads with one or two hot ranks, where one slot per rank is tightest: 1,000 tokens per
    rank on average, with the hot ranks' experts 4-34 times as popular."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = num_ranks * experts_per_rank
    weights = torch.rand(num_experts, generator=gen) ** 3
    for rank in torch.randint(0, num_ranks, (1 + seed % 2,), generator=gen).tolist():
        hot = slice(rank * experts_per_rank, (rank + 1) * experts_per_rank)
        weights[hot] *= 4 + 30 * torch.rand(experts_per_rank, generator=gen)
    rates = weights / weights.sum() * 1000 * num_ranks
    loads = torch.zeros(num_ranks, num_experts, dtype=torch.int64)
    loads[0] = torch.poisson(rates, generator=gen).to(torch.int64)
    return loads


def _skewed(num_ranks, num_experts, seed, power=6.0, scale=100.0):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_experts, generator=gen) ** power
    return torch.poisson(weights[None].expand(num_ranks, num_experts) * scale, generator=gen).to(torch.int64)


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize(
    "shape",
    [(2, 1, 1), (3, 2, 1), (4, 8, 2), (8, 4, 3), (16, 16, 1), (32, 4, 4), (64, 4, 2), (64, 2, 1), (5, 7, 2)],
    ids=str,
)
def test_native_matches_reference_on_skewed_loads(shape, config):
    layout = ExpertLayout(*shape)
    for seed in range(3):
        _assert_same(_skewed(layout.num_ranks, layout.num_experts, seed), layout, config)


@pytest.mark.parametrize("shape", [(4, 4, 1), (16, 8, 2), (64, 4, 4)], ids=str)
def test_native_matches_reference_on_adversarial_loads(shape):
    layout = ExpertLayout(*shape)
    num_ranks, num_experts = layout.num_ranks, layout.num_experts
    one_hot = torch.zeros(num_ranks, num_experts, dtype=torch.int64)
    one_hot[:, num_experts // 3] = 1000
    one_rank_hot = torch.zeros(num_ranks, num_experts, dtype=torch.int64)
    one_rank_hot[:, : layout.experts_per_rank] = 7
    big = MAX_TOTAL_LOAD // (num_ranks * num_experts)
    cases = {
        "all_zero": torch.zeros(num_ranks, num_experts, dtype=torch.int64),
        "equal": torch.full((num_ranks, num_experts), 5, dtype=torch.int64),
        "one_hot": one_hot,
        "one_rank_hot": one_rank_hot,
        "single_assignment": torch.nn.functional.one_hot(torch.tensor([1]), num_experts).expand(num_ranks, -1) * (torch.arange(num_ranks)[:, None] == 0),
        "near_max_total": torch.full((num_ranks, num_experts), big, dtype=torch.int64) * (torch.arange(num_experts) % 3 == 0),
        "ties": torch.arange(num_experts).remainder(2).expand(num_ranks, -1) * 11,
    }
    for name, loads in cases.items():
        for config in CONFIGS[:3]:
            _assert_same(loads.contiguous().to(torch.int64), layout, config)


@pytest.mark.parametrize("shape", [(10, 6, 1), (8, 4, 1), (16, 4, 1)], ids=str)
def test_native_matches_reference_on_hot_rank_loads(shape):
    # One slot and one or two hot ranks: the loads where the rotated receiver lines can decide the plan.
    layout = ExpertLayout(*shape)
    for seed in range(12):
        loads = _hot_ranks(layout.num_ranks, layout.experts_per_rank, seed)
        for config in [QuotaConfig(balance_target=1.0), QuotaConfig()] + ([CONFIGS[7], CONFIGS[11]] if seed < 4 else []):
            _assert_same(loads, layout, config)


def test_hot_rank_loads_reach_rotated_lines(monkeypatch):
    # Guards the test above: at 10 x 6 a rotated line gives the plan on some of its loads (seeds 4, 8
    # and 9 of the first 12), so the C rotations are compared with the reference's.
    layout = ExpertLayout(10, 6, 1)
    loads = [_hot_ranks(10, 6, seed) for seed in range(12)]
    plans = [plan_reference(matrix, layout, QuotaConfig()) for matrix in loads]
    monkeypatch.setattr(quota_module, "_num_rotations", lambda slots: 0)
    unrotated = [plan_reference(matrix, layout, QuotaConfig()) for matrix in loads]
    changed = [seed for seed, (a, b) in enumerate(zip(plans, unrotated, strict=True)) if not torch.equal(a.quota, b.quota)]
    assert changed == [4, 8, 9]


def test_rotated_lines_with_stop_and_resident(monkeypatch):
    # Rotated lines beside the other late rules, in C as in the reference: on seed 18 a rotated line
    # wins with balance_target 1.02, and stop_at_target leaves it out after a good first-drain plan.
    # On seed 4 a rotated line wins with a resident table too.
    layout = ExpertLayout(10, 6, 1)
    resident = ((torch.arange(10) + 1) % 10 * 6)[:, None]  # each rank's slot contains the next rank's first expert
    cases = [
        (_hot_ranks(10, 6, 18), QuotaConfig(balance_target=1.02), None),
        (_hot_ranks(10, 6, 18), QuotaConfig(balance_target=1.02, stop_at_target=True), None),
        (_hot_ranks(10, 6, 4), QuotaConfig(), resident),
    ]
    plans = []
    for loads, config, table in cases:
        expected = plan_reference(loads, layout, config, table)
        got = plan_quota_native(loads, layout, config, table)
        assert torch.equal(got.quota, expected.quota), config
        assert torch.equal(got.replica_expert_ids, expected.replica_expert_ids), config
        plans.append(expected)
    monkeypatch.setattr(quota_module, "_num_rotations", lambda slots: 0)
    unrotated = [plan_reference(loads, layout, config, table) for loads, config, table in cases]
    assert not torch.equal(plans[0].quota, unrotated[0].quota)  # a rotated line wins
    assert torch.equal(plans[1].quota, unrotated[1].quota)  # stop_at_target leaves the rotated lines out
    assert not torch.equal(plans[2].quota, unrotated[2].quota)  # a rotated line wins beside the resident family


COPY_BOUND_CONFIGS = [
    dict(copy_overlap=True, copy_chunks=8, relay_chunks=8),
    dict(copy_overlap=True, copy_chunks=4, gemm_passes=3),
    dict(),
    dict(gemm_passes=3, relay_chunks=1),
    dict(copy_overlap=True, relay_chunks=16),
]


@pytest.mark.parametrize("settings", COPY_BOUND_CONFIGS, ids=range(len(COPY_BOUND_CONFIGS)))
@pytest.mark.parametrize("shape", [(16, 4, 1), (64, 1, 1), (32, 2, 2), (60, 1, 1)], ids=str)
def test_native_matches_reference_when_copies_dominate(shape, settings):
    """Small skewed microbatches with copies as costly as a good part of a rank's load. Most candidates
    then cost more than the best plan after their first rounds, and the compiled planner stops them early."""
    layout = ExpertLayout(*shape)
    for seed in range(2):
        loads = _skewed(layout.num_ranks, layout.num_experts, seed=seed + 10, power=3.0, scale=4.0)
        mean = max(1, int(loads.sum()) // layout.num_ranks)
        for share in (0.05, 0.3, 1.5):
            _assert_same(loads, layout, QuotaConfig(copy_cost=max(1, int(share * mean)), **settings))


@pytest.mark.parametrize("settings", [dict(), dict(copy_overlap=True, copy_chunks=8, relay_chunks=8), dict(stop_at_target=True)], ids=range(3))
@pytest.mark.parametrize("shape", [(16, 4, 1), (64, 1, 2), (8, 2, 1)], ids=str)
def test_costly_copies_keep_masters_only(shape, settings):
    """With copy_cost above the largest rank load no replica pays for its copy, and the compiled planner
    returns the masters-only plan without a search. The reference searches and must agree, also at the
    boundary copy_cost == largest rank load and on balanced loads, where masters-only meets the target."""
    layout = ExpertLayout(*shape)
    skewed = _skewed(layout.num_ranks, layout.num_experts, seed=3, power=3.0, scale=0.5)
    balanced = torch.full((layout.num_ranks, layout.num_experts), 2, dtype=torch.int64)
    for loads in (skewed, balanced):
        top = int(loads.sum(dim=0).view(layout.num_ranks, -1).sum(dim=1).max())
        for copy_cost in (top // 4, top - 1, top, top + 1, 3 * top):
            got = _assert_same(loads, layout, QuotaConfig(copy_cost=max(1, copy_cost), **settings))
            if copy_cost > top and loads is skewed:
                assert int(got.num_replicas()) == 0, (copy_cost, top)


@pytest.mark.parametrize("shape, seed, target", [((8, 8, 1), 22, 1.01), ((16, 4, 1), 12, 1.03)], ids=str)
def test_stop_at_target_skips_late_candidates(shape, seed, target):
    """After a first-drain plan at or below the target, stop_at_target leaves out the second drain and
    best fit. On these loads one of their plans would win otherwise."""
    layout = ExpertLayout(*shape)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(layout.num_experts, generator=gen) ** 4
    loads = torch.poisson(weights[None].expand(layout.num_ranks, -1) * 60, generator=gen).to(torch.int64)
    _assert_same(loads, layout, QuotaConfig(stop_at_target=True, balance_target=target))


@st.composite
def layouts_and_loads(draw):
    layout = ExpertLayout(draw(st.integers(2, 20)), draw(st.integers(1, 6)), draw(st.integers(1, 4)))
    shape = (layout.num_ranks, layout.num_experts)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["random", "sparse", "huge", "skewed"]))
    if kind == "random":
        loads = torch.randint(0, 200, shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.8)
    elif kind == "sparse":
        loads = (torch.rand(shape, generator=gen) < 0.05).to(torch.int64) * torch.randint(1, 4, shape, generator=gen)
    elif kind == "huge":
        loads = torch.randint(0, 2**24, shape, generator=gen)
    else:
        loads = _skewed(*shape, seed=int(torch.randint(0, 1000, (1,), generator=gen)), power=draw(st.floats(1.0, 12.0)))
    config = draw(st.sampled_from(CONFIGS))
    return layout, loads.to(torch.int64), config


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts_and_loads())
def test_native_matches_reference_property(case):
    layout, loads, config = case
    _assert_same(loads, layout, config)


def test_native_accepts_non_contiguous_and_narrow_dtypes():
    layout = ExpertLayout(8, 4, 2)
    loads = _skewed(8, 32, seed=5)
    expected = plan_reference(loads, layout, QuotaConfig())
    assert bool((expected.replica_expert_ids >= 0).any())
    for variant in (loads.t().contiguous().t(), loads.to(torch.int32), loads.to(torch.int16)):
        got = plan_quota_native(variant, layout, QuotaConfig())
        assert torch.equal(got.quota, expected.quota), variant.dtype
        assert torch.equal(got.replica_expert_ids, expected.replica_expert_ids), variant.dtype


def test_masters_only_layouts_return_masters_only_plans():
    for shape in [(1, 8, 2), (8, 4, 0)]:
        layout = ExpertLayout(*shape)
        loads = _skewed(layout.num_ranks, layout.num_experts, seed=1)
        got = plan_quota_native(loads, layout, QuotaConfig())
        assert bool((got.replica_expert_ids == -1).all())
        assert torch.equal(got.quota.view(layout.num_ranks, -1)[:, : layout.experts_per_rank].reshape(-1), loads.sum(0))


def test_planner_and_dispatch_use_native_on_cpu():
    layout = ExpertLayout(16, 4, 2)
    loads = _skewed(16, 64, seed=3)
    assert resolve_backend("auto", "cpu", "plan") == "native"
    assert resolve_backend("native", "cpu", "plan") == "native"
    assert resolve_backend("native", "cpu", "reroute") == "torch"
    expected = plan_reference(loads, layout, QuotaConfig())
    for plan in (
        QuotaPlanner()(loads, layout),
        QuotaPlanner(backend="native")(loads, layout),
        plan_quota(loads, layout, backend="native", check_values=True),
    ):
        assert torch.equal(plan.quota, expected.quota)
        assert torch.equal(plan.replica_expert_ids, expected.replica_expert_ids)


def _calls_that_plan_natively(loads, layout):
    """Return every public way to plan CPU loads with the compiled planner, value checks on or off."""
    return {
        "plan_quota_native": lambda: plan_quota_native(loads, layout, QuotaConfig()),
        "planner": lambda: QuotaPlanner()(loads, layout),
        "planner_unchecked": lambda: QuotaPlanner(backend="native")(loads, layout, check_values=False),
        "plan_quota_unchecked": lambda: plan_quota(loads, layout, backend="native", check_values=False),
        "plan_quota_checked": lambda: plan_quota(loads, layout, backend="auto", check_values=True),
    }


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        pytest.param((1, 3, -5), r"loads\[1, 3\] = -5 is negative", id="negative"),
        pytest.param((2, 0, MAX_TOTAL_LOAD + 1), rf"loads\[2, 0\] = {MAX_TOTAL_LOAD + 1} exceeds {MAX_TOTAL_LOAD}", id="entry_too_large"),
        pytest.param((0, 1, -(2**62)), r"loads\[0, 1\] = -4611686018427387904 is negative", id="hugely_negative"),
    ],
)
def test_native_rejects_bad_values(entry, pattern):
    # The C planner checks the values while it sums them, so the host skips its own pass. The error is
    # the one check_load_matrix raises, with check_values on or off.
    layout = ExpertLayout(4, 2, 1)
    loads = torch.ones(4, 8, dtype=torch.int64)
    loads[entry[0], entry[1]] = entry[2]
    for call in _calls_that_plan_natively(loads, layout).values():
        with pytest.raises(ValueError, match=pattern):
            call()
    # The masters-only shortcut never reaches the C code and checks on the host.
    with pytest.raises(ValueError, match=pattern):
        plan_quota_native(loads, ExpertLayout(4, 2, 0), QuotaConfig())


def test_native_checks_total_load():
    layout = ExpertLayout(4, 2, 1)
    at_limit = torch.zeros(4, 8, dtype=torch.int64)
    at_limit[0, 0] = MAX_TOTAL_LOAD // 2
    at_limit[3, 7] = MAX_TOTAL_LOAD - MAX_TOTAL_LOAD // 2
    one_entry = torch.zeros(4, 8, dtype=torch.int64)
    one_entry[1, 2] = MAX_TOTAL_LOAD  # the largest entry allowed, which takes the C code's exact check
    for loads in (at_limit, one_entry):
        for call in _calls_that_plan_natively(loads, layout).values():
            assert int(call().quota.sum()) == MAX_TOTAL_LOAD
    over = at_limit.clone()
    over[2, 5] = 1
    for call in _calls_that_plan_natively(over, layout).values():
        with pytest.raises(ValueError, match=rf"total load {MAX_TOTAL_LOAD + 1} of loads exceeds {MAX_TOTAL_LOAD}"):
            call()


def test_packed_call_matches_full_call(monkeypatch):
    # plan_quota_native calls the C planner with its settings packed into one array. The benchmark's
    # A/B timing calls it with all 28 arguments, which plan without the rotated receiver lines. With
    # two or more slots those never run, so both calls must run the same planner.
    library = native._library()
    for shape, config in [((8, 4, 2), QuotaConfig()), ((16, 2, 2), CONFIGS[7]), ((5, 7, 3), CONFIGS[4])]:
        layout = ExpertLayout(*shape)
        loads = _skewed(layout.num_ranks, layout.num_experts, seed=11)
        slot_expert = torch.empty(layout.num_ranks, layout.redundant_slots_per_rank, dtype=torch.int64)
        quota = torch.empty(layout.num_slots, dtype=torch.int64)
        assert library.ultraep_quota_plan(*native.call_arguments(loads, layout, config, slot_expert, quota)) == 0
        packed = plan_quota_native(loads, layout, config)
        assert torch.equal(packed.quota, quota), shape
        assert torch.equal(packed.replica_expert_ids, slot_expert), shape
        assert torch.equal(quota, plan_reference(loads, layout, config).quota), shape
    # With one slot the full call plans as the reference does without the rotated lines.
    layout = ExpertLayout(10, 6, 1)
    loads = _hot_ranks(10, 6, seed=4)  # where a rotated line gives the reference's plan
    full = []
    for config in (QuotaConfig(), CONFIGS[7]):
        slot_expert = torch.empty(10, 1, dtype=torch.int64)
        quota = torch.empty(layout.num_slots, dtype=torch.int64)
        assert library.ultraep_quota_plan(*native.call_arguments(loads, layout, config, slot_expert, quota)) == 0
        full.append((config, slot_expert, quota))
    monkeypatch.setattr(quota_module, "_num_rotations", lambda slots: 0)
    for config, slot_expert, quota in full:
        unrotated = plan_reference(loads, layout, config)
        assert torch.equal(quota, unrotated.quota), config
        assert torch.equal(slot_expert, unrotated.replica_expert_ids), config


def test_call_arguments_rejects_stop_at_target():
    layout = ExpertLayout(4, 2, 1)
    loads = _skewed(4, 8, seed=1)
    slot_expert = torch.empty((4, 1), dtype=torch.int64)
    quota = torch.empty(layout.num_slots, dtype=torch.int64)
    with pytest.raises(ValueError, match="no stop_at_target argument"):
        native.call_arguments(loads, layout, QuotaConfig(stop_at_target=True), slot_expert, quota)


def test_native_backend_rejects_other_devices():
    with pytest.raises(RuntimeError, match="backend='native' runs on CPU tensors only, got tensors on meta"):
        resolve_backend("native", "meta", "plan")
    with pytest.raises(ValueError, match="takes CPU tensors, got loads on meta"):
        plan_quota_native(torch.zeros(2, 2, dtype=torch.int64, device="meta"), ExpertLayout(2, 1, 1), QuotaConfig())


def test_library_is_cached_under_cache_dir(tmp_path):
    env = dict(os.environ, ULTRAEP_CACHE_DIR=str(tmp_path))
    code = (
        "from ultraep.kernels.native import native_available, native_library_path\n"
        "print(native_available(), native_library_path())\n"
    )
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.startswith("True " + str(tmp_path)), first.stdout + first.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1, built
    assert built[0].endswith(".so"), built
    # A second process loads the cached file and leaves no partial build behind.
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert second.stdout.startswith("True ")
    assert sorted(p.name for p in tmp_path.iterdir()) == built
    assert native_library_path().name == built[0]


def test_without_compiler_auto_falls_back_and_native_raises(tmp_path):
    env = dict(os.environ, ULTRAEP_CACHE_DIR=str(tmp_path), PATH=str(tmp_path))
    env.pop("CC", None)
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from ultraep.kernels import plan_quota, resolve_backend\n"
        "from ultraep.layout import ExpertLayout\n"
        "from ultraep.planners.quota import QuotaPlanner\n"
        "loads = torch.tensor([[9, 1, 1, 1], [0, 0, 0, 0]])\n"
        "print('auto:', resolve_backend('auto', 'cpu', 'plan'))\n"
        "print('quota:', QuotaPlanner()(loads, ExpertLayout(2, 2, 1)).quota.tolist())\n"
        "try:\n"
        "    plan_quota(loads, ExpertLayout(2, 2, 1), backend='native')\n"
        "except RuntimeError as error:\n"
        "    print('native:', error)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "auto: torch" in proc.stdout
    assert "quota: [5, 1, 0, 1, 1, 4]" in proc.stdout
    assert "native: backend='native' needs the compiled C planner, which is unavailable: no C compiler found" in proc.stdout
    assert "RuntimeWarning: native quota planner unavailable, the PyTorch reference plans on the CPU" in proc.stderr
    assert "WARNING:ultraep.kernels.native:native quota planner unavailable" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_cc_is_reported_not_skipped(tmp_path):
    env = dict(os.environ, ULTRAEP_CACHE_DIR=str(tmp_path), CC="/nonexistent/cc")
    code = (
        "import warnings\n"
        "warnings.simplefilter('error')\n"
        "from ultraep.kernels.native import native_available\n"
        "try:\n"
        "    native_available()\n"
        "except RuntimeWarning as warning:\n"
        "    print('warned:', warning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "warned: native quota planner unavailable" in proc.stdout
    assert "CC='/nonexistent/cc' is not an executable on PATH; point CC at a C compiler or unset it" in proc.stdout


@pytest.mark.skipif(not native_available(), reason=f"native planner unavailable: {native_unavailable_reason()}")
@pytest.mark.parametrize("shape", [(4, 2, 1), (8, 4, 2), (16, 1, 4), (60, 1, 4)], ids=str)
@pytest.mark.parametrize(
    "settings",
    [{}, {"copy_cost": 300}, {"copy_cost": 1200, "copy_overlap": True, "copy_chunks": 8, "relay_chunks": 8},
     {"copy_cost": 400, "copy_overlap": True, "gemm_passes": 3, "relay_chunks": 0}, {"copy_cost": 90, "stop_at_target": True}],
    ids=range(5),
)
def test_native_matches_reference_with_resident_replicas(shape, settings):
    # Skewed loads whose hot experts are resident in most slots, partly on the ranks the plan wants and
    # partly elsewhere. The early stop and the costed peak must skip exactly the copies the reference skips.
    num_ranks, experts_per_rank, slots = shape
    layout = ExpertLayout(num_ranks, experts_per_rank, slots)
    config = QuotaConfig(**settings)
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.rand(layout.num_experts, generator=generator) ** 5
        loads = torch.stack([
            torch.bincount(torch.multinomial(weight, 2000, True, generator=generator), minlength=layout.num_experts)
            for _ in range(num_ranks)
        ])
        hot = torch.argsort(weight, descending=True)[:3]
        expert = hot[torch.randint(0, 3, (num_ranks, slots), generator=generator)]
        own = expert // experts_per_rank == torch.arange(num_ranks)[:, None]
        resident = torch.where(own | (torch.rand(num_ranks, slots, generator=generator) < 0.3), -1, expert)
        expected = plan_reference(loads, layout, config, resident)
        got = plan_quota_native(loads, layout, config, resident)
        assert torch.equal(got.replica_expert_ids, expected.replica_expert_ids), seed
        assert torch.equal(got.quota, expected.quota), seed
