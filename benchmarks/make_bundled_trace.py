"""Regenerate the bundled demo trace from the converted ESFT DeepSeek-V2-Lite token trace.

Usage:
    python benchmarks/make_bundled_trace.py /path/to/esft_dsv2lite_token_routing.npz
        [--output ultraep/traces/data/esft_dsv2lite_token_routing.npz]

The input is the token trace converted from github.com/deepseek-ai/ESFT (MIT) at commit
579a7711e4b332b4c57b47e378a0cf240d85caa6, files results/expert_scores/{intent,law,summary,translation}/
expert_weights_{1..26}.txt, with arrays topk_ids [33279, 26, 6] int16, topk_weights, seq_id,
pos_in_seq, task_id, task_names and layer_ids. The output keeps every token, layer and top-k entry
but stores the ids as uint8 and drops topk_weights (gate scores), which balancing never reads.
Only traces from the MIT-licensed ESFT repository are accepted, because the output ships inside the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "ultraep" / "traces" / "data" / "esft_dsv2lite_token_routing.npz"
MAX_BYTES = 5 * 1024 * 1024
ESFT_SOURCE_PREFIX = "github.com/deepseek-ai/ESFT"
LICENCE = (
    "MIT: code licence (LICENSE-CODE) of the deepseek-ai/ESFT repository, Copyright (c) 2023 DeepSeek. "
    "The recorded routing comes from that repository's results/expert_scores files, taken as part of "
    "the MIT-licensed repository; see NOTICE.md beside this file."
)
CONVERSION = (
    "topk_ids converted from int16 to uint8 (all 33,279 tokens, 26 MoE layers, top 6 of 64 experts kept); "
    "seq_id and pos_in_seq stored as int16; topk_weights dropped."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="path of esft_dsv2lite_token_routing.npz (the converted ESFT trace)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"output .npz (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)

    with np.load(args.source, allow_pickle=False) as archive:
        fields = {name: archive[name] for name in archive.files}

    # Step 1: accept only the ESFT token trace, whose licence allows shipping it.
    kind = str(fields["kind"].item()) if "kind" in fields else None
    source = str(fields["source"].item()) if "source" in fields else ""
    if kind != "token" or not source.startswith(ESFT_SOURCE_PREFIX):
        sys.exit(
            f"error: {args.source} has kind={kind!r} source={source!r}; only the ESFT token trace "
            f"(source {ESFT_SOURCE_PREFIX}..., MIT) may be bundled"
        )
    topk_ids = fields["topk_ids"]
    num_experts = int(fields["num_experts"].item())
    if num_experts > 255 or topk_ids.min() < 0 or topk_ids.max() >= num_experts:
        sys.exit(
            f"error: topk_ids range {topk_ids.min()}..{topk_ids.max()} with num_experts={num_experts} does not fit uint8 "
            "without -1 padding"
        )
    for name in ("seq_id", "pos_in_seq"):
        if fields[name].max() > np.iinfo(np.int16).max:
            sys.exit(f"error: {name} reaches {fields[name].max()}, which does not fit int16")

    # Step 2: write the compact copy.
    arrays = {
        "kind": np.array("token"),
        "model": fields["model"],
        "source": fields["source"],
        "licence": np.array(LICENCE),
        "conversion": np.array(CONVERSION),
        "num_experts": fields["num_experts"],
        "top_k": fields["top_k"],
        "layer_ids": fields["layer_ids"],
        "topk_ids": topk_ids.astype(np.uint8),
        "seq_id": fields["seq_id"].astype(np.int16),
        "pos_in_seq": fields["pos_in_seq"].astype(np.int16),
        "task_id": fields["task_id"].astype(np.int8),
        "task_names": fields["task_names"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **arrays)

    # Step 3: check the copy round-trips and fits the size limit.
    with np.load(args.output, allow_pickle=False) as written:
        if not np.array_equal(written["topk_ids"].astype(np.int64), topk_ids.astype(np.int64)):
            sys.exit("error: written topk_ids differ from the source")
    size = args.output.stat().st_size
    print(f"source      {args.source} ({args.source.stat().st_size} bytes)")
    print(f"output      {args.output} ({size} bytes)")
    print(f"topk_ids    {list(topk_ids.shape)} uint8")
    if size > MAX_BYTES:
        sys.exit(f"error: output is {size} bytes, above the {MAX_BYTES}-byte limit for package data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
