"""MoE model configurations for the throughput simulator: routed-expert sizes and counts.

Only the routed experts enter the simulator. Shared experts, attention and dense layers take the same
time on every rank whatever the routing, so they are left out (see :mod:`ultraep.sim.cost`).

Sources (Hugging Face ``config.json`` field names in brackets). Each value was checked against a public
copy found with a code search; the copy is named beside each model:

- GLM-4.5-Air (``zai-org/GLM-4.5-Air``): ``n_routed_experts`` 128, ``num_experts_per_tok`` 8,
  ``hidden_size`` 4096, ``moe_intermediate_size`` 1408, ``num_hidden_layers`` 46 of which the first
  (``first_k_dense_replace`` 1) is dense, so 45 MoE layers. Checked against the Megatron arguments in
  github.com/zianglih/miles ``scripts/models/glm4.5-106B-A12B.sh`` (1 dense + 45 MoE layers, hidden
  4096, ``--moe-ffn-hidden-size 1408``, ``--num-experts 128``, ``--moe-router-topk 8``) and a test
  fixture of the HF config (``"mlp_layer_types": ["dense"] + ["sparse"] * 45``).
- Qwen3-235B-A22B (``Qwen/Qwen3-235B-A22B``): ``num_experts`` 128, ``num_experts_per_tok`` 8,
  ``hidden_size`` 4096, ``moe_intermediate_size`` 1536, ``num_hidden_layers`` 94, every layer MoE.
  Checked against github.com/zyzshishui/slime ``scripts/models/qwen3-235B-A22B.sh`` (94 layers,
  ``FIRST_K_DENSE_REPLACE=0``, hidden 4096, ``--moe-ffn-hidden-size 1536``, 128 experts, top 8).
- DeepSeek-V3 (``deepseek-ai/DeepSeek-V3``): ``n_routed_experts`` 256, ``num_experts_per_tok`` 8,
  ``hidden_size`` 7168, ``moe_intermediate_size`` 2048, ``num_hidden_layers`` 61 with
  ``first_k_dense_replace`` 3, so 58 MoE layers (the MTP module is not counted). Checked against a
  Megatron config (``moe_layer_freq: "([0]*3+[1]*58)"``, ``num_experts: 256``, ``moe_router_topk: 8``,
  ``moe_ffn_hidden_size: 2048``, ``hidden_size: 7168``) and a copy of the config.json values.
- Mixtral-8x7B (``mistralai/Mixtral-8x7B-v0.1``): ``num_local_experts`` 8, ``num_experts_per_tok`` 2,
  ``hidden_size`` 4096, ``intermediate_size`` 14336 (the expert size), ``num_hidden_layers`` 32,
  every layer MoE. Checked against copies of the config.json printed by ``transformers``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["MODELS", "ModelConfig", "get_model"]

# Matrices per expert in a SwiGLU feed-forward block: gate and up projections (hidden -> intermediate)
# and the down projection (intermediate -> hidden).
SWIGLU_MATRICES = 3

# Bytes per bf16 parameter.
BF16_BYTES = 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Routed-expert shape and count of one MoE model."""

    name: str
    """Short name used on the command line, e.g. ``"qwen3-235b"``."""
    display_name: str
    """Name for tables, e.g. ``"Qwen3-235B-A22B"``."""
    num_experts: int
    """Routed experts per MoE layer."""
    top_k: int
    """Routed experts each token picks."""
    hidden_size: int
    """Model hidden size: the width of a dispatched token and of the expert input and output."""
    expert_intermediate_size: int
    """Intermediate size of one routed expert."""
    num_moe_layers: int
    """Decoder layers with a routed MoE block."""
    source: str
    """Origin of the numbers: model card or config.json and the copy they were checked against."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "expert_intermediate_size", "num_moe_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"ModelConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; a token picks distinct experts"
            )

    @property
    def params_per_expert(self) -> int:
        """Parameters of one routed expert: three SwiGLU matrices of ``hidden_size x expert_intermediate_size``."""
        return SWIGLU_MATRICES * self.hidden_size * self.expert_intermediate_size

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one routed expert's weights in bf16; one weight copy moves this much."""
        return BF16_BYTES * self.params_per_expert

    @property
    def flops_per_assignment(self) -> int:
        """Forward FLOPs of one token in one expert: 2 FLOPs per multiply-add over the three matrices."""
        return 2 * self.params_per_expert


MODELS: dict[str, ModelConfig] = {
    model.name: model
    for model in (
        ModelConfig(
            name="glm-4.5-air",
            display_name="GLM-4.5-Air (106B)",
            num_experts=128,
            top_k=8,
            hidden_size=4096,
            expert_intermediate_size=1408,
            num_moe_layers=45,
            source="zai-org/GLM-4.5-Air config.json (checked against zianglih/miles scripts/models/glm4.5-106B-A12B.sh)",
        ),
        ModelConfig(
            name="qwen3-235b",
            display_name="Qwen3-235B-A22B",
            num_experts=128,
            top_k=8,
            hidden_size=4096,
            expert_intermediate_size=1536,
            num_moe_layers=94,
            source="Qwen/Qwen3-235B-A22B config.json (checked against zyzshishui/slime scripts/models/qwen3-235B-A22B.sh)",
        ),
        ModelConfig(
            name="deepseek-v3",
            display_name="DeepSeek-V3 (671B)",
            num_experts=256,
            top_k=8,
            hidden_size=7168,
            expert_intermediate_size=2048,
            num_moe_layers=58,
            source="deepseek-ai/DeepSeek-V3 config.json (61 layers, first_k_dense_replace=3)",
        ),
        ModelConfig(
            name="mixtral-8x7b",
            display_name="Mixtral-8x7B",
            num_experts=8,
            top_k=2,
            hidden_size=4096,
            expert_intermediate_size=14336,
            num_moe_layers=32,
            source="mistralai/Mixtral-8x7B-v0.1 config.json",
        ),
    )
}
"""The simulator's model configurations by :attr:`ModelConfig.name`."""


def get_model(name: str) -> ModelConfig:
    """Return the model configuration called ``name``; raise ``ValueError`` naming the valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {sorted(MODELS)}")
    return MODELS[name]
