"""Shared builders for the multi-process tests: managers, skewed MoE layers, inputs."""

from __future__ import annotations

import torch

from ultraep.layout import ExpertLayout
from ultraep.runtime import ManagerConfig, MoELayer, ReplicaManager, swiglu_weight_shapes

HIDDEN_SIZE = 16
FFN_HIDDEN_SIZE = 24
TOPK = 2
# Router bias toward experts 0 and 1 (added to their logits through the shifted inputs): expert 0 is
# the first choice of almost every token, so its master rank is overloaded and the planner replicates it.
HOT_EXPERT_SKEW = (3.0, 1.5)


def make_manager(
    world_size: int, experts_per_rank: int = 2, redundant_slots_per_rank: int = 1, planner=None, **config
) -> ReplicaManager:
    layout = ExpertLayout(world_size, experts_per_rank, redundant_slots_per_rank)
    shapes = swiglu_weight_shapes(HIDDEN_SIZE, FFN_HIDDEN_SIZE)
    return ReplicaManager(layout, shapes, planner=planner, config=ManagerConfig(**config))


def make_layers(manager: ReplicaManager, balance: bool, num_layers: int = 2, seed: int = 1) -> list[MoELayer]:
    """Layers with identical parameters for any ``balance``; inputs from :func:`make_inputs` route skewed."""
    layers = []
    for layer_id in range(num_layers):
        layer = MoELayer(manager, layer_id, HIDDEN_SIZE, FFN_HIDDEN_SIZE, topk=TOPK, balance=balance, seed=seed)
        with torch.no_grad():
            for expert_id, skew in enumerate(HOT_EXPERT_SKEW):
                layer.router_weight[expert_id] += skew / HIDDEN_SIZE
        layers.append(layer)
    return layers


def make_inputs(rank: int, num_tokens: int, seed: int = 7) -> torch.Tensor:
    """[num_tokens, HIDDEN_SIZE] float32, different per rank; shifted by +1 so the router skew applies."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(num_tokens, HIDDEN_SIZE, generator=generator) + 1.0


def expert_parameters(layers: list[MoELayer]) -> list[torch.Tensor]:
    return [w for layer in layers for w in layer.master_weights()]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """Assert fp32 agreement within ``rtol`` relative to the tensor's scale (elementwise and in norm)."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert diff <= rtol * max(scale, 1e-12), f"{what}: max abs diff {diff:.3e} > {rtol} * max abs {scale:.3e}"


def run_layers(layers: list[MoELayer], x: torch.Tensor, microbatch_id: int = 0) -> torch.Tensor:
    """Apply the layers with residual connections, as in a transformer; the residual keeps the +1
    shift of :func:`make_inputs`, so every layer routes skewed."""
    for layer in layers:
        x = x + layer(x, microbatch_id)
    return x
