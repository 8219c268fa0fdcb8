"""Runtime: the replica manager that ties count, plan, weight sync, reroute and grad reduce together, and a reference EP MoE layer."""

from ultraep.runtime.manager import LayerStats, ManagerConfig, RankAgreementError, ReplicaManager, Routing
from ultraep.runtime.moe_layer import MoELayer, all_to_all, expert_init_generator, swiglu_weight_shapes
from ultraep.runtime.replicate import Replicate, ResyncOnBackward

__all__ = [
    "LayerStats",
    "ManagerConfig",
    "MoELayer",
    "RankAgreementError",
    "ReplicaManager",
    "Replicate",
    "ResyncOnBackward",
    "Routing",
    "all_to_all",
    "expert_init_generator",
    "swiglu_weight_shapes",
]
