"""Triton kernel that counts this rank's assignments per logical expert.

Reference: :func:`ultraep.reroute.count_local_load`. Each program histograms one block of assignments
and adds its counts into the output with integer atomics. Integer addition is associative, so the
result does not depend on the order in which programs finish, and it equals the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["count_load_triton"]

# Assignments per program: 8192 tokens x top-8 run as 32 programs.
_BLOCK = 2048


@triton.jit
def _count_kernel(
    topk_ids_ptr,  # [num_assignments] flat topk_ids, any integer dtype; -1 = unused
    counts_ptr,  # [NUM_EXPERTS] int64 out, zero on entry; each program adds its block's counts
    num_assignments,  # num_tokens * topk
    NUM_EXPERTS: tl.constexpr,
    NUM_BINS: tl.constexpr,  # histogram bins: NUM_EXPERTS + 1 rounded up to a power of two
    BLOCK: tl.constexpr,  # assignments per program
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    in_range = offsets < num_assignments
    ids = tl.load(topk_ids_ptr + offsets, mask=in_range, other=-1)
    # Range check in the stored dtype, before narrowing, so no id wraps into [0, NUM_EXPERTS).
    valid = in_range & (ids >= 0) & (ids < NUM_EXPERTS)
    expert = tl.where(valid, ids, NUM_EXPERTS).to(tl.int32)  # bin NUM_EXPERTS collects the rest, never stored
    block_counts = tl.histogram(expert, NUM_BINS)  # [NUM_BINS] int32
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(counts_ptr + bins, block_counts.to(tl.int64), mask=(bins < NUM_EXPERTS) & (block_counts > 0))


def count_load_triton(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count this rank's assignments per logical expert with one kernel launch.

    topk_ids: [num_tokens, topk] integer tensor on a CUDA device (or on the CPU under
      ``TRITON_INTERPRET=1``). Logical expert per assignment; -1 = unused, never counted. A token that
      names one expert twice counts twice. Ids outside [-1, num_experts) are not counted (the
      reference rejects them when it checks values).
    num_experts: logical experts (>= 1).
    Returns [num_experts] int64 on ``topk_ids.device``, equal to ``count_local_load(topk_ids, num_experts)``.
    Reads nothing back to the host, so the call can be captured in a CUDA graph.
    """
    flat = topk_ids.reshape(-1)  # [num_tokens * topk]; a view unless topk_ids is strided
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_ids.device)
    # At least one program, so an empty batch launches the same way as any other.
    grid = (max(1, triton.cdiv(flat.numel(), _BLOCK)),)
    _count_kernel[grid](
        flat,
        counts,
        flat.numel(),
        NUM_EXPERTS=num_experts,
        NUM_BINS=triton.next_power_of_2(num_experts + 1),
        BLOCK=_BLOCK,
        num_warps=4,
    )
    return counts


RUNS_IN_INTERPRETER = isinstance(_count_kernel, InterpretedFunction)
"""True when ``TRITON_INTERPRET=1`` was set before Triton was imported: kernels then run on CPU tensors."""
