"""Planner benchmark: balance, replicas, locality and CPU time of every planner, side by side in one run.

Run from the repository root (reads real traces from ../shared/traces when present):

    python benchmarks/planner.py --out docs/benchmarks_planner.md

Prints the configuration and the result tables, and writes them as markdown to --out.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

from ultraep.evaluate import evaluate_planner, format_table
from ultraep.layout import ExpertLayout
from ultraep.planners.milp import solve_milp
from ultraep.planners.quota import load_floor
from ultraep.planners.registry import make_planner
from ultraep.traces import (
    load_bundled_trace,
    load_trace,
    microbatch_loads,
    moving_hot_loads,
    step_loads_to_matrices,
    zipf_loads,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO_ROOT.parent / "shared" / "traces"

POLICIES = {
    "none": lambda: make_planner("none"),
    "eplb (previous microbatch)": lambda: make_planner("eplb", window=1, interval=1),
    "eplb (current microbatch)": lambda: make_planner("eplb", window=1, interval=1, use_current=True),
    "pairing": lambda: make_planner("pairing"),
    "quota": lambda: make_planner("quota"),
}


def token_trace_loads(trace, ranks: int, max_microbatches: int):
    """Largest power-of-two tokens per rank (up to 4096) that gives two microbatches at this EP size."""
    fit = trace.num_tokens // (2 * ranks)
    tokens_per_rank = min(4096, 2 ** int(math.log2(fit)))
    sliced = microbatch_loads(trace, ranks, tokens_per_rank)
    return sliced.loads[:max_microbatches], f"{tokens_per_rank} tokens/rank, {sliced.description}"


def workloads(args):
    """Yield (name, loads [microbatches, layers, ranks, experts], note)."""
    traces = []
    if SHARED_TRACES.is_dir():
        traces.append(("ESFT DeepSeek-V2-Lite (token)", load_trace(SHARED_TRACES / "esft_dsv2lite_token_routing.npz")))
    else:
        traces.append(("ESFT DeepSeek-V2-Lite (bundled token trace)", load_bundled_trace()))
    for name, trace in traces:
        for ranks in (8, 16, 32, 64):
            loads, note = token_trace_loads(trace, ranks, args.microbatches)
            yield f"{name}, EP{ranks}", loads, note
    step_files = [
        ("HarMoEny Qwen1.5-MoE top-1 (step loads)", "harmoeny_qwen15moe_top1_step_loads.npz", (10, 20, 30, 60)),
        ("HarMoEny Switch-base-128 (step loads)", "harmoeny_switch128_step_loads.npz", (8, 16, 32, 64)),
        ("OLMoE (aggregate loads)", "olmoe_repo_olmoe_aggregate_loads.npz", (8, 16, 32, 64)),
        ("Mixtral-8x7B (aggregate loads)", "olmoe_repo_mixtral_aggregate_loads.npz", (8,)),
    ]
    for name, file, sizes in step_files:
        path = SHARED_TRACES / file
        if not path.is_file():
            print(f"skipped {name}: {path} not found", file=sys.stderr)
            continue
        trace = load_trace(path)
        for ranks in sizes:
            # Steps hold global per-expert counts; each is split evenly over source ranks.
            loads = step_loads_to_matrices(trace, ranks)[:: max(1, trace.num_steps // args.steps)][: args.steps]
            yield f"{name}, EP{ranks}", loads, f"{loads.shape[0]} steps, global counts split evenly over ranks"
    for ranks, experts in ((8, 64), (16, 128), (32, 256), (64, 256)):
        loads = zipf_loads(ranks, experts, 4096, 8, 1.0, num_microbatches=args.microbatches, num_layers=4, seed=0)
        yield f"synthetic Zipf(1.0), EP{ranks} x {experts} experts", loads, "4096 tokens/rank, top-8, seed 0"
        loads = moving_hot_loads(ranks, experts, 4096, 8, num_microbatches=args.microbatches, num_layers=4, seed=0)
        yield f"synthetic moving hot experts, EP{ranks} x {experts} experts", loads, "4096 tokens/rank, top-8, 2 hot experts x8, seed 0"


def balance_section(args, out: list[str]) -> None:
    out.append("## Balance, replicas and locality\n")
    summary = {}
    for name, loads, note in workloads(args):
        num_experts, ranks = loads.shape[-1], loads.shape[-2]
        results = []
        for slots in (1, 2):
            layout = ExpertLayout.from_num_experts(num_experts, ranks, slots)
            for policy, factory in POLICIES.items():
                if policy == "none" and slots == 2:
                    continue
                result = evaluate_planner(policy, factory, loads, layout)
                results.append(result)
                summary.setdefault((policy, slots), []).append(result)
        out.append(f"### {name}\n\n{note}\n\n{format_table(results)}\n")
        print(f"{name}: done", file=sys.stderr)
    out.append("### Mean over all workloads above\n")
    out.append("| policy | slots | imbalance after (mean of means) | worst | replicas/layer per rank | local share |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (policy, slots), rows in summary.items():
        out.append(
            f"| {policy} | {slots} | {statistics.fmean(r.imbalance_after_mean for r in rows):.4f} | "
            f"{max(r.imbalance_after_max for r in rows):.4f} | "
            f"{statistics.fmean(r.replicas_per_layer / r.num_ranks for r in rows):.3f} | "
            f"{statistics.fmean(r.local_share for r in rows):.3f} |"
        )
    out.append("")


def milp_cases(args) -> tuple[list, torch.Tensor | None]:
    """Return the sampled MILP instances as (name, loads) pairs, and every Qwen1.5-MoE EP10 step matrix (or None)."""
    trace = load_trace(SHARED_TRACES / "esft_dsv2lite_token_routing.npz") if SHARED_TRACES.is_dir() else load_bundled_trace()
    cases = []
    for ranks in (8, 16):
        loads, _ = token_trace_loads(trace, ranks, 1)
        cases += [(f"ESFT EP{ranks} x 64 layer {layer}", loads[0, layer]) for layer in range(0, loads.shape[1], args.milp_layer_step)]
    synthetic = zipf_loads(16, 64, 2048, 8, 1.2, num_microbatches=1, num_layers=args.milp_synthetic, seed=1)
    cases += [(f"Zipf(1.2) EP16 x 64 #{i}", synthetic[0, i]) for i in range(synthetic.shape[1])]
    qwen_path = SHARED_TRACES / "harmoeny_qwen15moe_top1_step_loads.npz"
    if not qwen_path.is_file():
        return cases, None
    # Real per-step loads with one very hot expert: every k-th (step, layer) matrix at EP10.
    matrices = step_loads_to_matrices(load_trace(qwen_path), 10).flatten(0, 1)
    stride = max(1, matrices.shape[0] // args.milp_step_loads) + 1  # + 1 steps through the layers too
    cases += [(f"Qwen1.5-MoE EP10 x 60 #{i}", matrices[i]) for i in range(0, matrices.shape[0], stride)][: args.milp_step_loads]
    return cases, matrices


def hardest_cases(matrices: torch.Tensor, slots: int, count: int) -> tuple[list, list[float], list[float]]:
    """Return the ``count`` matrices that quota (balance_target=1.0) balances worst, and two ratios per matrix.

    The ratios are quota's max rank load over two lower bounds of the optimum: the rounded-up mean rank
    load and the load floor (:func:`ultraep.planners.quota.load_floor`), which is at least the mean.
    The hardest matrices are those with the highest ratio to the floor.
    """
    num_ranks = matrices.shape[1]
    layout = ExpertLayout.from_num_experts(matrices.shape[2], num_ranks, slots)
    planner = make_planner("quota", balance_target=1.0)
    peaks = [int(planner(matrix, layout).rank_load().max()) for matrix in matrices]
    to_mean = [peak / max(1, -(-int(matrix.sum()) // num_ranks)) for peak, matrix in zip(peaks, matrices)]
    to_floor = [peak / max(1, int(load_floor(matrix, layout))) for peak, matrix in zip(peaks, matrices)]
    worst = sorted(range(len(to_floor)), key=lambda i: (-to_floor[i], i))[:count]
    return [(f"Qwen1.5-MoE EP10 x 60 #{i}", matrices[i]) for i in worst], to_mean, to_floor


def milp_section(args, out: list[str]) -> None:
    out.append("## Gap to the exact optimum (MILP, HiGHS)\n")
    sample, qwen_matrices = milp_cases(args)
    out.append("| instances | slots | count | quota / optimum (mean) | worst | optimum proven | quota replicas | MILP replicas | MILP seconds (median) |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    mean_bound_rows = []
    for slots in (1, 2):
        sets = [("sample", sample, args.milp_time_limit)]
        if qwen_matrices is not None and args.milp_hardest > 0:
            hardest, to_mean, to_floor = hardest_cases(qwen_matrices, slots, args.milp_hardest)
            sets.append((f"hardest Qwen1.5-MoE EP10 of {qwen_matrices.shape[0]}", hardest, args.milp_hardest_time_limit))
            for bound, ratios in (("rounded-up mean", to_mean), ("load floor", to_floor)):
                mean_bound_rows.append(
                    f"| {slots} | {bound} | {len(ratios)} | {statistics.fmean(ratios):.4f} | {max(ratios):.4f} | "
                    f"{sum(ratio > 1.005 for ratio in ratios)} | {sum(ratio > 1.01 for ratio in ratios)} |"
                )
        for set_name, cases, time_limit in sets:
            ratios, proven, quota_replicas, milp_replicas, seconds = [], 0, [], [], []
            for _, matrix in cases:
                layout = ExpertLayout.from_num_experts(matrix.shape[1], matrix.shape[0], slots)
                plan = make_planner("quota", balance_target=1.0)(matrix, layout)
                start = time.perf_counter()
                exact = solve_milp(matrix, layout, time_limit=time_limit)
                seconds.append(time.perf_counter() - start)
                proven += exact.status == "optimal"
                ratios.append(int(plan.rank_load().max()) / max(1, exact.lower_bound))
                quota_replicas.append(int(plan.num_replicas()))
                milp_replicas.append(exact.num_replicas)
            out.append(
                f"| {set_name} | {slots} | {len(cases)} | {statistics.fmean(ratios):.4f} | {max(ratios):.4f} | {proven}/{len(cases)} | "
                f"{statistics.fmean(quota_replicas):.1f} | {statistics.fmean(milp_replicas):.1f} | {statistics.median(seconds):.2f} |"
            )
            print(f"MILP {set_name}, slots={slots}: done", file=sys.stderr)
    out.append(
        "\nquota / optimum divides the quota planner's max rank load (balance_target=1.0) by the MILP's proven lower "
        "bound, so a solve stopped at its time limit can only overstate the gap. The sample is every "
        f"{args.milp_layer_step}th ESFT layer at EP8 and EP16, {args.milp_synthetic} Zipf(1.2) matrices and "
        f"{args.milp_step_loads} evenly spaced Qwen1.5-MoE EP10 step matrices. The hardest set takes, among all "
        "Qwen1.5-MoE EP10 step matrices, those where quota's max rank load lies furthest above the load floor "
        f"with that slot count. Its MILP phases may run {args.milp_hardest_time_limit:g} s each, the sample's "
        f"{args.milp_time_limit:g} s.\n"
    )
    if mean_bound_rows:
        out.append(
            "All Qwen1.5-MoE EP10 step matrices, without a MILP: quota's max rank load (balance_target=1.0) over two "
            "lower bounds of the optimum. The load floor (`ultraep.planners.quota.load_floor`) is at least the "
            "rounded-up mean, and higher where a rank cannot reach the mean even with its slots holding the "
            "largest experts of other ranks.\n"
        )
        out.append("| slots | bound | matrices | mean | worst | above 1.005 | above 1.01 |")
        out.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        out.extend(mean_bound_rows)
        out.append("")


def timing_section(args, out: list[str]) -> None:
    out.append("## Planner time on one CPU thread\n")
    torch.set_num_threads(1)
    out.append("| EP | experts | slots | planner | median ms | p10 ms | p90 ms |")
    out.append("| ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for ranks, experts, slots in ((8, 64, 1), (16, 128, 2), (32, 256, 2), (64, 256, 1), (64, 256, 2)):
        loads = zipf_loads(ranks, experts, 8192, 8, 1.0, num_microbatches=1, num_layers=1, seed=2)[0, 0]
        layout = ExpertLayout.from_num_experts(experts, ranks, slots)
        planners = {
            "quota (compiled C)": lambda: make_planner("quota", backend="native"),
            "quota (PyTorch reference)": lambda: make_planner("quota", backend="torch"),
            "pairing": lambda: make_planner("pairing"),
            "eplb": lambda: make_planner("eplb", use_current=True, window=1, interval=1),
        }
        reference_plan = make_planner("quota", backend="torch")(loads, layout)
        native_plan = make_planner("quota", backend="native")(loads, layout)
        if not (torch.equal(reference_plan.quota, native_plan.quota) and torch.equal(reference_plan.replica_expert_ids, native_plan.replica_expert_ids)):
            raise AssertionError(f"compiled and reference quota plans differ at EP{ranks} x {experts} x {slots}")
        for name, factory in planners.items():
            planner = factory()
            for _ in range(5):
                planner(loads, layout)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                planner(loads, layout)
                times.append((time.perf_counter() - start) * 1e3)
            times.sort()
            out.append(
                f"| {ranks} | {experts} | {slots} | {name} | {statistics.median(times):.3f} | "
                f"{times[len(times) // 10]:.3f} | {times[(9 * len(times)) // 10]:.3f} |"
            )
    out.append("")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo where Linux has it, else the architecture."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()}, {os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown report here")
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per token-trace workload")
    parser.add_argument("--steps", type=int, default=8, help="steps per step-load trace")
    parser.add_argument("--milp-time-limit", type=float, default=20.0, help="seconds per MILP phase")
    parser.add_argument(
        "--milp-hardest-time-limit",
        type=float,
        default=180.0,
        help="seconds per MILP phase for the hardest Qwen1.5-MoE matrices, which take longer to prove",
    )
    parser.add_argument("--milp-layer-step", type=int, default=4, help="use every N-th ESFT layer for the MILP")
    parser.add_argument("--milp-synthetic", type=int, default=4, help="synthetic MILP instances")
    parser.add_argument("--milp-step-loads", type=int, default=8, help="Qwen1.5-MoE step-load MILP instances")
    parser.add_argument(
        "--milp-hardest",
        type=int,
        default=6,
        help="also solve the N Qwen1.5-MoE EP10 step matrices where quota lies furthest above the load floor",
    )
    parser.add_argument("--repeats", type=int, default=50, help="timed repetitions per planner")
    parser.add_argument("--skip", nargs="*", default=[], choices=["balance", "milp", "timing"])
    args = parser.parse_args()
    out = [
        "# Planner benchmark\n",
        f"Command: `python benchmarks/planner.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {cpu_model()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}; one CPU thread for timings.\n",
        "imbalance = max rank load / mean rank load. eplb (previous microbatch) places replicas from the "
        "previous microbatch of the same layer (its first microbatch has no history and keeps masters only); "
        "eplb (current microbatch) is the same placement computed from the microbatch itself, an oracle. "
        "local share = assignments processed on the rank that produced them.\n",
    ]
    if "balance" not in args.skip:
        balance_section(args, out)
    if "milp" not in args.skip:
        milp_section(args, out)
    if "timing" not in args.skip:
        timing_section(args, out)
    text = "\n".join(out)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
