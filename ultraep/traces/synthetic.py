"""Seeded synthetic routing: load matrices and topk ids with controlled skew.

Every token picks ``topk`` distinct logical experts, as a real top-k router does. The picks are a
draw without replacement from the expert popularity, done with the Gumbel top-k trick: add
independent Gumbel noise to the log-popularity and keep the ``topk`` largest scores. That gives the
same distribution as drawing one expert at a time in proportion to popularity and removing it. An
expert therefore receives at most one assignment per token, which caps how hot it can get.

All generators run on the CPU from a ``torch.Generator`` seeded with ``seed``, so the same arguments
give the same tensors on every run and platform.
"""

from __future__ import annotations

import math

import torch

from ultraep.traces.slicing import check_seed, count_loads

__all__ = ["moving_hot_loads", "synthetic_topk_ids", "zipf_loads"]

# Tokens are sampled in chunks of at most this many (token, expert) scores, so memory stays near
# 64 MiB of float32 even for EP64 x 256 experts x 4096 tokens per rank.
_MAX_SCORES_PER_CHUNK = 2**24


def synthetic_topk_ids(num_tokens: int, num_experts: int, topk: int, skew: float, seed: int = 0) -> torch.Tensor:
    """Draw topk ids from a Zipf-like expert popularity.

    Expert popularity is proportional to ``1 / popularity_rank**skew`` (``popularity_rank = 1 ..
    num_experts``), assigned to the logical experts in a random order; ``skew=0`` is uniform.
    Returns [num_tokens, topk] int64 on the CPU: logical expert ids with no id twice in a token, no -1.
    """
    _check_sizes(num_experts=num_experts, topk=topk, num_tokens=num_tokens)
    _check_skew(skew)
    check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    log_popularity = _zipf_log_popularity(num_experts, skew, generator)
    return _sample_topk(log_popularity, num_tokens, topk, generator)


def zipf_loads(
    num_ranks: int,
    num_experts: int,
    tokens_per_rank: int,
    topk: int,
    skew: float,
    *,
    num_microbatches: int = 1,
    num_layers: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Generate load matrices from a static Zipf-like expert popularity.

    Each layer assigns popularity ``1 / popularity_rank**skew`` to its logical experts in its own random
    order. All microbatches and ranks of a layer share that popularity, and ``skew=0`` is uniform.
    Every token picks ``topk`` distinct experts.

    Returns [num_microbatches, num_layers, num_ranks, num_experts] int64 on the CPU: ``loads[b, layer,
    src_rank, expert]`` counts assignments; each ``[b, layer, src_rank]`` row sums to
    ``tokens_per_rank * topk``.
    """
    _check_sizes(
        num_ranks=num_ranks,
        num_experts=num_experts,
        tokens_per_rank=tokens_per_rank,
        topk=topk,
        num_microbatches=num_microbatches,
        num_layers=num_layers,
    )
    _check_skew(skew)
    check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    layer_log_popularity = [_zipf_log_popularity(num_experts, skew, generator) for _ in range(num_layers)]

    loads = torch.empty(num_microbatches, num_layers, num_ranks, num_experts, dtype=torch.int64)
    for microbatch_idx in range(num_microbatches):
        for layer_idx in range(num_layers):
            loads[microbatch_idx, layer_idx] = _sample_rank_loads(
                layer_log_popularity[layer_idx], num_ranks, tokens_per_rank, topk, generator
            )
    return loads


def moving_hot_loads(
    num_ranks: int,
    num_experts: int,
    tokens_per_rank: int,
    topk: int,
    *,
    num_hot_experts: int = 2,
    hot_weight: float = 8.0,
    num_microbatches: int = 4,
    num_layers: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Generate load matrices whose hot experts move to different logical experts every microbatch.

    num_hot_experts: experts per layer that are hot in a microbatch.
    hot_weight: popularity of a hot expert relative to a cold one (every cold expert has popularity
      1). Because an expert gets at most one assignment per token, a hot expert's share of the load is
      at most ``1 / topk`` of all assignments, whatever ``hot_weight`` is.

    For each layer and microbatch a new hot set is drawn at random from the experts that were cold in the
    previous microbatch of that layer, or from all experts when fewer than ``2 * num_hot_experts`` exist.
    A balancer that plans from the previous microbatch's load therefore replicates the wrong experts.

    Returns [num_microbatches, num_layers, num_ranks, num_experts] int64 on the CPU; each
    ``[b, layer, src_rank]`` row sums to ``tokens_per_rank * topk``.
    """
    _check_sizes(
        num_ranks=num_ranks,
        num_experts=num_experts,
        tokens_per_rank=tokens_per_rank,
        topk=topk,
        num_microbatches=num_microbatches,
        num_layers=num_layers,
    )
    valid_count = isinstance(num_hot_experts, int) and not isinstance(num_hot_experts, bool)
    if not valid_count or not 0 <= num_hot_experts <= num_experts:
        raise ValueError(f"num_hot_experts must be an int in 0..num_experts={num_experts}, got {num_hot_experts!r}")
    if isinstance(hot_weight, bool) or not (isinstance(hot_weight, (int, float)) and math.isfinite(hot_weight) and hot_weight > 0):
        raise ValueError(
            "hot_weight must be a finite number > 0 (popularity of a hot expert relative to a cold one), "
            f"got {hot_weight!r}"
        )
    check_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    loads = torch.empty(num_microbatches, num_layers, num_ranks, num_experts, dtype=torch.int64)
    for layer_idx in range(num_layers):
        previous_hot = torch.zeros(num_experts, dtype=torch.bool)
        for microbatch_idx in range(num_microbatches):
            # Draw the new hot set from the experts that were cold last time, when enough exist.
            candidates = torch.nonzero(~previous_hot).flatten()
            if candidates.numel() < num_hot_experts:
                candidates = torch.arange(num_experts)
            chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:num_hot_experts]]
            hot = torch.zeros(num_experts, dtype=torch.bool)
            hot[chosen] = True
            log_popularity = torch.where(hot, math.log(hot_weight), 0.0).to(torch.float32)
            loads[microbatch_idx, layer_idx] = _sample_rank_loads(
                log_popularity, num_ranks, tokens_per_rank, topk, generator
            )
            previous_hot = hot
    return loads


# Sampling helpers.


def _zipf_log_popularity(num_experts: int, skew: float, generator: torch.Generator) -> torch.Tensor:
    """Return [num_experts] float32: log popularity of each logical expert, Zipf ranks in random order."""
    popularity_rank = torch.randperm(num_experts, generator=generator).to(torch.float64) + 1.0
    return (-skew * torch.log(popularity_rank)).to(torch.float32)


def _sample_topk(log_popularity: torch.Tensor, num_tokens: int, topk: int, generator: torch.Generator) -> torch.Tensor:
    """Return [num_tokens, topk] int64: distinct experts per token, drawn without replacement (Gumbel top-k)."""
    num_experts = log_popularity.numel()
    tokens_per_chunk = max(1, _MAX_SCORES_PER_CHUNK // num_experts)
    chunks = []
    for start in range(0, num_tokens, tokens_per_chunk):
        rows = min(tokens_per_chunk, num_tokens - start)
        uniform = torch.rand(rows, num_experts, generator=generator)
        # clamp keeps log() finite when rand returns exactly 0.
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        chunks.append(torch.topk(log_popularity + gumbel, topk, dim=1).indices)  # [rows, topk]
    if not chunks:
        return torch.empty(0, topk, dtype=torch.int64)
    return torch.cat(chunks)


def _sample_rank_loads(
    log_popularity: torch.Tensor, num_ranks: int, tokens_per_rank: int, topk: int, generator: torch.Generator
) -> torch.Tensor:
    """Return [num_ranks, num_experts] int64: loads of ``tokens_per_rank`` sampled tokens on each rank."""
    topk_ids = _sample_topk(log_popularity, num_ranks * tokens_per_rank, topk, generator)
    return count_loads(topk_ids.view(num_ranks, tokens_per_rank, topk), log_popularity.numel(), check_values=False)


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        minimum = 0 if name == "num_tokens" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if "topk" in sizes and sizes["topk"] > sizes["num_experts"]:
        raise ValueError(
            f"topk={sizes['topk']} exceeds num_experts={sizes['num_experts']}; a token picks distinct experts, "
            "so use topk <= num_experts"
        )


def _check_skew(skew) -> None:
    if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not math.isfinite(skew) or skew < 0:
        raise ValueError(f"skew must be a finite number >= 0 (0 = uniform popularity), got {skew!r}")
