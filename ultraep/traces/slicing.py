"""Form load matrices from routing traces: group tokens into ranks and microbatches, then count.

Token traces record offline forward passes without step boundaries, so the grouping is a choice.
The default takes consecutive tokens in recording order: rank ``r`` of microbatch ``b`` gets tokens
``[(b * num_ranks + r) * tokens_per_rank, (b * num_ranks + r + 1) * tokens_per_rank)``. Consecutive
tokens mostly share a sequence, so each rank sees the routing of a few whole documents, as a rank
of a real EP group does. When the trace is too short, whole sequences can be drawn with replacement
(``resample=True``) to form a longer token stream that is cut the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from ultraep.traces.formats import LoadTrace, TokenTrace

__all__ = [
    "MicrobatchLoads",
    "count_loads",
    "max_ranks_without_reuse",
    "microbatch_loads",
    "microbatch_topk_ids",
    "step_loads_to_matrices",
]

logger = logging.getLogger(__name__)

# Sequences are drawn in chunks of this fixed size, so the resampled token stream for a seed does not
# depend on how many microbatches are requested: a longer request extends the same stream.
_SEQUENCE_DRAW_CHUNK = 256


@dataclasses.dataclass(frozen=True, eq=False)
class MicrobatchLoads:
    """Load matrices of every layer and microbatch formed from a token trace."""

    loads: torch.Tensor
    """[num_microbatches, num_layers, num_ranks, num_experts] int64, CPU. ``loads[b, layer, src_rank,
    expert]`` counts the assignments of the tokens on ``src_rank`` in microbatch ``b`` to a logical
    expert; -1 entries of ``topk_ids`` are not counted."""
    resampled: bool
    """True when the tokens come from sequences drawn with replacement, so some tokens repeat."""
    num_tokens_used: int
    """Tokens placed on ranks: ``num_microbatches * num_ranks * tokens_per_rank``."""
    description: str
    """Plain-language account of how the ranks and microbatches were formed, for reports."""

    @property
    def num_microbatches(self) -> int:
        return self.loads.shape[0]


def count_loads(topk_ids: torch.Tensor, num_experts: int, *, check_values: bool = True) -> torch.Tensor:
    """Count the assignments per logical expert.

    topk_ids: [..., num_tokens, topk] integer tensor, any device. Logical expert per assignment; -1 =
      unused (not counted). A token that lists an expert twice counts twice.
    num_experts: logical experts; ids must be ``-1 .. num_experts-1``.
    check_values: check the id range, which reads the tensor on the host. With ``False`` an id out of
      range makes the scatter fail (an index error on CPU, a device-side assert on CUDA).
    Returns [..., num_experts] int64 on ``topk_ids.device``: assignments per logical expert.
    """
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be an integer tensor of logical expert ids, got dtype {topk_ids.dtype}")
    if topk_ids.dim() < 2:
        raise ValueError(
            f"topk_ids must have shape [..., num_tokens, topk], got {list(topk_ids.shape)}; "
            "for a single token add an axis with topk_ids[None]"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if check_values and topk_ids.numel():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < -1 or high >= num_experts:
            value = low if low < -1 else high
            raise ValueError(
                f"topk_ids contains {value}, which is not a logical expert id: ids must be in 0..{num_experts - 1} "
                f"(num_experts={num_experts}) or -1 for an unused entry"
            )

    lead_shape = topk_ids.shape[:-2]
    # Shift by one so -1 lands in column 0, which is dropped: padding never wraps to the last expert.
    num_rows = math.prod(lead_shape)
    assignments_per_row = topk_ids.shape[-2] * topk_ids.shape[-1]
    shifted = topk_ids.reshape(num_rows, assignments_per_row).to(torch.int64) + 1  # [num_rows, num_tokens * topk]
    counts = torch.zeros(shifted.shape[0], num_experts + 1, dtype=torch.int64, device=topk_ids.device)
    counts.scatter_add_(1, shifted, torch.ones_like(shifted))
    return counts[:, 1:].reshape(*lead_shape, num_experts)


def max_ranks_without_reuse(trace: TokenTrace, tokens_per_rank: int) -> int:
    """Return the max number of ranks that one microbatch of ``tokens_per_rank`` tokens per rank fills from
    ``trace`` without reusing a token: ``num_tokens // tokens_per_rank``."""
    _check_token_trace(trace)
    _check_positive_int(tokens_per_rank, "tokens_per_rank")
    return trace.num_tokens // tokens_per_rank


def microbatch_loads(
    trace: TokenTrace,
    num_ranks: int,
    tokens_per_rank: int,
    *,
    resample: bool = False,
    seed: int = 0,
    num_microbatches: int | None = None,
) -> MicrobatchLoads:
    """Form load matrices for every layer and microbatch from a token trace.

    Without ``resample``, rank ``r`` of microbatch ``b`` gets trace tokens ``[(b * num_ranks + r) *
    tokens_per_rank, (b * num_ranks + r + 1) * tokens_per_rank)`` in recording order. ``num_microbatches``
    defaults to every whole microbatch the trace fills; leftover tokens are unused. A trace with fewer
    than ``num_ranks * tokens_per_rank`` tokens (or fewer than ``num_microbatches`` times that) raises
    ``ValueError``.

    With ``resample=True``, whole sequences (``trace.seq_ids``) are drawn with replacement from a
    generator seeded with ``seed`` and concatenated until enough tokens exist; the stream is then cut
    the same way, and the last sequence drawn is cut short. ``num_microbatches`` defaults to as many as the
    trace fills without reuse, at least one. The stream for a seed is the same whatever
    ``num_microbatches`` is, so microbatch ``b`` does not change when more are requested.

    Returns a :class:`MicrobatchLoads` whose ``loads`` is
    [num_microbatches, num_layers, num_ranks, num_experts] int64 on the CPU.
    """
    token_index, description = _form_token_index(trace, num_ranks, tokens_per_rank, num_microbatches, resample, seed)
    num_formed = token_index.shape[0]
    loads = torch.empty(num_formed, trace.num_layers, num_ranks, trace.num_experts, dtype=torch.int64)

    # One layer at a time keeps the gathered ids at [num_ranks, tokens_per_rank, topk] per microbatch.
    for layer_idx in range(trace.num_layers):
        layer_ids = trace.topk_ids[:, layer_idx, :].contiguous()  # [num_tokens, topk]
        for microbatch_idx in range(num_formed):
            rank_ids = layer_ids[token_index[microbatch_idx]]  # [num_ranks, tokens_per_rank, topk]
            loads[microbatch_idx, layer_idx] = count_loads(rank_ids, trace.num_experts, check_values=False)

    logger.debug("microbatch_loads: %s", description)
    return MicrobatchLoads(
        loads=loads,
        resampled=resample,
        num_tokens_used=token_index.numel(),
        description=description,
    )


def microbatch_topk_ids(
    trace: TokenTrace,
    num_ranks: int,
    tokens_per_rank: int,
    microbatch: int,
    layer: int,
    *,
    resample: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Return the topk ids each rank gets in one microbatch and layer, formed as in :func:`microbatch_loads`.

    microbatch: index of the microbatch, ``0 ..`` (the number the trace fills without reuse) ``- 1``;
      any index >= 0 with ``resample=True``.
    layer: position on the trace's layer axis, ``0 .. num_layers-1`` (not the model's layer id).
    Returns [num_ranks, tokens_per_rank, topk] int64 on the CPU: logical expert per assignment, -1 = unused.
    ``count_loads`` of the result equals ``microbatch_loads(...).loads[microbatch, layer]`` for the same
    arguments.
    """
    _check_token_trace(trace)
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 0:
        raise ValueError(f"microbatch must be an int >= 0, got {microbatch!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < trace.num_layers:
        raise ValueError(
            f"layer must be a position on the layer axis, 0..{trace.num_layers - 1}, got {layer!r} "
            f"(the trace's model layer ids are {trace.layer_ids})"
        )
    token_index, _ = _form_token_index(trace, num_ranks, tokens_per_rank, microbatch + 1, resample, seed)
    return trace.topk_ids[:, layer, :][token_index[microbatch]]  # [num_ranks, tokens_per_rank, topk]


def step_loads_to_matrices(trace: LoadTrace, num_ranks: int) -> torch.Tensor:
    """Split per-step expert loads into load matrices by an even split over source ranks.

    ``step_loads`` and ``aggregate`` traces carry only the global count of each expert, not which rank
    produced the assignments. This split is therefore an assumption, not data: each expert's count
    ``c`` gives every source rank ``c // num_ranks`` assignments, and the remainder ``c % num_ranks``
    goes one each to the lowest ranks, so the split is deterministic. Column sums equal the trace's
    counts exactly. Ranks 0, 1, ... get one extra assignment for many experts, so their rank loads are
    slightly above the others'.

    Returns [num_steps, num_layers, num_ranks, num_experts] int64 on the CPU.
    """
    if not isinstance(trace, LoadTrace):
        raise TypeError(
            f"trace must be a LoadTrace, got {type(trace).__name__}; use microbatch_loads for a TokenTrace"
        )
    _check_positive_int(num_ranks, "num_ranks")
    base = trace.loads // num_ranks  # [num_steps, num_layers, num_experts]
    remainder = trace.loads % num_ranks
    rank_ids = torch.arange(num_ranks).view(num_ranks, 1)  # [num_ranks, 1]
    extra = rank_ids < remainder.unsqueeze(-2)  # [num_steps, num_layers, num_ranks, num_experts]
    return base.unsqueeze(-2) + extra.to(torch.int64)


# Token grouping shared by microbatch_loads and microbatch_topk_ids.


def _form_token_index(
    trace: TokenTrace,
    num_ranks: int,
    tokens_per_rank: int,
    num_microbatches: int | None,
    resample: bool,
    seed: int,
) -> tuple[torch.Tensor, str]:
    """Return ([num_microbatches, num_ranks, tokens_per_rank] int64 trace token positions, description)."""
    _check_token_trace(trace)
    _check_positive_int(num_ranks, "num_ranks")
    _check_positive_int(tokens_per_rank, "tokens_per_rank")
    if num_microbatches is not None:
        _check_positive_int(num_microbatches, "num_microbatches")
    if not isinstance(resample, bool):
        raise TypeError(f"resample must be True or False, got {type(resample).__name__} {resample!r}")
    check_seed(seed)
    if trace.num_tokens == 0:
        raise ValueError("the trace contains no tokens; load a trace with at least one token per rank")
    tokens_per_microbatch = num_ranks * tokens_per_rank
    microbatches_without_reuse = trace.num_tokens // tokens_per_microbatch

    if not resample:
        wanted = microbatches_without_reuse if num_microbatches is None else num_microbatches
        if wanted == 0 or wanted > microbatches_without_reuse:
            raise ValueError(_too_short_message(trace, num_ranks, tokens_per_rank, max(wanted, 1)))
        token_index = torch.arange(wanted * tokens_per_microbatch).view(wanted, num_ranks, tokens_per_rank)
        description = (
            f"Rank r of microbatch b gets trace tokens [(b*{num_ranks} + r)*{tokens_per_rank}, "
            f"(b*{num_ranks} + r + 1)*{tokens_per_rank}) in recording order: {wanted} microbatch(es) x "
            f"{num_ranks} ranks x {tokens_per_rank} tokens per rank use {token_index.numel()} of the trace's "
            f"{trace.num_tokens} tokens without reuse."
        )
        return token_index, description

    wanted = max(1, microbatches_without_reuse) if num_microbatches is None else num_microbatches
    stream, num_drawn, num_sequences = _resampled_stream(trace, wanted * tokens_per_microbatch, seed)
    token_index = stream.view(wanted, num_ranks, tokens_per_rank)
    description = (
        f"Tokens come from {num_drawn} whole sequences drawn with replacement (seed={seed}) from the trace's "
        f"{num_sequences} sequences and concatenated in draw order; rank r of microbatch b gets stream tokens "
        f"[(b*{num_ranks} + r)*{tokens_per_rank}, (b*{num_ranks} + r + 1)*{tokens_per_rank}) for {wanted} "
        f"microbatch(es) x {num_ranks} ranks x {tokens_per_rank} tokens per rank."
    )
    return token_index, description


def _resampled_stream(trace: TokenTrace, num_needed: int, seed: int) -> tuple[torch.Tensor, int, int]:
    """Return ([num_needed] int64 trace token positions, sequences drawn, sequences in the trace)."""
    if trace.seq_ids is None:
        raise ValueError(
            "resample=True draws whole sequences, but this trace has no seq_ids; load a trace that stores "
            "seq_id, or use fewer ranks or tokens_per_rank so the trace fills a microbatch without reuse"
        )
    if trace.num_tokens == 0:
        raise ValueError("resample=True needs a trace with at least one token, got an empty trace")

    # Step 1: tokens of each sequence, in recording order.
    order = torch.argsort(trace.seq_ids, stable=True)  # [num_tokens] positions grouped by sequence
    _, lengths = torch.unique_consecutive(trace.seq_ids[order], return_counts=True)  # [num_sequences]
    starts = torch.cumsum(lengths, 0) - lengths

    # Step 2: draw sequences in fixed-size chunks until their tokens cover the request.
    generator = torch.Generator().manual_seed(seed)
    drawn_chunks = []
    total = 0
    while total < num_needed:
        chunk = torch.randint(lengths.numel(), (_SEQUENCE_DRAW_CHUNK,), generator=generator)
        drawn_chunks.append(chunk)
        total += int(lengths[chunk].sum())
    drawn = torch.cat(drawn_chunks)
    ends = torch.cumsum(lengths[drawn], 0)
    num_drawn = int(torch.searchsorted(ends, num_needed)) + 1  # first prefix that covers the request
    drawn = drawn[:num_drawn]

    # Step 3: concatenate the drawn sequences' token positions and cut to the request.
    drawn_lengths = lengths[drawn]
    owner = torch.repeat_interleave(torch.arange(num_drawn), drawn_lengths)  # [sum of drawn lengths]
    offset = torch.arange(owner.numel()) - (torch.cumsum(drawn_lengths, 0) - drawn_lengths)[owner]
    stream = order[starts[drawn][owner] + offset]
    return stream[:num_needed], num_drawn, lengths.numel()


def _too_short_message(trace: TokenTrace, num_ranks: int, tokens_per_rank: int, num_microbatches: int) -> str:
    needed = num_microbatches * num_ranks * tokens_per_rank
    max_ranks = trace.num_tokens // tokens_per_rank
    if max_ranks == 0:
        max_tokens = trace.num_tokens // (num_ranks * num_microbatches)
        fix = (
            f"use tokens_per_rank <= {max_tokens}, or resample=True"
            if max_tokens >= 1
            else f"use num_ranks <= {trace.num_tokens // num_microbatches or 1} and fewer tokens_per_rank, or resample=True"
        )
    else:
        fix = f"use num_ranks <= {max_ranks}, fewer tokens_per_rank or microbatches, or resample=True"
    return (
        f"the trace holds {trace.num_tokens} tokens, fewer than the {needed} needed for {num_microbatches} "
        f"microbatch(es) x num_ranks={num_ranks} x tokens_per_rank={tokens_per_rank}; at this tokens_per_rank "
        f"it fills at most {max_ranks} ranks without reuse; {fix}"
    )


def _check_token_trace(trace) -> None:
    if not isinstance(trace, TokenTrace):
        hint = "; use step_loads_to_matrices for a LoadTrace" if isinstance(trace, LoadTrace) else ""
        raise TypeError(f"trace must be a TokenTrace, got {type(trace).__name__}{hint}")


def check_seed(seed) -> None:
    """Raise ``TypeError`` unless ``seed`` is an int in [0, 2**63 - 1], the range ``torch.Generator.manual_seed`` takes here."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise TypeError(f"seed must be an int in [0, 2**63 - 1], got {type(seed).__name__} {seed!r}")


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
