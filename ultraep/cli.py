"""Command line of ultraep: demo, plan and simulate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys

import numpy as np
import torch

from ultraep.evaluate import evaluate_planner, format_table
from ultraep.layout import MAX_TOTAL_LOAD, ExpertLayout, as_load_matrix, check_load_matrix
from ultraep.plan import PlanInvariantError, check_plan
from ultraep.planners.quota import QuotaConfig
from ultraep.planners.registry import PLANNER_NAMES, make_planner
from ultraep.traces.formats import NUM_EXPERTS_HINT

logger = logging.getLogger(__name__)

DEMO_EP_SIZES = (8, 16, 32, 64)
# History-based planners keep the masters only on a single load matrix, so `ultraep plan` omits them.
PLAN_COMMAND_PLANNERS = tuple(name for name in PLANNER_NAMES if name not in ("eplb", "lp_reroute"))
DEMO_MAX_MICROBATCHES = 4


class CommandError(Exception):
    """A user error: printed as ``ultraep: error: <message>`` with exit status 2."""


# Loading a load matrix from a file.


def check_output_path(path: str, option: str) -> None:
    """Raise ``ValueError`` unless ``path`` names a file that can be written: an existing folder, and not a folder itself."""
    out = pathlib.Path(path)
    if out.is_dir():
        raise ValueError(f"{option} {path!r} is a folder; give a file name inside it, e.g. {str(out / 'out')!r}")
    if not out.parent.is_dir():
        raise ValueError(f"{option} folder {str(out.parent)!r} does not exist; create it first or pick another path")


def read_loads(path: str) -> torch.Tensor:
    """Read a load matrix or vector from ``.npy`` or ``.json``; reject fractions, NaN and infinities."""
    file = pathlib.Path(path)
    if file.is_dir():
        raise CommandError(f"--loads {path!r} is a directory; pass a .npy or .json file")
    if not file.is_file():
        raise CommandError(f"--loads file {path!r} not found")
    if file.suffix == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except EOFError as error:
            raise CommandError(f"--loads file {path!r} is empty or truncated ({error}); save the array with numpy.save") from error
        except (ValueError, OSError) as error:
            raise CommandError(f"--loads file {path!r} is not a plain .npy array: {error}") from error
    elif file.suffix == ".json":
        text = file.read_text()
        if not text.strip():
            raise CommandError(f"--loads file {path!r} is empty; write the counts as a JSON list such as [[5, 3], [1, 1]]")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CommandError(f"--loads file {path!r} is not valid JSON: {error}") from error
        if not isinstance(data, list):
            raise CommandError(
                f"--loads file {path!r} contains a JSON {type(data).__name__}, but it must contain a list of counts "
                "([num_experts]) or a list of rows ([num_ranks, num_experts])"
            )
        _check_json_counts(data, path)
        if any(isinstance(row, list) for row in data):
            lengths = [len(row) if isinstance(row, list) else None for row in data]
            if len(set(lengths)) > 1:
                raise CommandError(
                    f"--loads file {path!r} does not contain a rectangular array: its rows have {lengths} entries "
                    "(None = not a row). Give every row num_experts entries"
                )
        try:
            array = np.asarray(data)
        except ValueError as error:
            raise CommandError(f"--loads file {path!r} does not contain a rectangular array of numbers: {error}") from error
    else:
        raise CommandError(f"--loads file {path!r} must end in .npy or .json, got {file.suffix!r}")
    if array.dtype == object or array.dtype.kind not in "iuf":
        raise CommandError(
            f"--loads must hold numbers in a [num_ranks, num_experts] or [num_experts] array, got dtype {array.dtype} "
            f"with shape {list(array.shape)}"
        )
    if array.size == 0:
        raise CommandError(f"--loads file {path!r} is empty (shape {list(array.shape)}). Give one count per expert")
    if array.dtype.kind == "f":
        # float64 represents every float16 and float32 value exactly, so the range check below needs no overflowing cast.
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
            raise CommandError(
                f"--loads entry {list(index)} is {array[index]}; loads must be finite counts (use 0 for an unused expert)"
            )
        if not (array == np.round(array)).all():
            index = tuple(int(i) for i in np.argwhere(array != np.round(array))[0])
            raise CommandError(
                f"--loads entry {list(index)} is {array[index]}; loads must be whole assignment counts, "
                "not fractions or averages"
            )
    # Check the range before casting: uint64 or huge floats would wrap to negative int64 values.
    if array.size and (array.max() > MAX_TOTAL_LOAD or array.min() < 0):
        index = tuple(int(i) for i in np.argwhere((array > MAX_TOTAL_LOAD) | (array < 0))[0])
        raise CommandError(
            f"--loads entry {list(index)} is {array[index]}; loads must be counts in [0, {MAX_TOTAL_LOAD}] "
            "(one microbatch's assignments)"
        )
    if array.ndim not in (1, 2):
        raise CommandError(
            f"--loads must be [num_ranks, num_experts] or [num_experts], got shape {list(array.shape)}"
        )
    return torch.from_numpy(array.astype(np.int64))


# Layout errors name the command-line flags rather than the ExpertLayout fields behind them.
_LAYOUT_FLAGS = (
    ("ExpertLayout.redundant_slots_per_rank", "--slots"),
    ("ExpertLayout.num_ranks", "--ranks"),
    ("num_ranks=", "--ranks "),
)


def _check_json_counts(data: list, path: str) -> None:
    """Reject JSON entries that are not numbers (booleans, strings, null) or lie past MAX_TOTAL_LOAD."""
    entries = []
    for i, row in enumerate(data):
        if isinstance(row, list):
            entries.extend(([i, j], value) for j, value in enumerate(row))
        else:
            entries.append(([i], row))
    for index, value in entries:
        if isinstance(value, list):
            continue  # a deeper list: the shape check names it
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CommandError(
                f"--loads entry {index} in {path!r} is the JSON value {json.dumps(value)}; loads must be whole "
                "assignment counts such as 0 or 12"
            )
        if isinstance(value, int) and not 0 <= value <= MAX_TOTAL_LOAD:
            raise CommandError(
                f"--loads entry {index} is {value}; loads must be counts in [0, {MAX_TOTAL_LOAD}] "
                "(one microbatch's assignments)"
            )


def flag_for_num_experts(message: str) -> str:
    """Return a trace loader's error with the fix worded for the command line."""
    message = message.replace(NUM_EXPERTS_HINT, "pass --num-experts N, the logical experts per layer")
    if message.startswith("num_experts must be a positive int"):
        message = "--num-experts" + message.removeprefix("num_experts")
    return message


def _layout_for(num_experts: int, ranks: int, slots: int) -> ExpertLayout:
    try:
        layout = ExpertLayout.from_num_experts(num_experts, ranks, slots)
    except (ValueError, TypeError) as error:
        message = str(error)
        for field, flag in _LAYOUT_FLAGS:
            message = message.replace(field, flag)
        raise CommandError(message) from error
    # A rank hosts at most one instance of each expert of the other ranks, so more slots stay empty
    # and would only cost memory (the planners allocate per slot).
    max_slots = _max_slots(num_experts, layout.num_ranks)
    if slots > max_slots:
        other_experts = num_experts - layout.experts_per_rank
        reason = (
            f"a rank hosts at most one instance of each of the {other_experts} expert(s) on other ranks"
            if other_experts
            else "with one rank every expert is a master there and no replica can be placed"
        )
        raise CommandError(f"--slots {slots} is too many: {reason}; use --slots {max_slots} or fewer")
    return layout


def _max_slots(num_experts: int, ranks: int) -> int:
    """Return the maximum redundant slots per rank that the CLI accepts: one per expert of the other ranks, at least 1."""
    return max(num_experts - num_experts // ranks, 1)


# ultraep plan


def run_plan(args: argparse.Namespace) -> int:
    if args.out:
        try:
            check_output_path(args.out, "--out")
        except ValueError as error:
            raise CommandError(str(error)) from error
    loads = read_loads(args.loads)
    num_experts = loads.shape[-1]
    layout = _layout_for(num_experts, args.ranks, args.slots)
    if loads.dim() == 2 and loads.shape[0] != layout.num_ranks:
        raise CommandError(
            f"--loads has {loads.shape[0]} rows but --ranks is {layout.num_ranks}; pass one row per source rank "
            "or a [num_experts] vector"
        )
    matrix = as_load_matrix(loads, layout)
    settings = {}
    if args.quota_setting:
        if args.planner != "quota":
            raise CommandError(
                f"--quota-setting applies only to --planner quota, got --planner {args.planner}. Drop it or use --planner quota"
            )
        try:
            settings = dict(parse_quota_settings(args.quota_setting))
        except ValueError as error:
            raise CommandError(str(error)) from error
    try:
        check_load_matrix(matrix, layout)
        planner = make_planner(args.planner, **settings)
        plan = planner(matrix, layout)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from error
    try:
        check_plan(plan, matrix)
    except PlanInvariantError as error:  # pragma: no cover - a planner bug, not a user error
        raise RuntimeError(f"planner {args.planner!r} produced an invalid plan: {error}") from error
    # One key per line, each list on one line, so the file stays readable at EP64.
    data = plan.to_dict()
    text = "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in data.items()) + "\n}\n"
    if args.out:
        out = pathlib.Path(args.out)
        out.write_text(text)
        logger.info("wrote plan for %s to %s", layout, args.out)
    else:
        sys.stdout.write(text)
    return 0


# ultraep demo


def _demo_loads(args: argparse.Namespace):
    from ultraep.traces import load_bundled_trace, load_trace, microbatch_loads

    if args.num_experts is not None and not args.trace:
        raise CommandError("--num-experts applies to a --trace file that does not store it; pass --trace FILE too")
    try:
        trace = load_trace(args.trace, num_experts=args.num_experts) if args.trace else load_bundled_trace()
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(flag_for_num_experts(str(error))) from error
    if not hasattr(trace, "topk_ids"):
        raise CommandError(
            f"--trace {args.trace!r} contains per-step loads; ultraep demo needs a token-level trace "
            "(per-step load traces work with ultraep simulate --trace)"
        )
    if args.ranks is not None:
        if trace.num_experts % args.ranks != 0:
            divisors = [d for d in range(1, trace.num_experts + 1) if trace.num_experts % d == 0]
            raise CommandError(
                f"--ranks {args.ranks} does not divide the trace's {trace.num_experts} experts; every rank must hold the "
                f"same number of masters, so use one of {divisors}"
            )
        sizes = [args.ranks]
    else:
        sizes = [r for r in DEMO_EP_SIZES if trace.num_experts % r == 0]
        if not sizes:
            raise CommandError(
                f"none of the demo's EP sizes {list(DEMO_EP_SIZES)} divides the trace's {trace.num_experts} experts; "
                "pick one that does with --ranks"
            )
    runs = []
    for ranks in sizes:
        tokens_per_rank = args.tokens_per_rank
        if tokens_per_rank is None:
            # Largest power of two up to 4096 that fills two microbatches at this EP size, so the
            # periodic baseline has one past microbatch to plan from.
            fit = trace.num_tokens // (2 * ranks)
            tokens_per_rank = min(4096, 2 ** int(math.log2(fit))) if fit >= 1 else 0
        if tokens_per_rank < 1:
            if args.ranks is not None:
                raise CommandError(
                    f"--ranks {ranks} needs at least {2 * ranks} tokens (two microbatches of one token per rank), but the "
                    f"trace holds {trace.num_tokens}; use --ranks <= {trace.num_tokens // 2} or a longer trace"
                )
            logger.warning("the trace has %d tokens, too few for %d ranks; skipped", trace.num_tokens, ranks)
            continue
        if ranks * tokens_per_rank > trace.num_tokens:
            # The demo slices the trace without resampling, so the library's hint to resample does not apply.
            fix = (
                f"use --tokens-per-rank <= {trace.num_tokens // ranks}"
                if trace.num_tokens >= ranks
                else f"use --ranks <= {trace.num_tokens} or a longer trace"
            )
            raise CommandError(
                f"--tokens-per-rank {tokens_per_rank} x {ranks} ranks needs {ranks * tokens_per_rank} tokens for one "
                f"microbatch, but the trace holds {trace.num_tokens}; {fix} "
                "(ultraep simulate resamples whole sequences for larger runs)"
            )
        try:
            sliced = microbatch_loads(trace, ranks, tokens_per_rank)
        except ValueError as error:
            raise CommandError(str(error)) from error
        loads = sliced.loads[: args.microbatches]
        runs.append((ranks, tokens_per_rank, loads, sliced.loads.shape[0], sliced.description))
    if not runs:
        raise CommandError(
            f"the trace contains {trace.num_tokens} tokens, too few for two microbatches at any of the EP sizes {sizes}; "
            "use a longer trace or a smaller --ranks"
        )
    return trace, runs


def run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    trace, runs = _demo_loads(args)
    slot_choices = [args.slots] if args.slots is not None else [1, 2]
    print(f"trace: {trace.model} ({trace.num_tokens} tokens, {trace.num_layers} MoE layers, "
          f"{trace.num_experts} experts, top-{trace.topk}); source: {trace.source}")

    def slots_for(ranks: int) -> list[int]:
        # A default slot count above what this EP size can use is left out; a given --slots is checked.
        return [s for s in slot_choices if args.slots is not None or s <= _max_slots(trace.num_experts, ranks)]

    work = sum(loads.shape[0] * loads.shape[1] * (1 + 2 * len(slots_for(ranks))) for ranks, _, loads, _, _ in runs)
    results = []
    torch.set_num_threads(1)
    with tqdm(total=work, desc="planning", unit="plan", disable=args.no_progress or None, file=sys.stderr) as bar:
        for ranks, tokens_per_rank, loads, _, description in runs:
            logger.info("EP%d: %s", ranks, description)
            base_layout = _layout_for(trace.num_experts, ranks, 0)
            results.append(evaluate_planner("none", lambda: make_planner("none"), loads, base_layout, progress=bar.update))
            for slots in slots_for(ranks):
                layout = _layout_for(trace.num_experts, ranks, slots)
                # The periodic baseline re-places every microbatch from the one before it; its
                # first microbatch has no history and keeps the masters only.
                results.append(
                    evaluate_planner(
                        "eplb (previous microbatch)",
                        lambda: make_planner("eplb", window=1, interval=1),
                        loads,
                        layout,
                        progress=bar.update,
                    )
                )
                results.append(evaluate_planner("quota", lambda: make_planner("quota"), loads, layout, progress=bar.update))
    print()
    for ranks, tokens_per_rank, loads, num_sliced, description in runs:
        print(
            f"EP{ranks}: the first {loads.shape[0]} of {num_sliced} microbatch(es) x {loads.shape[1]} layers, "
            f"{tokens_per_rank} tokens per rank. {description}"
        )
    print()
    print(format_table(results))
    print()
    print("imbalance = max rank load / mean rank load (1.0 is perfect); plan ms = planner wall time on one CPU thread.")
    print("eplb (previous microbatch) has no history in the first microbatch and keeps the masters only there.")
    return 0


def parse_quota_settings(items: list[str], implied: dict | None = None) -> tuple[tuple[str, object], ...]:
    """Parse ``NAME=VALUE`` items into QuotaConfig settings, typed by the field's default.

    implied: settings the run adds where the items name none (the automatic copy settings). They
    take part in the validity check only, so a combination they complete is accepted.
    """
    fields = {f.name: f for f in dataclasses.fields(QuotaConfig)}
    settings = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in fields:
            raise ValueError(
                f"--quota-setting takes NAME=VALUE with NAME one of {sorted(fields)}, e.g. min_replica_quota=1000; got {item!r}"
            )
        default = fields[name].default
        if isinstance(default, bool):
            kind, parse = "true or false", _parse_bool
        elif isinstance(default, float):
            kind, parse = "float", float
        elif default is None:  # num_rounds: an int, or None for the planner's default
            kind, parse = "int or none", _parse_optional_int
        else:
            kind, parse = "int", int
        try:
            value = parse(text)
        except ValueError as error:
            raise ValueError(f"--quota-setting {name} takes {kind}, got {text!r}") from error
        if name in settings:
            raise ValueError(f"--quota-setting {name} is given twice ({settings[name]!r} and {value!r}). Give it once")
        settings[name] = value
    try:
        QuotaConfig(**{**(implied or {}), **settings})
    except (TypeError, ValueError) as error:
        raise ValueError(f"--quota-setting: {error}") from error
    return tuple(sorted(settings.items()))


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


# Argument parsing.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultraep", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="balance a real routing trace (the bundled one by default)")
    demo.add_argument("--trace", help="token-level trace (.npz or .npy); default: the bundled DeepSeek-V2-Lite trace")
    demo.add_argument("--num-experts", type=int, help="logical experts per layer of a --trace that does not store them (.npy, bare topk_ids .npz)")
    demo.add_argument("--ranks", type=int, help="EP size; default: 8, 16, 32 and 64 where they divide the experts")
    demo.add_argument("--slots", type=int, help="redundant slots per rank; default: 1 and 2")
    demo.add_argument("--tokens-per-rank", type=int, help="tokens per rank in one microbatch; default: up to 4096")
    demo.add_argument("--microbatches", type=int, default=DEMO_MAX_MICROBATCHES, help="at most this many microbatches per EP size (default 4)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=run_demo, command_parser=demo)

    plan = commands.add_parser("plan", help="plan one load matrix and write the plan as JSON")
    plan.add_argument("--loads", required=True, help=".npy or .json: [num_ranks, num_experts] or [num_experts] counts")
    plan.add_argument("--ranks", type=int, required=True, help="EP size (ranks)")
    plan.add_argument("--slots", type=int, required=True, help="redundant slots per rank")
    plan.add_argument(
        "--planner",
        default="quota",
        choices=PLAN_COMMAND_PLANNERS,
        help="planner (default: quota); the history-based eplb and lp_reroute need past microbatches, see ultraep simulate",
    )
    plan.add_argument(
        "--quota-setting",
        action="append",
        metavar="NAME=VALUE",
        help="a QuotaConfig setting for the quota planner, e.g. copy_cost=900 or balance_target=1.0; repeat for more",
    )
    plan.add_argument("--out", help="write the plan JSON here instead of standard output")
    plan.set_defaults(func=run_plan, command_parser=plan)

    try:
        from ultraep.sim.command import add_simulate_arguments, run_simulate
    except ImportError:  # pragma: no cover - the simulator ships with the package
        pass
    else:
        simulate = commands.add_parser("simulate", help="replay traces through a throughput model, policies side by side")
        add_simulate_arguments(simulate)
        simulate.set_defaults(func=run_simulate, command_parser=simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("ranks", "slots", "tokens_per_rank", "microbatches"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "slots" else 1):
            # The subcommand's parser, so the usage line shows that command's flags.
            args.command_parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'slots' else 1}, got {value}")
    try:
        return args.func(args)
    except CommandError as error:
        parser.exit(2, f"{args.command_parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
