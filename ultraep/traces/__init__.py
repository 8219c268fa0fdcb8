"""Routing traces: formats and loaders, grouping into ranks and microbatches, synthetic loads, a bundled demo trace."""

from ultraep.traces.formats import (
    LOAD_KINDS,
    TRACE_KINDS,
    LoadTrace,
    TokenTrace,
    bundled_trace_path,
    load_bundled_trace,
    load_trace,
)
from ultraep.traces.slicing import (
    MicrobatchLoads,
    count_loads,
    max_ranks_without_reuse,
    microbatch_loads,
    microbatch_topk_ids,
    step_loads_to_matrices,
)
from ultraep.traces.synthetic import moving_hot_loads, synthetic_topk_ids, zipf_loads

__all__ = [
    "LOAD_KINDS",
    "TRACE_KINDS",
    "LoadTrace",
    "MicrobatchLoads",
    "TokenTrace",
    "bundled_trace_path",
    "count_loads",
    "load_bundled_trace",
    "load_trace",
    "max_ranks_without_reuse",
    "microbatch_loads",
    "microbatch_topk_ids",
    "moving_hot_loads",
    "step_loads_to_matrices",
    "synthetic_topk_ids",
    "zipf_loads",
]
