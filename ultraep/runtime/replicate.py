"""Autograd functions that make replication part of the model's math.

Replication is the linear map from a rank's master weights to the redundant slots of all ranks; its
adjoint is grad reduce. Two functions carry it through autograd:

- :class:`Replicate`: forward runs the weight sync and returns the redundant slots' weights as views
  of the manager's shared buffer. Backward runs grad reduce and returns the master gradients.
- :class:`ResyncOnBackward`: identity on the expert output. Its backward runs before the expert
  backward (it produces that backward's incoming gradient) and re-syncs the layer's redundant slots,
  because other layers and microbatches have reused the shared buffer since the forward.

Timeline of one layer ``L`` and microbatch ``mb``, with buffer reuse::

    forward  L:  route -> Replicate.forward (sync L) -> experts -> ResyncOnBackward -> combine
    forward  L+1 ... (overwrites the shared buffer)
    backward L+1 ...
    backward L:  ResyncOnBackward.backward (re-sync L) -> expert backward (data and weight grads)
                 -> Replicate.backward (grad reduce L, release L/mb)

Autograd saves the replica weight views for the expert backward. The manager writes the buffer
through aliases made with ``.data``, which do not bump the saved views' version counters, so autograd
does not reject the re-synced views; the re-sync before the expert backward is what makes them valid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ultraep.runtime.manager import ReplicaManager

__all__ = ["Replicate", "ResyncOnBackward"]


class Replicate(torch.autograd.Function):
    """Weight sync forward, grad reduce backward, for one layer and microbatch.

    Inputs: the manager, the ``(layer_id, microbatch_id)`` key of a routed layer, then the master
    weights (per weight tensor ``[experts_per_rank, *shape]``). Outputs: per weight tensor
    ``[redundant_slots_per_rank, *shape]`` views of the shared redundant-slot buffer.
    """

    @staticmethod
    def forward(ctx, manager: ReplicaManager, key: tuple[int, int], *master_weights: torch.Tensor):
        ctx.manager = manager
        ctx.key = key
        manager._sync(key, phase="forward", background=manager.config.overlap_sync)
        # NOTE: fresh alias, so later writes by other layers do not bump these views' version counter.
        return manager.spec.row_views(manager.slot_weights(key[0]))

    @staticmethod
    def backward(ctx, *replica_grads: torch.Tensor):
        manager = ctx.manager
        if manager._reduces_in_background(ctx.key):
            # The reduced gradients reach the masters' .grad when the backward pass ends.
            manager._start_reduce(ctx.key, replica_grads)
            return (None, None, *([None] * len(replica_grads)))
        master_grads = manager._reduce(ctx.key, replica_grads)
        return (None, None, *master_grads)


class ResyncOnBackward(torch.autograd.Function):
    """Identity whose backward re-syncs one layer and microbatch's redundant slots from the saved plan."""

    @staticmethod
    def forward(ctx, manager: ReplicaManager, key: tuple[int, int], expert_output: torch.Tensor):
        ctx.manager = manager
        ctx.key = key
        return expert_output.view_as(expert_output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ctx.manager._resync_for_backward(ctx.key)
        return None, None, grad_output
