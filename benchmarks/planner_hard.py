"""Hard small instances for the quota planner: top-1 routing with one or two hot ranks, against the MILP.

The planner benchmark's MILP sample comes from real traces and Zipf loads. This benchmark draws
synthetic microbatches of the kind where one redundant slot per rank is tightest: top-1 routing,
1,024 tokens per rank, and one or two ranks whose experts carry most of the load. For each shape it
plans every seed with quota (balance_target=1.0), takes the seeds where quota ends furthest above
the load floor, and solves those with the MILP (HiGHS).

    python benchmarks/planner_hard.py --out docs/benchmarks_planner_hard.md

Prints the tables and writes them as markdown to --out.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time

import torch

from ultraep.layout import ExpertLayout
from ultraep.planners.milp import solve_milp
from ultraep.planners.quota import load_floor
from ultraep.planners.registry import make_planner

SHAPES = ((8, 4), (16, 4), (10, 6))


def hot_rank_loads(num_ranks: int, experts_per_rank: int, tokens_per_rank: int, seed: int) -> torch.Tensor:
    """Return a [num_ranks, num_experts] int64 load matrix of top-1 routing with one or two hot ranks.

    Expert popularity is ``u**3`` for ``u`` uniform in [0, 1), and the experts of one or two random ranks
    get it multiplied by ``4 + 30 u`` (a fresh ``u`` per expert). Every rank routes ``tokens_per_rank``
    tokens, each to one expert drawn from that popularity.
    """
    generator = torch.Generator().manual_seed(seed)
    num_experts = num_ranks * experts_per_rank
    weight = torch.rand(num_experts, generator=generator) ** 3
    num_hot = int(torch.randint(1, 3, (1,), generator=generator))
    for rank in torch.randint(0, num_ranks, (num_hot,), generator=generator).tolist():
        hot = slice(rank * experts_per_rank, (rank + 1) * experts_per_rank)
        weight[hot] *= 4 + 30 * torch.rand(experts_per_rank, generator=generator)
    expert = torch.multinomial(weight, num_ranks * tokens_per_rank, replacement=True, generator=generator)
    source = torch.arange(num_ranks * tokens_per_rank) // tokens_per_rank
    loads = torch.zeros(num_ranks, num_experts, dtype=torch.int64)
    loads.view(-1).scatter_add_(0, source * num_experts + expert, torch.ones_like(expert))
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the tables as markdown here")
    parser.add_argument("--seeds", type=int, default=300, help="microbatches drawn per shape")
    parser.add_argument("--hardest", type=int, default=5, help="seeds per shape and slot count solved with the MILP")
    parser.add_argument("--tokens-per-rank", type=int, default=1024)
    parser.add_argument("--milp-time-limit", type=float, default=180.0, help="seconds for the MILP's max-load phase")
    args = parser.parse_args()
    torch.set_num_threads(1)
    planner = make_planner("quota", balance_target=1.0)

    out = [
        "# Hard small instances: top-1 routing with hot ranks\n",
        f"Command: `python {' '.join(sys.argv)}`\n",
        f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}.\n",
        f"Per shape, {args.seeds} seeds of `hot_rank_loads` (top-1, {args.tokens_per_rank} tokens per rank, one or two hot "
        "ranks). quota plans with balance_target=1.0. \"to floor\" divides quota's max rank load by the load floor "
        "(`ultraep.planners.quota.load_floor`), a lower bound of the optimum. The MILP columns take, per shape and "
        f"slot count, the {args.hardest} seeds with the highest ratio to the floor. They divide quota's max rank load "
        "by the MILP's lower bound (equal to its optimum where proven) and by the max rank load of the best MILP "
        "plan found. Where the optimum is not proven, the gap to the optimum lies between the two.\n",
        "| ranks x experts/rank | slots | seeds | to floor (mean) | worst | above 1.01 | quota / MILP bound (mean) | worst | "
        "quota / MILP plan (mean) | worst | proven | MILP s (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    details = []  # one row per MILP solve of a one-slot shape
    for num_ranks, experts_per_rank in SHAPES:
        matrices = [hot_rank_loads(num_ranks, experts_per_rank, args.tokens_per_rank, seed) for seed in range(args.seeds)]
        for slots in (1, 2):
            layout = ExpertLayout(num_ranks, experts_per_rank, slots)
            peaks = [int(planner(matrix, layout).rank_load().max()) for matrix in matrices]
            to_floor = [peak / int(load_floor(matrix, layout)) for peak, matrix in zip(peaks, matrices)]
            hardest = sorted(range(args.seeds), key=lambda i: (-to_floor[i], i))[: args.hardest]
            gaps, plan_gaps, proven, seconds = [], [], 0, []
            for seed in hardest:
                start = time.perf_counter()
                exact = solve_milp(matrices[seed], layout, time_limit=args.milp_time_limit, replica_time_limit=1.0)
                seconds.append(time.perf_counter() - start)
                proven += exact.status == "optimal"
                gaps.append(peaks[seed] / max(1, exact.lower_bound))
                plan_gaps.append(peaks[seed] / max(1, exact.max_rank_load))
                if slots == 1:
                    details.append(
                        f"| {num_ranks} x {experts_per_rank} | {seed} | {peaks[seed]} | {exact.max_rank_load} | "
                        f"{exact.lower_bound} | {exact.status} | {gaps[-1]:.4f} | {plan_gaps[-1]:.4f} |"
                    )
            row = (
                f"| {num_ranks} x {experts_per_rank} | {slots} | {args.seeds} | {statistics.fmean(to_floor):.4f} | {max(to_floor):.4f} | "
                f"{sum(ratio > 1.01 for ratio in to_floor)} | {statistics.fmean(gaps):.4f} | {max(gaps):.4f} | "
                f"{statistics.fmean(plan_gaps):.4f} | {max(plan_gaps):.4f} | {proven}/{len(hardest)} | {statistics.median(seconds):.1f} |"
            )
            out.append(row)
            print(row, flush=True)
    out += [
        "\nThe one-slot MILP solves one by one (seed of `hot_rank_loads`; max rank loads in assignments):\n",
        "| ranks x experts/rank | seed | quota | MILP plan | MILP bound | status | quota / bound | quota / plan |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        *details,
    ]
    text = "\n".join(out) + "\n"
    if args.out is not None:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
