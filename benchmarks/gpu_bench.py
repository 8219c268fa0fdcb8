"""Time count, plan and reroute on one GPU: the Triton kernels beside the PyTorch reference.

Usage:
    python benchmarks/gpu_bench.py --out docs/benchmarks_gpu.md
        [--ranks 16,32,64,128] [--experts 128,256] [--slots 1,2] [--tokens 8192] [--topk 8]
        [--reps 200] [--warmup 20] [--inner 10] [--jobs 8] [--time-limit 270]

For every (ranks, experts, redundant slots per rank) it builds skewed top-k routing for every rank
(8192 tokens x top-8 by default), then times on rank 0:

- count: ``count_load_triton`` vs ``count_local_load`` (this rank's row of the load matrix);
- plan: ``plan_quota_triton`` vs the PyTorch reference (``backend="torch"``) on the same GPU, default ``QuotaConfig``;
- reroute: ``reroute_triton`` vs ``reroute`` for rank 0's assignments.

Each operation is timed two ways with CUDA events after a warm-up. "graph" captures ``--inner``
back-to-back calls in one CUDA graph and reports replay time / inner, which is device time without
Python launch overhead. "eager" times single Python calls, which is what an uncaptured step pays.
The tables give the median and the 10th-90th percentile spread over the repetitions. Once per
configuration the script checks that both backends return identical integers. The PyTorch count and reroute read
values on the host (bincount sizes, boolean masks), so they cannot be captured and have no graph
time. Kernels are compiled first in ``--jobs`` worker processes, which fill Triton's on-disk cache.

Writes a markdown table to ``--out`` and the same numbers as JSON beside it (``.json``). Without a
CUDA GPU it exits with status 2 and prints why, producing no numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import ultraep  # noqa: F401
except ImportError:  # run from a checkout without installing: python benchmarks/gpu_bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS_US = {"count": 10.0, "plan": 30.0, "reroute": 15.0}
"""Targets on one H200 (device time): plan for EP64 x 256 experts x 2 slots, reroute and count for
8192 tokens x top-8."""


def _parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _check_environment() -> str | None:
    """Return why the benchmark cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch; run this benchmark on a machine with one"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set; unset it so the kernels are compiled for the GPU"
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error}); install it with pip install 'ultraep[triton]'"
    return None


def _routing(num_ranks: int, num_experts: int, num_tokens: int, topk: int, seed: int, device: str = "cuda") -> torch.Tensor:
    """Return [num_ranks, num_tokens, topk] int64 topk_ids on ``device``: distinct experts per token, Zipf-skewed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    popularity = 1.0 / torch.arange(1, num_experts + 1, device=device, dtype=torch.float32)  # Zipf, exponent 1
    popularity = popularity[torch.randperm(num_experts, generator=gen, device=device)]
    all_ids = torch.empty((num_ranks, num_tokens, topk), dtype=torch.int64, device=device)
    for rank in range(num_ranks):
        # Each rank gets its own mix: per-rank noise on the log-popularity, then Gumbel top-k per token.
        rank_logits = popularity.log() + 0.5 * torch.randn(num_experts, generator=gen, device=device)
        uniform = torch.rand((num_tokens, num_experts), generator=gen, device=device).clamp_(1e-9, 1.0)
        gumbel = -torch.log(-torch.log(uniform))
        all_ids[rank] = torch.topk(rank_logits + gumbel, topk, dim=1).indices
    return all_ids


def _inputs(num_ranks: int, experts: int, slots: int, tokens: int, topk: int, seed: int, device: str = "cuda"):
    """Return (layout, rank 0's topk_ids, load matrix, reference plan) on ``device``."""
    from ultraep.layout import ExpertLayout
    from ultraep.planners.quota import QuotaPlanner
    from ultraep.reroute import count_local_load

    layout = ExpertLayout.from_num_experts(experts, num_ranks, slots)
    all_ids = _routing(num_ranks, experts, tokens, topk, seed, device)
    loads = torch.stack([count_local_load(all_ids[r], experts, check_values=False) for r in range(num_ranks)])
    plan = QuotaPlanner(backend="torch").plan(loads, layout)
    return layout, all_ids[0].contiguous(), loads, plan


def _warm_up_config(args: tuple) -> tuple[tuple, float]:
    """Compile the Triton kernels of one configuration (worker process); return its compile seconds."""
    num_ranks, experts, slots, tokens, topk, seed = args
    from ultraep.kernels.count import count_load_triton
    from ultraep.kernels.plan import plan_quota_triton
    from ultraep.kernels.reroute import reroute_triton
    from ultraep.planners.quota import QuotaConfig

    start = time.perf_counter()
    layout, ids, loads, plan = _inputs(num_ranks, experts, slots, tokens, topk, seed)
    count_load_triton(ids, experts)
    plan_quota_triton(loads, layout, QuotaConfig())
    reroute_triton(ids, plan, loads, 0)
    torch.cuda.synchronize()
    return (num_ranks, experts, slots), time.perf_counter() - start


def _summarise(samples_us: list[float]) -> dict:
    ordered = sorted(samples_us)
    n = len(ordered)
    return {
        "median_us": statistics.median(ordered),
        "p10_us": ordered[max(0, int(0.1 * (n - 1)))],
        "p90_us": ordered[min(n - 1, int(round(0.9 * (n - 1))))],
        "reps": n,
    }


def _time_eager(fn, warmup: int, reps: int, budget_s: float) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    probe_start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(20, min(reps, int(budget_s / max(time.perf_counter() - probe_start, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _summarise([start.elapsed_time(end) * 1000.0 for start, end in events])


def _syncs_with_host(fn) -> bool:
    """True when ``fn`` reads a device value on the host (torch's sync debug mode catches it)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return False


def _time_graph(fn, warmup: int, reps: int, inner: int, budget_s: float) -> dict:
    if _syncs_with_host(fn):
        return {"error": "reads device values on the host, so it cannot be captured"}

    # Warm up on a side stream, as capture requires, then capture `inner` calls in one graph.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except RuntimeError as error:  # a host sync inside fn makes capture fail
        torch.cuda.synchronize()
        return {"error": str(error).splitlines()[0][:160]}

    # Time replays; slow operations get fewer repetitions so one measurement stays within budget_s.
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    probe_start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(20, min(reps, int(budget_s / max(time.perf_counter() - probe_start, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return _summarise([start.elapsed_time(end) * 1000.0 / inner for start, end in events])


def _measure_config(num_ranks: int, experts: int, slots: int, args) -> list[dict]:
    from ultraep.kernels.count import count_load_triton
    from ultraep.kernels.plan import plan_quota_triton
    from ultraep.kernels.reroute import reroute_triton
    from ultraep.planners.quota import QuotaConfig, QuotaPlanner
    from ultraep.reroute import count_local_load, reroute

    layout, ids, loads, plan = _inputs(num_ranks, experts, slots, args.tokens, args.topk, args.seed)
    config = QuotaConfig()
    planner = QuotaPlanner(config, backend="torch")
    ops = {
        "count": (lambda: count_load_triton(ids, experts), lambda: count_local_load(ids, experts, check_values=False)),
        "plan": (lambda: plan_quota_triton(loads, layout, config), lambda: planner.plan(loads, layout)),
        "reroute": (lambda: reroute_triton(ids, plan, loads, 0), lambda: reroute(ids, plan, loads, 0, check_values=False)),
    }
    kernel_plan = plan_quota_triton(loads, layout, config)
    identical = {
        "count": torch.equal(count_load_triton(ids, experts), count_local_load(ids, experts, check_values=False)),
        "plan": torch.equal(kernel_plan.quota, plan.quota)
        and torch.equal(kernel_plan.replica_expert_ids, plan.replica_expert_ids),
        "reroute": torch.equal(reroute_triton(ids, plan, loads, 0), reroute(ids, plan, loads, 0, check_values=False)),
    }
    rows = []
    for op, (kernel_fn, torch_fn) in ops.items():
        rows.append(
            {
                "num_ranks": num_ranks,
                "num_experts": experts,
                "redundant_slots_per_rank": slots,
                "op": op,
                "identical": identical[op],
                "triton_graph": _time_graph(kernel_fn, args.warmup, args.reps, args.inner, args.budget),
                "torch_graph": _time_graph(torch_fn, args.warmup, args.reps, args.inner, args.budget),
                "triton_eager": _time_eager(kernel_fn, args.warmup, args.reps, args.budget),
                "torch_eager": _time_eager(torch_fn, args.warmup, args.reps, args.budget),
            }
        )
    return rows


def _cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    if "error" in stats:
        return "not capturable"
    return f"{stats['median_us']:.1f} [{stats['p10_us']:.1f}-{stats['p90_us']:.1f}]"


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# GPU hot-path timings: Triton kernels vs PyTorch reference",
        "",
        f"- GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
        f"- Command: `{meta['command']}` ({meta['date']}, {meta['wall_s']:.0f} s)",
        f"- Workload: {meta['tokens']} tokens x top-{meta['topk']} per rank, Zipf-skewed routing, rank 0 timed;"
        " default QuotaConfig",
        "- Cells: median [p10-p90] in microseconds. graph = CUDA-graph replay of "
        f"{meta['inner']} back-to-back calls / {meta['inner']} (device time); eager = one Python call timed with CUDA events.",
        f"- Targets (graph time on one H200): count <= {TARGETS_US['count']:.0f} us, plan <= {TARGETS_US['plan']:.0f} us "
        f"(EP64 x 256 experts x 2 slots), reroute <= {TARGETS_US['reroute']:.0f} us.",
        "",
        "| ranks | experts | slots | op | triton graph | torch graph | triton eager | torch eager | identical |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if "skipped" in row:
            shape = f"| {row['num_ranks']} | {row['num_experts']} | {row['redundant_slots_per_rank']}"
            lines.append(f"{shape} | all | {row['skipped']} | | | | |")
            continue
        lines.append(
            f"| {row['num_ranks']} | {row['num_experts']} | {row['redundant_slots_per_rank']} | {row['op']} | "
            f"{_cell(row['triton_graph'])} | {_cell(row['torch_graph'])} | {_cell(row['triton_eager'])} | "
            f"{_cell(row['torch_eager'])} | {'yes' if row['identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown results file; JSON goes beside it with suffix .json")
    parser.add_argument("--ranks", type=_parse_ints, default=[16, 32, 64, 128], help="EP sizes, comma separated")
    parser.add_argument("--experts", type=_parse_ints, default=[128, 256], help="logical experts, comma separated")
    parser.add_argument("--slots", type=_parse_ints, default=[1, 2], help="redundant slots per rank, comma separated")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    parser.add_argument("--topk", type=int, default=8, help="experts per token")
    parser.add_argument("--reps", type=int, default=200, help="timed repetitions per measurement (fewer if one exceeds --budget)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls before each measurement")
    parser.add_argument("--inner", type=int, default=10, help="calls captured per CUDA graph")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds one measurement may take; caps --reps for slow ops")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="processes that compile kernels first")
    parser.add_argument(
        "--time-limit", type=float, default=270.0, help="seconds after which remaining configurations are skipped"
    )
    parser.add_argument("--seed", type=int, default=0, help="routing seed")
    args = parser.parse_args(argv)

    problem = _check_environment()
    if problem is not None:
        print(f"gpu_bench: {problem}; no results written", file=sys.stderr)
        return 2
    import triton

    started = time.perf_counter()
    configs = [
        (r, e, s) for r in args.ranks for e in args.experts for s in args.slots if e % r == 0
    ]
    skipped_shapes = [(r, e) for r in args.ranks for e in args.experts if e % r != 0]
    device_name = torch.cuda.get_device_name()
    print(f"gpu_bench: {device_name}, {len(configs)} configurations, compiling in {args.jobs} processes", flush=True)
    if skipped_shapes:
        print(f"gpu_bench: skipping (ranks, experts) {skipped_shapes}: experts must be a multiple of ranks", flush=True)

    # Step 1: compile every configuration's kernels in parallel; the cache on disk serves this process.
    work = [(r, e, s, args.tokens, args.topk, args.seed) for r, e, s in configs]
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        for (r, e, s), seconds in pool.imap_unordered(_warm_up_config, work):
            print(f"  compiled EP{r} x {e} experts x {s} slots in {seconds:.1f} s", flush=True)

    # Step 2: measure, stopping before the time limit.
    rows: list[dict] = []
    for r, e, s in configs:
        if time.perf_counter() - started > args.time_limit:
            rows.append({"num_ranks": r, "num_experts": e, "redundant_slots_per_rank": s, "skipped": "time limit"})
            continue
        config_rows = _measure_config(r, e, s, args)
        rows.extend(config_rows)
        for row in config_rows:
            print(
                f"EP{r:>4} x {e:>3} experts x {s} slots  {row['op']:<8} triton graph {_cell(row['triton_graph']):>22}  "
                f"torch graph {_cell(row['torch_graph']):>22}  triton eager {_cell(row['triton_eager']):>22}  "
                f"torch eager {_cell(row['torch_eager']):>24}  identical {row['identical']}",
                flush=True,
            )

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.perf_counter() - started,
        "tokens": args.tokens,
        "topk": args.topk,
        "inner": args.inner,
        "targets_us": TARGETS_US,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_markdown(rows, meta))
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"gpu_bench: wrote {args.out} and {args.out.with_suffix('.json')} in {meta['wall_s']:.0f} s")
    return 0 if all(row.get("identical", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
