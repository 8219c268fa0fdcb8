"""Runtime cost of balancing per MoE layer on CPU with gloo ranks, in one run.

    python benchmarks/runtime.py                 # 4 gloo ranks, defaults below
    python benchmarks/runtime.py --tokens 4096 --redundant-slots 2

Spawns ``--ranks`` processes (one CPU thread each) and trains ``--layers`` reference MoE layers that
share one ReplicaManager, with a router skewed toward a few hot experts. ``--buffer-layers`` gives
every layer its own redundant-slot weight buffers; ``--overlap-sync`` and ``--overlap-grad-reduce`` run
the forward weight sync and the grad reduce in the background; ``--pipeline-replicas`` (with
``--overlap-sync``) computes replicas chunk by chunk as their copy arrives. Per layer it reports:

1. time of count + gather + plan + reroute + forward weight sync, and of the backward re-sync and
   grad reduce, as ratios of the balanced layer's own forward+backward time (medians over the
   timed iterations, the slowest rank per phase);
2. bytes moved per layer and iteration against the lower bound: every replica with a non-zero quota
   must receive its expert's weights once and send its gradient once;
3. extra memory of the redundant-slot buffers as a ratio of one layer's expert memory on a rank.

It also plans weight sync and grad reduce for a larger EP group without running them
(``--plan-ranks``) to show the relay trees' effect on the most copies one rank sends and the most
gradient rows one rank receives. Prints markdown tables and the command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import ultraep  # noqa: F401
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ultraep.comm import plan_grad_reduce, plan_weight_sync
from ultraep.layout import ExpertLayout
from ultraep.planners import QuotaPlanner
from ultraep.runtime import ManagerConfig, MoELayer, ReplicaManager, swiglu_weight_shapes

PHASES_FORWARD = ("count", "gather", "plan", "plan_check", "reroute", "sync_forward")
PHASES_BACKWARD = ("sync_backward", "reduce")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-layer runtime cost of balancing on CPU gloo ranks.")
    parser.add_argument("--ranks", type=int, default=4, help="gloo ranks (processes)")
    parser.add_argument("--experts-per-rank", type=int, default=4, help="master slots per rank")
    parser.add_argument("--redundant-slots", type=int, default=1, help="redundant slots per rank")
    parser.add_argument("--layers", type=int, default=2, help="MoE layers sharing the manager's buffers")
    parser.add_argument("--hidden-size", type=int, default=256, help="model width")
    parser.add_argument("--ffn-hidden-size", type=int, default=512, help="expert SwiGLU width")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank and microbatch")
    parser.add_argument("--skew", type=float, default=2.0, help="router logit bias of the hottest expert")
    parser.add_argument("--sync-mode", default="auto", choices=("direct", "relay", "auto"), help="weight sync mode")
    parser.add_argument(
        "--buffer-layers",
        action="store_true",
        help="give each layer its own redundant-slot weight buffers (ManagerConfig.buffer_layers = --layers)",
    )
    parser.add_argument(
        "--overlap-sync",
        action="store_true",
        help="run the forward weight sync in the background (ManagerConfig.overlap_sync); the table then "
        "counts the time the layer waited for it",
    )
    parser.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="run grad reduce in the background (ManagerConfig.overlap_grad_reduce); the table then counts "
        "the time the backward's end waited for the reduces, under the last layer reduced",
    )
    parser.add_argument(
        "--pipeline-replicas",
        action="store_true",
        help="with --overlap-sync: send copies in chunks and compute replicas chunk by chunk as they arrive "
        "(ManagerConfig.pipeline_replicas)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations")
    parser.add_argument("--iters", type=int, default=6, help="timed iterations (median reported)")
    parser.add_argument("--plan-ranks", type=int, default=64, help="EP size of the planning-only relay table")
    parser.add_argument("--plan-experts", type=int, default=256, help="experts of the planning-only relay table")
    return parser.parse_args(argv)


def _make_layers(manager: ReplicaManager, args, balance: bool) -> list[MoELayer]:
    layers = []
    for layer_id in range(args.layers):
        layer = MoELayer(manager, layer_id, args.hidden_size, args.ffn_hidden_size, balance=balance, seed=1)
        with torch.no_grad():
            # Bias a few experts of different ranks through the +1 shift of the inputs (Zipf-like).
            for rank_idx, expert_id in enumerate(range(0, manager.layout.num_experts, manager.layout.experts_per_rank + 1)):
                layer.router_weight[expert_id] += args.skew / (rank_idx + 1) / args.hidden_size
        layers.append(layer)
    return layers


def _iteration(layers: list[MoELayer], x: torch.Tensor) -> float:
    dist.barrier()  # start together, so the first all-gather does not absorb the previous iteration's skew
    start = time.perf_counter()
    out = x
    for layer in layers:
        out = out + layer(out)
    out.square().mean().backward()
    return time.perf_counter() - start


def _worker(rank: int, args, store_dir: str, queue) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), args.ranks)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.ranks, timeout=datetime.timedelta(seconds=120))
    layout = ExpertLayout(args.ranks, args.experts_per_rank, args.redundant_slots)
    manager = ReplicaManager(
        layout, swiglu_weight_shapes(args.hidden_size, args.ffn_hidden_size),
        config=ManagerConfig(
            sync_mode=args.sync_mode,
            record_timings=True,
            buffer_layers=args.layers if args.buffer_layers else 0,
            overlap_sync=args.overlap_sync,
            overlap_grad_reduce=args.overlap_grad_reduce,
            pipeline_replicas=args.pipeline_replicas,
        ),
    )
    balanced = _make_layers(manager, args, True)
    unbalanced = _make_layers(manager, args, False)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden_size, generator=generator) + 1.0

    # Balanced and unbalanced iterations alternate, so both see the same machine load.
    times = {True: [], False: []}
    stats = []
    for iteration in range(args.warmup + args.iters):
        if iteration == args.warmup:
            manager.timings.clear()
        for balance, layers in ((True, balanced), (False, unbalanced)):
            elapsed = _iteration(layers, x)
            if iteration >= args.warmup:
                times[balance].append(elapsed)
            if balance and iteration >= args.warmup:
                stats.append({k: vars(v).copy() for k, v in manager.stats.items()})
    # Unbalanced iterations run through the manager too, right after each balanced one; keep the
    # balanced calls (even positions of every phase's list).
    timings = {
        phase: {layer_id: values[0::2] for layer_id, values in per_layer.items()}
        for phase, per_layer in manager.timings.items()
    }
    result = {
        "times": times,
        "timings": timings,
        "stats": stats,
        "numel": manager.spec.numel,
        "element_size": manager.replica_weights.element_size(),
        "extra_memory": manager.extra_memory_bytes,
        "layer_expert_memory": sum(w.numel() * w.element_size() for w in balanced[0].master_weights()),
    }
    queue.put((rank, result))
    dist.barrier()
    dist.destroy_process_group()


def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values) if values else 0.0


def _spread_ms(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    low, high = min(values), max(values)
    return f"{1e3 * low:.1f}-{1e3 * high:.1f}"


def _relay_table(args) -> list[str]:
    """Weight sync schedules for a larger EP group, from a QuotaPlanner plan on a skewed load matrix."""
    experts_per_rank = args.plan_experts // args.plan_ranks
    layout = ExpertLayout(args.plan_ranks, experts_per_rank, 2)
    generator = torch.Generator().manual_seed(0)
    # Zipf-like expert popularity, 4096 tokens x top-8 per rank.
    weights = 1.0 / torch.arange(1, layout.num_experts + 1, dtype=torch.float64) ** 1.2
    weights = weights[torch.randperm(layout.num_experts, generator=generator)]
    draws = torch.multinomial(weights.expand(layout.num_ranks, -1), 4096 * 8, replacement=True, generator=generator)
    loads = torch.zeros(layout.num_ranks, layout.num_experts, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    plan = QuotaPlanner()(loads, layout)
    counts = plan.logical_replica_count()
    lines = [
        f"Weight sync and grad reduce schedules, planned only: {layout}, Zipf(1.2) loads of 4096 tokens x top-8 per "
        f"rank. The QuotaPlanner plan has {int(plan.num_replicas())} replicas, at most {int(counts.max()) - 1} of one "
        "expert. Link time counts expert copies through the busiest rank link per step. Grad reduce sends every "
        "replica's gradient up the same trees; its last column is the most gradient rows one rank receives.",
        "",
        "| mode | chunks | relayed experts | deepest tree | sync steps | most copies sent by one rank | "
        "link time (expert copies) | reduce steps | most gradient rows received by one rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, chunks in (("direct", 4), ("relay", 4), ("auto", 4), ("auto", 8)):
        sync_plan = plan_weight_sync(layout, plan.replica_expert_ids, mode=mode, num_chunks=chunks)
        reduce_plan = plan_grad_reduce(layout, plan.replica_expert_ids, mode=mode, num_chunks=chunks)
        received = [0] * layout.num_ranks
        for transfer in reduce_plan.transfers:
            received[transfer.dst_rank] += 1
        lines.append(
            f"| {mode} | {chunks} | {len(sync_plan.relay_expert_ids)} | {sync_plan.depth} | {sync_plan.num_steps} | "
            f"{max(sync_plan.copies_sent_per_rank()):.2f} | {sync_plan.link_time():.2f} | {reduce_plan.num_steps} | "
            f"{max(received) / reduce_plan.num_chunks:.2f} |"
        )
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    command = " ".join(["python benchmarks/runtime.py", *(sys.argv[1:] if argv is None else argv)])
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as store_dir:
        processes = [context.Process(target=_worker, args=(rank, args, store_dir, queue)) for rank in range(args.ranks)]
        for process in processes:
            process.start()
        results = dict(queue.get(timeout=1800) for _ in processes)
        for process in processes:
            process.join()
        failed = [rank for rank, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            raise SystemExit(f"ranks {failed} failed")

    first = results[0]
    layer_ids = range(args.layers)
    # Layer time: the slowest rank of each iteration. Phase time: median over ranks of each rank's
    # median; a rank's time in a collective includes waiting for peers that the OS descheduled.
    per_iter = {b: [max(results[r]["times"][b][i] for r in results) for i in range(args.iters)] for b in (True, False)}
    layer_fb = {b: _median_ms(per_iter[b]) / args.layers for b in (True, False)}

    def phase_ms(phase: str, layer_id: int) -> float:
        return statistics.median(_median_ms(results[r]["timings"].get(phase, {}).get(layer_id, [])) for r in results)

    print(f"# ultraep runtime benchmark\n\ncommand: `{command}`\n")
    buffer_words = "with one weight buffer set each" if args.buffer_layers else "sharing the buffers"
    if args.overlap_sync:
        buffer_words += ", forward weight sync in the background"
    if args.pipeline_replicas:
        buffer_words += ", replicas computed chunk by chunk as their copy arrives"
    if args.overlap_grad_reduce:
        buffer_words += ", grad reduce in the background"
    print(
        f"{args.ranks} gloo ranks on CPU (1 thread each), {args.experts_per_rank} experts + {args.redundant_slots} "
        f"redundant slot(s) per rank, {args.layers} MoE layers {buffer_words}, hidden {args.hidden_size}, "
        f"SwiGLU ffn {args.ffn_hidden_size}, top-2, {args.tokens} tokens per rank, sync_mode={args.sync_mode}, "
        f"{args.iters} timed iterations after {args.warmup} warm-up; phase times are medians over ranks of "
        f"per-rank medians in ms, host wall clock. {os.cpu_count()} CPU cores on this machine.\n"
    )
    print(
        f"Layer forward+backward (per layer, slowest rank): balanced {layer_fb[True]:.1f} ms "
        f"(spread over iterations {_spread_ms([t / args.layers for t in per_iter[True]])}), unbalanced "
        f"{layer_fb[False]:.1f} ms ({_spread_ms([t / args.layers for t in per_iter[False]])}).\n"
    )
    # With the sync or the reduce in the background, the layer pays only the time it waits for them.
    backward_phases = tuple("reduce_wait" if p == "reduce" and args.overlap_grad_reduce else p for p in PHASES_BACKWARD)
    reduce_label = "grad reduce (waited)" if args.overlap_grad_reduce else "grad reduce"
    forward_phases = tuple("sync_wait" if p == "sync_forward" and args.overlap_sync else p for p in PHASES_FORWARD)
    sync_label = "sync fwd (waited)" if args.overlap_sync else "sync fwd"
    print(f"| layer | imbalance before -> after | replicas | count | gather | plan | plan check | reroute | {sync_label} "
          f"| forward overhead / layer fwd+bwd | re-sync bwd | {reduce_label} | all overhead / layer fwd+bwd |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for layer_id in layer_ids:
        last = first["stats"][-1][layer_id]
        values = {phase: phase_ms(phase, layer_id) for phase in forward_phases + backward_phases}
        forward = sum(values[p] for p in forward_phases)
        total = forward + sum(values[p] for p in backward_phases)
        print(
            f"| {layer_id} | {last['imbalance_before']:.3f} -> {last['imbalance_after']:.3f} | {last['num_replicas']} | "
            + " | ".join(f"{values[p]:.2f}" for p in forward_phases)
            + f" | {forward / layer_fb[True]:.1%} | {values['sync_backward']:.2f} | {values[backward_phases[1]]:.2f} | "
            f"{total / layer_fb[True]:.1%} |"
        )

    print("\nBytes moved per layer and iteration, all ranks together (last timed iteration):\n")
    print("| layer | weight sync fwd | re-sync bwd | grad reduce | lower bound (copy once + reduce once) | total / lower bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    row_bytes = first["numel"] * first["element_size"]
    for layer_id in layer_ids:
        last = first["stats"][-1][layer_id]
        forward, backward, reduce = last["forward_sync_bytes"], last["backward_sync_bytes"], last["reduce_bytes"]
        # Every replica with quota > 0 must receive its weights once and send its gradient once.
        bound = 2 * (reduce // row_bytes) * row_bytes
        ratio = f"{(forward + backward + reduce) / bound:.2f}" if bound else "-"
        print(f"| {layer_id} | {forward / 2**20:.2f} MiB | {backward / 2**20:.2f} MiB | {reduce / 2**20:.2f} MiB | "
              f"{bound / 2**20:.2f} MiB | {ratio} |")

    print(
        f"\nExtra memory per rank: {first['extra_memory'] / 2**20:.2f} MiB (replica weights, replica gradients, "
        f"reduce scratch) = {first['extra_memory'] / first['layer_expert_memory']:.2f}x one layer's expert memory "
        f"on a rank ({first['layer_expert_memory'] / 2**20:.2f} MiB), "
        f"{first['extra_memory'] / (args.layers * first['layer_expert_memory']):.2f}x for all {args.layers} layers "
        + ("(one weight buffer set per layer).\n" if args.buffer_layers else "(the buffers are shared).\n")
    )
    for line in _relay_table(args):
        print(line)


if __name__ == "__main__":
    main()
