"""Communication for replicas: weight sync (direct and relay) and grad reduce over ``torch.distributed``."""

from ultraep.comm.grad_reduce import GradReducePlan, GradReduceTransfer, plan_grad_reduce, reduce_replica_grads
from ultraep.comm.relay import (
    RelayTree,
    choose_fan_out,
    copy_edges,
    plan_relay_tree,
    plan_relay_trees,
    relay_send_chunks,
    tree_depth,
)
from ultraep.comm.weight_sync import (
    SYNC_MODES,
    CommunicationError,
    SyncPlan,
    SyncTransfer,
    WeightSpec,
    check_replica_placement,
    chunk_bounds,
    communication_errors,
    exchange,
    execute_weight_sync,
    plan_weight_sync,
    wait_all,
)

__all__ = [
    "SYNC_MODES",
    "CommunicationError",
    "GradReducePlan",
    "GradReduceTransfer",
    "RelayTree",
    "SyncPlan",
    "SyncTransfer",
    "WeightSpec",
    "check_replica_placement",
    "choose_fan_out",
    "chunk_bounds",
    "communication_errors",
    "copy_edges",
    "exchange",
    "execute_weight_sync",
    "plan_grad_reduce",
    "plan_relay_tree",
    "plan_relay_trees",
    "plan_weight_sync",
    "reduce_replica_grads",
    "relay_send_chunks",
    "tree_depth",
    "wait_all",
]
