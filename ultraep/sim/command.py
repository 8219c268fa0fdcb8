"""The ``ultraep simulate`` command: replay traces through the cost model, balancing policies side by side.

Example::

    ultraep simulate --model qwen3-235b --hardware gb200-nvl72 --ranks 64 --trace trace.npz --mode train

Trace handling:

- A token trace is cut into microbatches of ``--tokens-per-rank`` consecutive tokens per rank. When
  the requested EP size needs more tokens than the trace holds, the run draws whole sequences with
  replacement and is labelled RESAMPLED, and the largest EP size the trace fills without reuse is
  run next to it, unresampled.
- A step-load trace gives one microbatch per step. Each expert's count is split evenly over the
  source ranks, because the trace does not record which rank produced it.
- The EP size must divide the trace's expert count; the largest divisor not above ``--ranks`` is used
  and the output states it.
- The trace's experts keep the trace's routing and take the model's expert shape; the output states
  the mapping (see :func:`ultraep.sim.replay.expert_mapping`).
- ``--synthetic zipf|moving`` generates loads with the model's own experts and top-k, always labelled
  SYNTHETIC.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path

import torch

from ultraep.cli import check_output_path, flag_for_num_experts, parse_quota_settings
from ultraep.planners.eplb import EplbConfig
from ultraep.planners.quota import QuotaConfig
from ultraep.sim.cost import MODES, SYNC_SCHEMES, CostSettings
from ultraep.sim.hardware import HARDWARE, Efficiency, get_hardware
from ultraep.sim.models import MODELS, get_model
from ultraep.sim.replay import (
    DEFAULT_BASELINE_SLOTS,
    DEFAULT_EPLB_INTERVAL,
    DEFAULT_EPLB_WINDOW,
    DEFAULT_QUOTA_SLOTS,
    QUOTA_BUFFERS,
    SimulationResult,
    Workload,
    copy_cost_settings,
    default_policies,
    evaluate,
    largest_divisor_at_most,
    load_trace_workload,
    mean_over_models,
    plan_for_models,
    synthetic_workload,
    token_trace_workload,
    write_csv,
    write_json,
)
from ultraep.traces import LoadTrace, TokenTrace, load_bundled_trace, load_trace, max_ranks_without_reuse

__all__ = ["add_simulate_arguments", "build_workloads", "run_simulate"]

logger = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_RANK = 4096
DEFAULT_RESAMPLED_MICROBATCHES = 8


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``ultraep simulate`` to ``parser``."""
    parser.add_argument("--model", default="qwen3-235b", choices=sorted(MODELS), help="model (default: qwen3-235b)")
    parser.add_argument("--all", action="store_true", help="run every model and also print the mean over models")

    parser.add_argument("--hardware", default="gb200-nvl72", choices=sorted(HARDWARE), help="system (default: gb200-nvl72)")
    parser.add_argument("--ranks", type=int, default=64, help="EP size (default 64)")
    parser.add_argument(
        "--trace",
        action="append",
        help="routing trace (.npz or .npy); repeat for several; 'bundled' = the bundled ESFT trace (the default)",
    )
    parser.add_argument("--num-experts", type=int, help="logical experts of a .npy trace, which does not store them")
    parser.add_argument("--synthetic", choices=("zipf", "moving"), help="use SYNTHETIC loads instead of a trace")
    parser.add_argument("--skew", type=float, default=None, help="Zipf skew of --synthetic zipf (default 1.0)")
    parser.add_argument(
        "--tokens-per-rank",
        type=int,
        default=DEFAULT_TOKENS_PER_RANK,
        help=f"tokens per rank in one microbatch of a token trace or synthetic run (default {DEFAULT_TOKENS_PER_RANK})",
    )

    parser.add_argument("--mode", default="train", choices=MODES, help="train (forward and backward) or prefill (default train)")
    parser.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help=f"measured microbatches: resampled and synthetic runs form this many (default {DEFAULT_RESAMPLED_MICROBATCHES}); "
        "unresampled traces use every microbatch they fill, at most this many when it is given",
    )

    parser.add_argument("--quota-slots", default=_join(DEFAULT_QUOTA_SLOTS), help="redundant slots per rank for quota, comma-separated (default 1,2,4)")
    parser.add_argument(
        "--baseline-slots", default=_join(DEFAULT_BASELINE_SLOTS), help="redundant slots per rank for eplb and lp_reroute (default 2)"
    )
    parser.add_argument(
        "--quota-buffers",
        default="shared,layer",
        help="quota's redundant-slot buffers, comma-separated: shared (one set for all layers) and/or layer "
        "(one set per layer, kept between microbatches) (default shared,layer)",
    )
    parser.add_argument(
        "--resident",
        action="store_true",
        help="in prefill, give the planner of the layer-buffer policies the experts their slots still contain "
        "(ManagerConfig.plan_with_resident), so it can keep replicas where their weights are",
    )
    parser.add_argument(
        "--quota-setting",
        action="append",
        metavar="NAME=VALUE",
        help="a QuotaConfig setting for every quota policy, e.g. min_replica_quota=1000 (in the trace's assignments); "
        "repeat for several. Names: " + ", ".join(f.name for f in dataclasses.fields(QuotaConfig)),
    )
    parser.add_argument(
        "--copy-cost",
        choices=("auto", "off"),
        default="auto",
        help="auto: every quota policy plans with its model's weight-copy cost (QuotaConfig copy_cost, copy_overlap "
        "and copy_chunks from the model, hardware and sync settings), so it keeps only the replicas worth their copy; "
        "off: quota treats copies as free. Each copy_* setting given with --quota-setting replaces that one "
        "setting (default auto)",
    )
    parser.add_argument("--eplb-window", type=int, default=DEFAULT_EPLB_WINDOW, help="microbatches of history per placement (default 4)")
    parser.add_argument("--eplb-interval", type=int, default=DEFAULT_EPLB_INTERVAL, help="microbatches between placements (default 4)")
    parser.add_argument(
        "--planner-time-us",
        action="append",
        metavar="POLICY=US",
        help="planner time on the critical path in microseconds for a planner name or policy label, e.g. quota=30; "
        "default: the median wall time measured on this CPU",
    )

    parser.add_argument("--sync-scheme", default="auto", choices=SYNC_SCHEMES, help="replica weight sync (default auto)")
    parser.add_argument("--microbatches-per-step", type=int, default=1, help="microbatches per optimizer step (default 1)")
    parser.add_argument(
        "--overlap-sync",
        action="store_true",
        help="run the forward weight sync in the background behind the masters' GEMM, as ManagerConfig.overlap_sync does",
    )
    parser.add_argument(
        "--pipeline-replicas",
        action="store_true",
        help="with --overlap-sync: send each copy in --sync-chunks chunks and compute replicas chunk by chunk as they "
        "arrive, as ManagerConfig.pipeline_replicas does; applies to every policy's copies",
    )
    parser.add_argument(
        "--sync-chunks", type=int, default=4, help="chunks per expert copy for relays and --pipeline-replicas (default 4)"
    )
    parser.add_argument(
        "--step-latency-us",
        type=float,
        default=0.0,
        help="fixed cost of one weight sync or gradient reduce step (one batch of point-to-point sends), in us; "
        "relay trees take chunks + depth - 1 steps (default 0: left out, not measured)",
    )
    parser.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="run the gradient reduce in the background behind the next layer's backward GEMMs, as "
        "ManagerConfig.overlap_grad_reduce does",
    )
    parser.add_argument(
        "--hide-backward-replica-traffic",
        action="store_true",
        help="leave backward re-sync and gradient reduce off the critical path (optimistic bound for perfect overlap)",
    )
    defaults = Efficiency()
    for name in ("gemm", "hbm", "nvlink", "network"):
        parser.add_argument(
            f"--{name}-efficiency", type=float, default=getattr(defaults, name), help=f"fraction of peak reached (default {getattr(defaults, name)})"
        )

    parser.add_argument("--seed", type=int, default=0, help="seed for resampling and synthetic loads (default 0)")
    parser.add_argument("--csv", help="write every run's rows to this CSV file")
    parser.add_argument("--json", help="write every run to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch while planning and costing (default 1: planner times are for one core)"
    )


# Library errors name a settings field. The command names the flag that sets it instead.
_SETTING_FLAGS = (
    ("EplbConfig.window", "--eplb-window"),
    ("EplbConfig.interval", "--eplb-interval"),
    ("Efficiency.gemm", "--gemm-efficiency"),
    ("Efficiency.hbm", "--hbm-efficiency"),
    ("Efficiency.nvlink", "--nvlink-efficiency"),
    ("Efficiency.network", "--network-efficiency"),
    ("CostSettings.microbatches_per_step", "--microbatches-per-step"),
    ("CostSettings.sync_chunks", "--sync-chunks"),
)


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``ultraep simulate``; print the tables and return the exit status (2 for invalid input)."""
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        message = str(error)
        for field, flag in _SETTING_FLAGS:
            message = message.replace(field, flag)
        print(f"ultraep simulate: error: {message}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> int:
    # Step 1: configuration. One thread by default, so measured planner times are one core's.
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    _check_combinations(args)
    for option, path in (("--csv", args.csv), ("--json", args.json)):
        if path:
            check_output_path(path, option)
    EplbConfig(window=args.eplb_window, interval=args.eplb_interval)  # raises on a bad window or interval
    torch.set_num_threads(args.threads)
    models = list(MODELS.values()) if args.all else [get_model(args.model)]
    hardware = get_hardware(args.hardware)
    efficiency = Efficiency(
        gemm=args.gemm_efficiency, hbm=args.hbm_efficiency, nvlink=args.nvlink_efficiency, network=args.network_efficiency
    )
    if args.pipeline_replicas and not args.overlap_sync:
        raise ValueError("--pipeline-replicas needs --overlap-sync: replicas compute early chunks only while the sync runs in the background")
    if args.sync_chunks < 1:
        raise ValueError(f"--sync-chunks must be >= 1, got {args.sync_chunks}")
    if not (math.isfinite(args.step_latency_us) and args.step_latency_us >= 0):
        raise ValueError(f"--step-latency-us must be a finite number >= 0, got {args.step_latency_us}")
    settings = CostSettings(
        mode=args.mode,
        sync_chunks=args.sync_chunks,
        step_latency_s=args.step_latency_us * 1e-6,
        pipeline_replicas=args.pipeline_replicas,
        efficiency=efficiency,
        sync_scheme=args.sync_scheme,
        microbatches_per_step=args.microbatches_per_step,
        hide_backward_replica_traffic=args.hide_backward_replica_traffic,
        overlap_sync=args.overlap_sync,
        overlap_grad_reduce=args.overlap_grad_reduce,
    )
    # With --copy-cost auto, copy_overlap comes from --overlap-sync unless the user sets it.
    implied = {"copy_overlap": args.overlap_sync} if args.copy_cost == "auto" else {}
    quota_settings = parse_quota_settings(args.quota_setting or [], implied)
    policies = default_policies(
        _parse_slots(args.quota_slots, "--quota-slots"),
        _parse_slots(args.baseline_slots, "--baseline-slots"),
        eplb_window=args.eplb_window,
        eplb_interval=args.eplb_interval,
        quota_buffers=_parse_buffers(args.quota_buffers),
        quota_settings=quota_settings,
        plan_with_resident=args.resident,
    )
    planner_time_s = _parse_planner_times(args.planner_time_us or [])
    known = sorted({spec.label for spec in policies} | {spec.planner for spec in policies})
    unknown = sorted(set(planner_time_s) - set(known))
    if unknown:
        raise ValueError(
            f"--planner-time-us: this run has no planner or policy named {', '.join(repr(name) for name in unknown)}; "
            f"use one of {', '.join(known)}"
        )
    progress = False if args.no_progress else None
    if settings.mode == "train":
        training_words = (
            f"{settings.microbatches_per_step} microbatch(es) per optimizer step; "
            f"gradient reduce {'in the background' if settings.overlap_grad_reduce else 'after the backward'}; "
            f"backward replica traffic {'hidden (optimistic)' if settings.hide_backward_replica_traffic else 'on the critical path'}; "
        )
    else:
        ignored = [
            flag
            for flag, used in (
                ("--overlap-grad-reduce", settings.overlap_grad_reduce),
                ("--hide-backward-replica-traffic", settings.hide_backward_replica_traffic),
                ("--microbatches-per-step", settings.microbatches_per_step != 1),
            )
            if used
        ]
        training_words = f"{', '.join(ignored)} ignored (no backward in prefill); " if ignored else ""
    print(
        f"ultraep simulate: {hardware.display_name}, EP{args.ranks} requested, mode {args.mode}; efficiency "
        f"gemm {efficiency.gemm}, hbm {efficiency.hbm}, nvlink {efficiency.nvlink}, network {efficiency.network}; "
        f"weight sync {settings.sync_scheme}; "
        + (f"quota settings {', '.join(args.quota_setting)}; " if args.quota_setting else "")
        + _copy_cost_words(args.copy_cost, quota_settings)
        + f"forward weight sync {'in the background' if settings.overlap_sync else 'before the experts'}"
        f"{f', replicas computed chunk by chunk ({settings.sync_chunks} chunks)' if settings.pipeline_replicas else ''}; "
        + (f"{args.step_latency_us:g} us per sync or reduce step; " if args.step_latency_us else "")
        + training_words
        + f"{args.threads} CPU thread(s)."
    )
    print(
        "Layer times count the routed experts' dispatch, grouped GEMM and combine plus balancing costs; "
        "attention, dense layers and shared experts are left out, so ratios are MoE-layer ratios."
    )

    set_words = ", ".join(f"{name} {seconds * 1e6:g} us" for name, seconds in planner_time_s.items())
    print(
        "Planner time on the critical path: "
        + (f"set with --planner-time-us for {set_words}; every other planner" if set_words else "every planner")
        + f" on the critical path uses the median wall time of its calls measured on this host's CPU with {args.threads} "
        "thread(s). On a GPU system the planner runs on the GPU, so pass a GPU measurement as --planner-time-us quota=<us>."
    )
    print(
        "Policies: s=N is N redundant slots per rank; layer-buffers keeps one set of slot buffers per layer between "
        "microbatches. ideal = every rank at the mean load with no balancing cost."
    )
    print(
        "bytes moved/layer: replica weight copies (forward sync, and in training the backward re-sync) plus replica "
        "gradients sent back to their masters, summed over ranks, per layer and microbatch; eplb and lp_reroute "
        "spread their refresh after each optimizer step over the microbatches of a step."
    )

    # Step 2: workloads, planning and evaluation.
    all_results: list[SimulationResult] = []
    sources = [("synthetic", None)] if args.synthetic else [("trace", path) for path in (args.trace or ["bundled"])]
    for kind, path in sources:
        if kind == "synthetic":
            # Synthetic loads use each model's own experts, so each model gets its own workload.
            per_model = [(build_synthetic(args, model), [model]) for model in models]
        else:
            trace, label = _read_trace(path, args.num_experts)
            per_model = [(workload, models) for workload in build_workloads(trace, label, args)]
        for workload, workload_models in per_model:
            _check_slots(workload, args)
            plans = plan_for_models(
                workload, policies, workload_models, hardware, settings, copy_cost=args.copy_cost == "auto", progress=progress
            )
            results = [
                evaluate(workload, model_plans, model, hardware, settings, planner_time_s=planner_time_s)
                for model, model_plans in zip(workload_models, plans)
            ]
            if args.copy_cost == "auto" and "copy_cost" not in dict(quota_settings):
                for workload_model in workload_models:
                    cost = dict(copy_cost_settings(workload, workload_model, hardware, settings))["copy_cost"]
                    scale = workload_model.top_k / workload.trace_top_k
                    print(
                        f"{workload_model.name}: one expert copy takes as long as the GEMMs of {cost} of the trace's "
                        f"assignments ({cost * scale:.0f} of the model's top-{workload_model.top_k} assignments)"
                        + (", forward and backward" if settings.mode == "train" else "")
                    )
            for result in results:
                print()
                print(result.format_table())
                for line in _slower_than_none_notes(result):
                    print(line)
            if len(results) > 1:
                mean = mean_over_models(results)
                print()
                print(mean.format_table())
                results.append(mean)
            all_results.extend(results)
    if args.all and args.synthetic:
        print("\nSynthetic runs differ per model (each uses the model's experts), so no mean over models is printed.")

    # Step 3: files.
    if args.csv:
        write_csv(all_results, args.csv)
        print(f"\nwrote {args.csv}")
    if args.json:
        write_json(all_results, args.json)
        print(f"wrote {args.json}")
    return 0


def _slower_than_none_notes(result: SimulationResult) -> list[str]:
    """Return a note for each quota policy that runs slower than ``none`` while paying a planner time."""
    none = next((row for row in result.rows if row.planner == "none"), None)
    if none is None:
        return []
    return [
        f"note: {row.policy} runs slower than none here ({row.throughput_pct_of_ideal:.1f}% against "
        f"{none.throughput_pct_of_ideal:.1f}% of ideal): its planner time on the critical path ({row.planner_time_us:.0f} us "
        f"per layer, {row.planner_time_source}) plus its copies cost more than the imbalance it removes. Balance only "
        "larger microbatches, or pass a GPU planner time with --planner-time-us quota=US."
        for row in result.rows
        if row.planner == "quota" and row.throughput_pct_of_ideal < none.throughput_pct_of_ideal and row.planner_time_us > 0
    ]


def _check_combinations(args: argparse.Namespace) -> None:
    """Reject options that this run would otherwise ignore."""
    if args.synthetic and args.trace:
        raise ValueError("--synthetic and --trace exclude each other: a run uses either generated loads or traces")
    if args.skew is not None and args.synthetic != "zipf":
        raise ValueError(f"--skew {args.skew:g} sets the skew of --synthetic zipf only; add --synthetic zipf or drop --skew")
    if args.resident and args.mode != "prefill":
        raise ValueError(
            "--resident applies to --mode prefill: in training each backward changes the weights, so no slot "
            "keeps a current copy; drop --resident or use --mode prefill"
        )
    if args.resident and "layer" not in _parse_buffers(args.quota_buffers):
        raise ValueError(
            f"--resident plans the layer-buffer policies with their resident slots, but --quota-buffers "
            f"{args.quota_buffers!r} has no layer buffers; add layer to --quota-buffers or drop --resident"
        )
    if args.microbatches is not None and args.microbatches < 1:
        raise ValueError(f"--microbatches must be >= 1, got {args.microbatches}")


def _check_slots(workload: Workload, args: argparse.Namespace) -> None:
    """Reject slot counts above what a rank of this workload's layout can fill."""
    per_rank = workload.num_experts // workload.num_ranks
    limit = workload.num_experts - per_rank
    for option, text in (("--quota-slots", args.quota_slots), ("--baseline-slots", args.baseline_slots)):
        too_many = [slots for slots in _parse_slots(text, option) if slots > limit]
        if too_many:
            raise ValueError(
                f"{option} {too_many[0]} is too many at EP{workload.num_ranks} with {workload.num_experts} experts: a rank "
                f"hosts at most one instance of each of the {limit} expert(s) on other ranks; use {option} values "
                f"of {limit} or fewer"
            )


def build_workloads(trace: TokenTrace | LoadTrace, label: str, args: argparse.Namespace) -> list[Workload]:
    """Form the workloads of one trace for the requested EP size (see the module docstring).

    Reads ``args.ranks``, ``args.tokens_per_rank``, ``args.microbatches``, ``args.seed`` and
    ``args.eplb_window``. Returns one workload, or a RESAMPLED one followed by the unresampled run at
    the largest EP size the trace fills. Each workload's description gives the reason for its EP size.
    """
    num_ranks = largest_divisor_at_most(trace.num_experts, args.ranks)
    divisor_note = (
        f"EP{args.ranks} does not divide the trace's {trace.num_experts} experts, so EP{num_ranks} (the largest "
        f"divisor not above {args.ranks}) is used. "
        if num_ranks != args.ranks
        else ""
    )
    if divisor_note:
        logger.warning("%s", divisor_note.strip())
    if isinstance(trace, LoadTrace):
        workload = load_trace_workload(
            trace, num_ranks, num_microbatches=args.microbatches, warmup_microbatches=args.eplb_window, label=label
        )
        return [_with_note(workload, divisor_note)]
    if trace.num_tokens == 0:
        raise ValueError(f"trace {label} contains no tokens; pass a trace with at least one token per rank")
    tokens_per_rank = args.tokens_per_rank
    fill_ranks = largest_divisor_at_most(trace.num_experts, max_ranks_without_reuse(trace, tokens_per_rank))
    if fill_ranks >= num_ranks:
        workload = token_trace_workload(
            trace, num_ranks, tokens_per_rank, num_microbatches=args.microbatches, warmup_microbatches=args.eplb_window, label=label
        )
        return [_with_note(workload, divisor_note)]
    workloads = []
    if trace.seq_ids is not None:
        resampled = token_trace_workload(
            trace,
            num_ranks,
            tokens_per_rank,
            resample=True,
            seed=args.seed,
            num_microbatches=args.microbatches,
            warmup_microbatches=args.eplb_window,
            label=label,
        )
        note = (
            f"{divisor_note}The trace's {trace.num_tokens} tokens fill at most EP{fill_ranks} at {tokens_per_rank} "
            f"tokens per rank, so this EP{num_ranks} run RESAMPLES whole sequences; the unresampled EP{fill_ranks} "
            "run stands next to it. "
        )
        workloads.append(_with_note(resampled, note))
    elif fill_ranks >= 1:
        logger.warning("trace %s has no sequence ids, so EP%d cannot be resampled; running EP%d only", label, num_ranks, fill_ranks)
    if fill_ranks >= 1:
        unresampled = token_trace_workload(
            trace, fill_ranks, tokens_per_rank, num_microbatches=args.microbatches, warmup_microbatches=args.eplb_window, label=label
        )
        note = f"EP{fill_ranks} is the largest EP size the trace fills at {tokens_per_rank} tokens per rank without reusing a token. "
        workloads.append(_with_note(unresampled, note))
    if not workloads:
        raise ValueError(
            f"trace {label} is too short: it has {trace.num_tokens} tokens, fewer than one rank's {tokens_per_rank}, "
            "and no sequence ids to resample; lower --tokens-per-rank"
        )
    return workloads


def _with_note(workload: Workload, note: str) -> Workload:
    return dataclasses.replace(workload, description=note + workload.description) if note else workload


def build_synthetic(args: argparse.Namespace, model) -> Workload:
    """Generate the SYNTHETIC workload of ``args.synthetic`` with the model's experts and top-k."""
    num_ranks = largest_divisor_at_most(model.num_experts, args.ranks)
    return synthetic_workload(
        args.synthetic,
        num_ranks,
        model.num_experts,
        args.tokens_per_rank,
        model.top_k,
        skew=1.0 if args.skew is None else args.skew,
        num_microbatches=DEFAULT_RESAMPLED_MICROBATCHES if args.microbatches is None else args.microbatches,
        seed=args.seed,
        warmup_microbatches=args.eplb_window,
    )


def _read_trace(path: str, num_experts: int | None) -> tuple[TokenTrace | LoadTrace, str]:
    if path == "bundled":
        return load_bundled_trace(), "bundled ESFT trace (DeepSeek-V2-Lite routing)"
    try:
        return load_trace(path, num_experts=num_experts), Path(path).name
    except ValueError as error:
        raise ValueError(flag_for_num_experts(str(error))) from error


def _parse_slots(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise ValueError(f"{option} must be comma-separated integers such as 1,2,4, got {text!r}") from error
    if any(value < 1 for value in values):
        raise ValueError(f"{option} values must be >= 1 (a balancing policy needs a redundant slot), got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{option} names a slot count twice in {text!r}; list each once, e.g. 1,2,4")
    return values


def _parse_buffers(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in QUOTA_BUFFERS]
    if unknown or not names:
        raise ValueError(f"--quota-buffers must list shared and/or layer, comma-separated (e.g. shared,layer), got {text!r}")
    return names


def _parse_planner_times(items: list[str]) -> dict[str, float]:
    times = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            microseconds = float(value)
        except ValueError:
            microseconds = float("nan")
        if not sep or not name or not microseconds >= 0:
            raise ValueError(f"--planner-time-us takes POLICY=MICROSECONDS with a value >= 0, e.g. quota=30; got {item!r}")
        times[name] = microseconds * 1e-6
    return times


def _copy_cost_words(copy_cost: str, quota_settings: tuple[tuple[str, object], ...]) -> str:
    """Return the header's words on the quota policies' copy settings (``copy_cost`` is --copy-cost)."""
    named = [name for name, _ in quota_settings if name.startswith("copy_")]
    if copy_cost == "auto":
        own = f" ({', '.join(named)} from --quota-setting)" if named else ""
        return f"quota plans with each model's copy cost{own}; "
    if named:
        return f"quota copy settings only from --quota-setting ({', '.join(named)}); "
    return "quota treats copies as free; "


def _join(values) -> str:
    return ",".join(str(value) for value in values)
