"""Time two builds of the compiled quota planner side by side in one process.

Compiles ``ultraep/kernels/quota_plan.c`` and a second source (for example the one of an earlier commit),
checks that both return the same plan on every workload, then alternates calls between them so that
both see the same machine state. Both sources must export ``ultraep_quota_plan`` with the arguments
that ``ultraep.kernels.native`` passes today.

    git show REV:ultraep/kernels/quota_plan.c > /tmp/quota_plan_before.c  # REV: a commit to compare with
    .venv/bin/python benchmarks/planner_ab.py --before /tmp/quota_plan_before.c

Prints a markdown table of median milliseconds per call and the ratio; ``--workload TEXT`` (repeatable)
times only the workloads whose name contains TEXT. A third column times the same
load matrix through ``QuotaPlanner`` (input checks, backend choice, the call and the returned plan, on
the package's own build of today's source), so the next column is the Python work around the C call.
The next column times ``QuotaPlanner`` with ``stop_at_target=True`` in the same loop.

``ultraep_quota_plan`` keeps the arguments of earlier builds and plans without the rotated receiver
lines, which run only with one redundant slot per rank. The last two columns time the packed entry
point that ``QuotaPlanner`` calls, with those lines and without them (its rotation count set to 0),
both through the same ctypes call, so their difference is what the rotated lines cost.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ultraep.kernels import native
from ultraep.layout import ExpertLayout
from ultraep.planners import quota
from ultraep.traces import load_trace, step_loads_to_matrices, zipf_loads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planner_hard import hot_rank_loads  # noqa: E402

QWEN_STEP_LOADS = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "harmoeny_qwen15moe_top1_step_loads.npz"

logger = logging.getLogger("planner_ab")


def compile_library(source: pathlib.Path, folder: pathlib.Path, name: str) -> ctypes._CDLL:
    """Compile ``source`` with the flags the package uses and return its planner function."""
    target = folder / f"{name}.so"
    command = [native._compiler(), *native._COMPILE_FLAGS, str(source), "-o", str(target)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"compiling {source} failed (exit {result.returncode}): {result.stderr.strip()}")
    function = ctypes.CDLL(str(target)).ultraep_quota_plan
    function.restype = ctypes.c_int
    function.argtypes = native._library().ultraep_quota_plan.argtypes
    return function


def bind(function, loads: torch.Tensor, layout: ExpertLayout, config: quota.QuotaConfig):
    """Return a function without arguments that calls ``function`` on one load matrix and returns the filled outputs."""
    slot_expert = torch.empty((layout.num_ranks, layout.redundant_slots_per_rank), dtype=torch.int64)
    slot_quota = torch.empty(layout.num_slots, dtype=torch.int64)
    arguments = native.call_arguments(loads, layout, config, slot_expert, slot_quota)

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        status = function(*arguments)
        if status != 0:
            raise RuntimeError(f"ultraep_quota_plan returned {status} for {layout}")
        return slot_expert, slot_quota

    return call


def bind_packed(loads: torch.Tensor, layout: ExpertLayout, config: quota.QuotaConfig, rotations: bool):
    """Return a function without arguments that calls the packed entry point, with or without the rotated lines."""
    tensors, pointers = native._packed_arguments(layout, config)
    settings = tensors[0].clone()
    if not rotations:
        settings[21] = 0  # num_rotations, after the 21 settings of ultraep_quota_plan and stop_at_target
    slot_expert = torch.empty((layout.num_ranks, layout.redundant_slots_per_rank), dtype=torch.int64)
    slot_quota = torch.empty(layout.num_slots, dtype=torch.int64)
    arguments = (loads.data_ptr(), settings.data_ptr(), *pointers[1:], None, slot_expert.data_ptr(), slot_quota.data_ptr())
    function = native._library().ultraep_quota_plan_packed

    def call() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        status = function(*arguments)
        if status != 0:
            raise RuntimeError(f"ultraep_quota_plan_packed returned {status} for {layout}")
        return slot_expert, slot_quota, settings  # keeps the settings alive with the call

    return call


def workloads():
    """Yield (name, loads, layout, config): the planner benchmark's timing sizes, copy-costed plans, then one-slot hot ranks."""
    for ranks, experts, slots in ((8, 64, 1), (16, 128, 2), (32, 256, 2), (64, 256, 1), (64, 256, 2)):
        loads = zipf_loads(ranks, experts, 8192, 8, 1.0, num_microbatches=1, num_layers=1, seed=2)[0, 0]
        layout = ExpertLayout.from_num_experts(experts, ranks, slots)
        yield f"Zipf(1.0) EP{ranks} x {experts} x {slots}", loads.contiguous(), layout, quota.QuotaConfig()
    training = quota.QuotaConfig(copy_cost=40, copy_overlap=True, copy_chunks=8, gemm_passes=3)
    for slots in (1, 2):
        loads = zipf_loads(64, 64, 4096, 8, 1.0, num_microbatches=1, num_layers=1, seed=3)[0, 0]
        layout = ExpertLayout.from_num_experts(64, 64, slots)
        yield f"Zipf(1.0) EP64 x 64 x {slots}, copy cost 40, training", loads.contiguous(), layout, training
    # Small prefill microbatches, where one copy costs about half a rank's load: 512 tokens per rank with
    # top-8 routing. The copy cost is the one the simulator gives GLM-4.5-Air, Qwen3-235B and DeepSeek-V3
    # in prefill on GB200 NVL72 with the ESFT trace's top-6 routing.
    prefill = quota.QuotaConfig(copy_cost=1823, copy_overlap=True, copy_chunks=8)
    for slots in (1, 2):
        loads = zipf_loads(64, 64, 512, 8, 1.0, num_microbatches=1, num_layers=1, seed=4)[0, 0]
        layout = ExpertLayout.from_num_experts(64, 64, slots)
        yield f"Zipf(1.0) EP64 x 64 x {slots}, 512 tokens, copy cost 1823, prefill", loads.contiguous(), layout, prefill
    # 16 tokens per rank: one copy costs more than the busiest rank's whole load, so no replica pays.
    loads = zipf_loads(64, 64, 16, 8, 1.0, num_microbatches=1, num_layers=1, seed=4)[0, 0]
    yield "Zipf(1.0) EP64 x 64 x 1, 16 tokens, copy cost 1823, prefill", loads.contiguous(), ExpertLayout(64, 1, 1), prefill
    # One slot and hot ranks, where the rotated receiver lines run: top-1 microbatches of
    # benchmarks/planner_hard.py, and a Qwen1.5-MoE step at EP60 with the copy cost the simulator gives
    # GLM-4.5-Air in pipelined prefill on GB200 NVL72.
    for ranks, per_rank, seed in ((8, 4, 113), (10, 6, 265)):
        layout = ExpertLayout(ranks, per_rank, 1)
        yield f"hot ranks {ranks} x {per_rank} x 1, seed {seed}", hot_rank_loads(ranks, per_rank, 1024, seed), layout, quota.QuotaConfig()
    if QWEN_STEP_LOADS.is_file():
        loads = step_loads_to_matrices(load_trace(QWEN_STEP_LOADS), 60)[0, 0].contiguous()
        config = quota.QuotaConfig(copy_cost=304, copy_overlap=True, copy_chunks=8, relay_chunks=8)
        yield "Qwen1.5-MoE step EP60 x 60 x 1, copy cost 304, prefill", loads, ExpertLayout(60, 1, 1), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=pathlib.Path, required=True, help="the other quota_plan.c")
    parser.add_argument("--calls", type=int, default=400, help="timed calls per build and workload")
    parser.add_argument(
        "--workload", action="append", default=[], help="time only the workloads whose name contains this text (repeatable)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.before.is_file():
        raise SystemExit(f"--before {args.before} is not a file; write one with git show REV:ultraep/kernels/quota_plan.c")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        builds = {
            "before": compile_library(args.before, pathlib.Path(folder), "before"),
            "now": compile_library(native._SOURCE, pathlib.Path(folder), "now"),
        }
        logger.info(
            "| workload | before ms (median) | now ms (median) | before / now | QuotaPlanner call ms (median) | call - now (us) "
            "| stop_at_target call ms (median) | packed ms (median) | packed without rotated lines ms (median) |"
        )
        logger.info("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, loads, layout, config in workloads():
            if args.workload and not any(text in name for text in args.workload):
                continue
            calls = {key: bind(function, loads, layout, config) for key, function in builds.items()}
            planner = quota.QuotaPlanner(config, backend="native")
            calls["planner"] = lambda planner=planner, loads=loads, layout=layout: planner(loads, layout)
            stopping = quota.QuotaPlanner(dataclasses.replace(config, stop_at_target=True), backend="native")
            calls["stop"] = lambda planner=stopping, loads=loads, layout=layout: planner(loads, layout)
            calls["packed"] = bind_packed(loads, layout, config, rotations=True)
            calls["unrotated"] = bind_packed(loads, layout, config, rotations=False)
            before = [tensor.clone() for tensor in calls["before"]()]
            now = calls["now"]()
            if not all(torch.equal(a, b) for a, b in zip(before, now)):
                raise SystemExit(f"the two builds return different plans on {name}")
            planned = calls["planner"]()
            packed = calls["packed"]()
            if not (torch.equal(packed[0], planned.replica_expert_ids) and torch.equal(packed[1], planned.quota)):
                raise SystemExit(f"the packed call and QuotaPlanner return different plans on {name}")
            unrotated = calls["unrotated"]()
            if not all(torch.equal(a, b) for a, b in zip(unrotated[:2], now)):
                raise SystemExit(f"the packed call without rotated lines and ultraep_quota_plan differ on {name}")
            times: dict[str, list[float]] = {key: [] for key in calls}
            orders = (
                ("before", "now", "planner", "stop", "packed", "unrotated"),
                ("unrotated", "packed", "stop", "planner", "now", "before"),
            )
            for index in range(args.calls + 10):
                for key in orders[index % 2]:
                    start = time.perf_counter()
                    calls[key]()
                    if index >= 10:
                        times[key].append(time.perf_counter() - start)
            before_ms, now_ms, planner_ms, stop_ms, packed_ms, unrotated_ms = (
                statistics.median(times[key]) * 1e3 for key in ("before", "now", "planner", "stop", "packed", "unrotated")
            )
            logger.info(
                f"| {name} | {before_ms:.3f} | {now_ms:.3f} | {before_ms / now_ms:.2f}x | {planner_ms:.3f} | "
                f"{(planner_ms - now_ms) * 1e3:.1f} | {stop_ms:.3f} | {packed_ms:.3f} | {unrotated_ms:.3f} |"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
