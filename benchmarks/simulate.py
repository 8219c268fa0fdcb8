"""Simulated end-to-end evaluation of the balancing policies on the real routing traces.

Runs the cost model of ``ultraep.sim`` on the real traces in ``../shared/traces`` (relative to the
repository root) for GLM-4.5-Air, Qwen3-235B-A22B, DeepSeek-V3 and Mixtral-8x7B on GB200 NVL72, and
writes a markdown section with the exact command to ``--out``:

- the ESFT token trace (DeepSeek-V2-Lite routing, the same routing as the bundled trace) at EP64 with
  ``--tokens-per-rank`` tokens per rank (RESAMPLED: the trace has 33,279 tokens), next to the
  largest EP size it fills unresampled at that size, and at EP64 with 512 tokens per rank, which it
  fills once without reuse;
- the two HarMoEny step-load traces, one microbatch per recorded step, each expert's count split
  evenly over the source ranks (the traces have no source ranks).

The quota policies plan with each model's weight-copy cost under each run's sync settings
(``ultraep simulate --copy-cost auto``, the default); the other policies are planned once per
workload. Every plan is costed for every model, in training and in prefill:
with the planner time measured on this CPU (one thread) on the critical path, and with the planner
time set to 0, which isolates balance quality and replica traffic from planner speed. Each of these
runs three times: with the forward weight sync before the experts; with it in the background behind
the masters' GEMM (plus, in training, the gradient reduce behind the next layer's backward GEMMs);
and with that background sync sent in chunks that the replicas compute as they arrive. The last
prefill setting runs once more with ``QuotaConfig(stop_at_target=True)``, which plans faster for a few
more replicas, and once with stop_at_target and ``balance_target=1.05`` (measured planner time only).
It also runs with the layer-buffer policies planned from the experts their slots still contain
(``ManagerConfig.plan_with_resident``), alone and with stop_at_target.

Usage::

    python benchmarks/simulate.py --out /tmp/simulate.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ultraep.sim.cost import CostSettings
from ultraep.sim.hardware import get_hardware
from ultraep.sim.models import MODELS
from ultraep.sim.replay import (
    SimulationResult,
    Workload,
    default_policies,
    evaluate,
    format_rows,
    largest_divisor_at_most,
    load_trace_workload,
    mean_over_models,
    plan_for_models,
    token_trace_workload,
    write_json,
)
from ultraep.traces import bundled_trace_path, load_trace, max_ranks_without_reuse

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES_DIR = REPO_ROOT.parent / "shared" / "traces"
ESFT_FILE = "esft_dsv2lite_token_routing.npz"
STEP_LOAD_FILES = ("harmoeny_qwen15moe_top1_step_loads.npz", "harmoeny_switch128_step_loads.npz")
HARDWARE = "gb200-nvl72"
TARGET_PCT_OF_IDEAL = 96.0
ZERO_PLANNER_TIME = {"quota": 0.0, "lp_reroute": 0.0}
OVERLAP_WORDS = ", forward sync overlapped"
TRAIN_OVERLAP_WORDS = ", sync and grad reduce overlapped"
TRAIN_OVERLAP = CostSettings(mode="train", overlap_sync=True, overlap_grad_reduce=True)
PIPELINE_CHUNKS = 8
PIPELINE_WORDS = f", replicas pipelined with their copy ({PIPELINE_CHUNKS} chunks)"
TRAIN_PIPELINE = CostSettings(
    mode="train", overlap_sync=True, overlap_grad_reduce=True, pipeline_replicas=True, sync_chunks=PIPELINE_CHUNKS
)
PREFILL_PIPELINE = CostSettings(mode="prefill", overlap_sync=True, pipeline_replicas=True, sync_chunks=PIPELINE_CHUNKS)
# quota with QuotaConfig.stop_at_target, which trades a few more replicas for about half the planner time where
# plans reach the balance target.
STOP_AT_TARGET = (("stop_at_target", True),)
STOP_WORDS = ", quota with stop_at_target"
# The same with a looser balance target: with copy costs the target is compared with the costed peak, which
# plans on the step-load traces rarely bring within 1.001 of the mean.
LOOSE_STOP = (("stop_at_target", True), ("balance_target", 1.05))
LOOSE_STOP_WORDS = ", quota with stop_at_target and balance_target 1.05"
# The layer-buffer policies planned with the experts their slots contain (QuotaPlanner's resident table).
RESIDENT_WORDS = ", layer buffers planned with their resident slots"
# (mode, planner-time words, cost settings, planner-time overrides, quota settings[, plan with resident slots])
# of every costing of a workload.
VARIANTS = (
    ("train", "measured on this CPU", CostSettings(mode="train"), None, ()),
    ("train", "set to 0", CostSettings(mode="train"), ZERO_PLANNER_TIME, ()),
    ("train", "measured on this CPU" + TRAIN_OVERLAP_WORDS, TRAIN_OVERLAP, None, ()),
    ("train", "set to 0" + TRAIN_OVERLAP_WORDS, TRAIN_OVERLAP, ZERO_PLANNER_TIME, ()),
    (
        "train",
        "set to 0, backward replica traffic hidden (optimistic)",
        CostSettings(mode="train", hide_backward_replica_traffic=True),
        ZERO_PLANNER_TIME,
        (),
    ),
    ("prefill", "measured on this CPU", CostSettings(mode="prefill"), None, ()),
    ("prefill", "set to 0", CostSettings(mode="prefill"), ZERO_PLANNER_TIME, ()),
    ("prefill", "measured on this CPU" + OVERLAP_WORDS, CostSettings(mode="prefill", overlap_sync=True), None, ()),
    ("prefill", "set to 0" + OVERLAP_WORDS, CostSettings(mode="prefill", overlap_sync=True), ZERO_PLANNER_TIME, ()),
    ("train", "measured on this CPU" + TRAIN_OVERLAP_WORDS + PIPELINE_WORDS, TRAIN_PIPELINE, None, ()),
    ("train", "set to 0" + TRAIN_OVERLAP_WORDS + PIPELINE_WORDS, TRAIN_PIPELINE, ZERO_PLANNER_TIME, ()),
    ("prefill", "measured on this CPU" + OVERLAP_WORDS + PIPELINE_WORDS, PREFILL_PIPELINE, None, ()),
    ("prefill", "set to 0" + OVERLAP_WORDS + PIPELINE_WORDS, PREFILL_PIPELINE, ZERO_PLANNER_TIME, ()),
    ("prefill", "measured on this CPU" + OVERLAP_WORDS + PIPELINE_WORDS + STOP_WORDS, PREFILL_PIPELINE, None, STOP_AT_TARGET),
    ("prefill", "set to 0" + OVERLAP_WORDS + PIPELINE_WORDS + STOP_WORDS, PREFILL_PIPELINE, ZERO_PLANNER_TIME, STOP_AT_TARGET),
    ("prefill", "measured on this CPU" + OVERLAP_WORDS + PIPELINE_WORDS + LOOSE_STOP_WORDS, PREFILL_PIPELINE, None, LOOSE_STOP),
    ("prefill", "measured on this CPU" + OVERLAP_WORDS + PIPELINE_WORDS + RESIDENT_WORDS, PREFILL_PIPELINE, None, (), True),
    ("prefill", "set to 0" + OVERLAP_WORDS + PIPELINE_WORDS + RESIDENT_WORDS, PREFILL_PIPELINE, ZERO_PLANNER_TIME, (), True),
    (
        "prefill",
        "measured on this CPU" + OVERLAP_WORDS + PIPELINE_WORDS + STOP_WORDS + RESIDENT_WORDS,
        PREFILL_PIPELINE,
        None,
        STOP_AT_TARGET,
        True,
    ),
)
TARGET_SPEEDUP = 1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--json", help="also write every run as JSON here")
    parser.add_argument("--traces-dir", default=str(DEFAULT_TRACES_DIR), help="folder of the real traces")
    parser.add_argument("--ranks", type=int, default=64, help="EP size (default 64)")
    parser.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens per rank for the token trace (default 4096)")
    parser.add_argument("--microbatches", type=int, default=8, help="measured microbatches of the resampled run (default 8)")
    parser.add_argument("--slots", default="1,2,4", help="redundant slots per rank for every balancing policy (default 1,2,4)")
    parser.add_argument("--eplb-window", type=int, default=4, help="eplb / lp_reroute history window (default 4)")
    parser.add_argument("--eplb-interval", type=int, default=4, help="eplb / lp_reroute re-placement interval (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="resampling seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    command = "python benchmarks/simulate.py " + " ".join(argv if argv is not None else sys.argv[1:])

    # One thread: planner wall times are then one CPU core's, the unit of the planner's CPU target.
    torch.set_num_threads(1)
    traces_dir = Path(args.traces_dir)
    if not traces_dir.is_dir():
        print(f"error: traces folder {traces_dir} not found; pass --traces-dir", file=sys.stderr)
        return 2
    slots = tuple(int(part) for part in args.slots.split(","))
    hardware = get_hardware(HARDWARE)
    progress = False if args.no_progress else None

    # Step 1: workloads.
    workloads = build_workloads(traces_dir, args)
    bundled_note = compare_bundled(traces_dir / ESFT_FILE)

    # Step 2: plan each workload (quota once per copy cost), cost it for every model, mode and planner-time choice.
    sections = []
    all_results: list[SimulationResult] = []
    summary = []
    started = time.perf_counter()
    for workload in workloads:
        print(f"planning {workload.label} EP{workload.num_ranks} ({workload.num_microbatches} microbatches x {workload.num_layers} layers)", flush=True)
        cache: dict = {}  # quota plans depend on the copy settings, which several variants share
        for mode, planner_choice, settings, times, quota_settings, *resident in VARIANTS:
            policies = default_policies(
                slots, slots, eplb_window=args.eplb_window, eplb_interval=args.eplb_interval, quota_settings=quota_settings,
                plan_with_resident=bool(resident and resident[0]),
            )
            plans = plan_for_models(workload, policies, list(MODELS.values()), hardware, settings, cache=cache, progress=progress)
            results = [
                evaluate(workload, model_plans, model, hardware, settings, planner_time_s=times)
                for model, model_plans in zip(MODELS.values(), plans)
            ]
            mean = mean_over_models(results)
            all_results.extend(results + [mean])
            sections.append((workload, mode, planner_choice, results, mean))
            summary.append(target_check(workload, mode, planner_choice, mean))
            print(f"\n{workload.label} EP{workload.num_ranks} {mode}, planner time {planner_choice}: mean over models")
            print("\n".join(format_rows(mean.rows)), flush=True)
    elapsed = time.perf_counter() - started

    # Step 3: the markdown section.
    text = render_markdown(command, args, workloads, sections, summary, bundled_note, elapsed)
    Path(args.out).write_text(text)
    print(f"\nwrote {args.out}")
    if args.json:
        write_json(all_results, args.json)
        print(f"wrote {args.json}")
    return 0


def build_workloads(traces_dir: Path, args: argparse.Namespace) -> list[Workload]:
    """Return the ESFT workloads (resampled EP64, unresampled fill, EP64 at 512 tokens) and the step-load ones."""
    workloads = []
    esft = load_trace(traces_dir / ESFT_FILE)
    label = "ESFT token trace (DeepSeek-V2-Lite routing)"
    num_ranks = largest_divisor_at_most(esft.num_experts, args.ranks)
    fill_ranks = largest_divisor_at_most(esft.num_experts, max_ranks_without_reuse(esft, args.tokens_per_rank))
    if fill_ranks < num_ranks:
        workloads.append(
            token_trace_workload(
                esft, num_ranks, args.tokens_per_rank, resample=True, seed=args.seed, num_microbatches=args.microbatches,
                warmup_microbatches=args.eplb_window, label=label,
            )
        )
    workloads.append(token_trace_workload(esft, fill_ranks, args.tokens_per_rank, warmup_microbatches=args.eplb_window, label=label))
    small_tokens = esft.num_tokens // num_ranks
    small_tokens = 1 << (small_tokens.bit_length() - 1)  # a power of two the trace fills at this EP size
    if small_tokens != args.tokens_per_rank:
        workloads.append(token_trace_workload(esft, num_ranks, small_tokens, warmup_microbatches=args.eplb_window, label=label))
    for name in STEP_LOAD_FILES:
        path = traces_dir / name
        if not path.is_file():
            print(f"warning: {path} not found; skipped", file=sys.stderr)
            continue
        trace = load_trace(path)
        ranks = largest_divisor_at_most(trace.num_experts, args.ranks)
        workloads.append(load_trace_workload(trace, ranks, warmup_microbatches=args.eplb_window, label=f"{name} ({trace.model})"))
    return workloads


def compare_bundled(esft_path: Path) -> str:
    """Say whether the bundled trace routes exactly like the ESFT file (then its results are the ESFT rows)."""
    with np.load(bundled_trace_path()) as bundled, np.load(esft_path) as esft:
        same = bundled["topk_ids"].shape == esft["topk_ids"].shape and bool((bundled["topk_ids"] == esft["topk_ids"]).all())
    if same:
        return (
            "The bundled trace (`ultraep/traces/data/esft_dsv2lite_token_routing.npz`) holds the same `topk_ids` as "
            "the ESFT file (checked element by element), so its results are the ESFT rows below."
        )
    return "The bundled trace differs from the ESFT file; run `ultraep simulate --trace bundled` for its numbers."


def target_check(workload: Workload, mode: str, planner_choice: str, mean: SimulationResult) -> dict:
    """Compare the best quota policy with the targets and with the best eplb and lp_reroute of any slot count."""
    none = mean.row("none")

    def best_of(planner: str):
        return max((row for row in mean.rows if row.planner == planner), key=lambda row: row.throughput_pct_of_ideal)

    best, eplb, lp = best_of("quota"), best_of("eplb"), best_of("lp_reroute")
    headroom = 100.0 / none.throughput_pct_of_ideal
    if headroom < TARGET_SPEEDUP:
        speedup_verdict = "n/a (headroom < 1.5x)"
    elif best.speedup_over_none >= TARGET_SPEEDUP:
        speedup_verdict = "yes"
    else:
        speedup_verdict = "no"
    return {
        "workload": f"{workload.label} EP{workload.num_ranks}, {workload.tokens_per_rank:.0f} tokens/rank"
        + (", RESAMPLED" if workload.resampled else ""),
        "mode": mode,
        "planner": planner_choice,
        "imbalance": none.imbalance_before_mean,
        "none_pct": none.throughput_pct_of_ideal,
        "headroom": headroom,
        "copy_bound": mean.copy_bound_pct_of_ideal,
        "best": best.policy,
        "best_pct": best.throughput_pct_of_ideal,
        "best_speedup": best.speedup_over_none,
        "eplb": f"{eplb.throughput_pct_of_ideal:.1f} ({eplb.policy})",
        "lp": f"{lp.throughput_pct_of_ideal:.1f} ({lp.policy})",
        "pct_target": best.throughput_pct_of_ideal >= TARGET_PCT_OF_IDEAL,
        "speedup_target": speedup_verdict,
        "ahead": best.throughput_pct_of_ideal > max(eplb.throughput_pct_of_ideal, lp.throughput_pct_of_ideal),
    }


def render_markdown(command, args, workloads, sections, summary, bundled_note, elapsed) -> str:
    lines = [
        "## Simulated throughput on real traces",
        "",
        "Command (on the development machine, CPU only; planner times measured with one torch thread):",
        "",
        "```",
        command,
        "```",
        "",
        "System: GB200 NVL72 (72-GPU NVLink domain) as listed in `ultraep/sim/hardware.py`, default efficiencies "
        "(GEMM 0.7, HBM 0.8, NVLink 0.8, network 0.85), weight sync `auto`, one microbatch per optimizer step. "
        "Layer times count the routed experts' dispatch, grouped GEMM and combine plus balancing costs (planner, "
        "weight sync, backward re-sync, gradient reduce); attention, dense layers and shared experts are left out, so "
        "the ratios are MoE-layer ratios and whole-step ratios would sit closer to 1. The ideal puts every rank at the "
        "mean load with no balancing cost.",
        "",
        "Expert mapping: each trace keeps its own experts and routing; every expert takes the model's expert shape "
        "(hidden size, intermediate size, bf16 bytes) and each recorded assignment counts as top-k(model) / "
        "top-k(trace) model assignments, so a token costs the model's top-k expert passes.",
        "",
        f"Policies: `none`; `eplb` and `lp_reroute` (placement every {args.eplb_interval} microbatches from the last "
        f"{args.eplb_window}, replicas kept between placements) and `quota` (replicas every microbatch), each with "
        f"{args.slots} redundant slots per rank. `quota s=N` uses the runtime's default, one redundant-slot buffer "
        "set shared by all layers, so the backward re-syncs the replicas; `quota s=N layer-buffers` keeps one set per "
        "layer (`ManagerConfig.buffer_layers`), the memory `eplb` and `lp_reroute` use for their per-layer replicas: "
        "no backward re-sync, and a replica that stays in its slot is not copied again while the weights are "
        "unchanged. `eplb` plans off the critical path. Rows marked \"overlapped\" run every policy's forward "
        "weight sync in the background behind the masters' GEMM (`ManagerConfig.overlap_sync`) and, in training, "
        "the gradient reduce behind the next layer's backward GEMMs (`ManagerConfig.overlap_grad_reduce`); the others "
        "copy before the experts run and reduce after the backward. Rows marked \"pipelined\" also send every copy "
        f"in {PIPELINE_CHUNKS} chunks (blocks of intermediate rows). The replicas' gate and up projections run "
        "chunk by chunk as the chunks arrive, and the down projection once the copy is complete "
        f"(`ManagerConfig.pipeline_replicas` with `num_chunks` = {PIPELINE_CHUNKS}). "
        "Rows marked \"stop_at_target\" plan `quota` with `QuotaConfig(stop_at_target=True)`. Its threshold ladder "
        "ends after the first step with a plan at or below the balance target. Where plans reach the target, it "
        "plans in about half the time and keeps a few more replicas. The row with \"balance_target 1.05\" also "
        "loosens the target, which with copy costs is compared with the costed peak. Rows marked \"resident slots\" "
        "give the planner of each `quota ... layer-buffers` policy the experts whose weights its slots still hold "
        "from the layer's earlier microbatches (`ManagerConfig.plan_with_resident`). It then also tries plans "
        "that keep replicas where their weights are and counts no copy for them. "
        f"Wall time of the whole run: {elapsed / 60:.1f} min.",
        "",
        bundled_note,
        "",
        "### Targets (mean over the four models)",
        "",
        "| workload | mode | planner time | imbalance before | none % | max speedup left | copy bound % | best quota | % of ideal | speedup | best eplb % | best lp_reroute % | >= 96% | >= 1.5x | ahead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summary:
        lines.append(
            f"| {row['workload']} | {row['mode']} | {row['planner']} | {row['imbalance']:.3f} | {row['none_pct']:.1f} | "
            f"{row['headroom']:.2f}x | {row['copy_bound']:.1f} | {row['best']} | {row['best_pct']:.1f} | {row['best_speedup']:.2f}x | "
            f"{row['eplb']} | {row['lp']} | {'yes' if row['pct_target'] else 'no'} | "
            f"{row['speedup_target']} | {'yes' if row['ahead'] else 'no'} |"
        )
    lines += [
        "",
        "\"best quota\", \"best eplb\" and \"best lp_reroute\" each take their best slot count. \"ahead\" means the best "
        "quota row beats both. \"max speedup left\" is "
        "ideal time / `none` time: no policy can beat it, so where it is below 1.5x the trace is too uniform for "
        "the 1.5x target. \"copy bound\" is the most a policy that copies every replica it uses within the "
        "microbatch can reach (`SimulationResult.copy_bound_pct_of_ideal`). It counts per layer and microbatch the "
        "masters-only time, or at least one expert copy over the fastest link before the forward ends; below 96% no such policy "
        "meets the target. Persistent replicas (eplb, lp_reroute) and, in prefill, cached slots skip copies and are not bound by it.",
        "",
    ]
    for workload in workloads:
        lines += [f"### {workload.label}, EP{workload.num_ranks} ({workload.kind_label})", "", workload.description, ""]
        for section_workload, mode, planner_choice, results, mean in sections:
            if section_workload is not workload:
                continue
            lines += [f"**{mode}, planner time {planner_choice}** (mean over the four models):", ""]
            lines += markdown_table(mean)
            lines += [
                "",
                "\"layer us\": mean layer time (ideal: "
                f"{mean.rows[0].ideal_layer_time_us:.0f} us); \"balancing us\": planner + weight sync + re-sync + "
                "gradient reduce per layer. Per model, % of ideal:",
                "",
            ]
            lines += per_model_table(results)
            lines.append("")
    return "\n".join(lines) + "\n"


def markdown_table(result: SimulationResult) -> list[str]:
    lines = [
        "| policy | throughput % of ideal | speedup over none | imbalance before (mean / p99) | after (mean / p99) | replicas/layer | bytes moved/layer | planner us | layer us | balancing us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.policy} | {row.throughput_pct_of_ideal:.1f} | {row.speedup_over_none:.2f}x | "
            f"{row.imbalance_before_mean:.3f} / {row.imbalance_before_p99:.3f} | {row.imbalance_after_mean:.3f} / "
            f"{row.imbalance_after_p99:.3f} | {row.replicas_per_layer:.1f} | {row.bytes_moved_per_layer / 1e6:.1f} MB | "
            f"{row.planner_time_us:.0f} | {row.layer_time_us:.0f} | {row.balancing_time_us:.0f} |"
        )
    return lines


def per_model_table(results: list[SimulationResult]) -> list[str]:
    labels = [row.policy for row in results[0].rows]
    lines = ["| model | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for result in results:
        cells = [f"{row.throughput_pct_of_ideal:.1f}" for row in result.rows]
        lines.append(f"| {MODELS[result.model].display_name} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
