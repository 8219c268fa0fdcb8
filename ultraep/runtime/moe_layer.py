"""A reference expert-parallel MoE layer balanced by a :class:`~ultraep.runtime.ReplicaManager`.

Mixtral-style: a top-k router with a softmax over the k selected logits, SwiGLU experts, and
all-to-all dispatch and combine. Each rank has ``experts_per_rank`` master slots, and the manager's
redundant slots contain replicas for one layer and microbatch at a time. Tokens are dispatched by
physical slot id, so a balanced layer and an unbalanced one (``balance=False``, the masters-only plan
through the same path) compute the same function with the same parameters.

Phases of :meth:`MoELayer.forward`, in order:

1. router: logits, top-k logical experts, softmax over the k logits;
2. route (manager): count, gather, plan, reroute;
3. dispatch: sort assignments by physical slot id, ``all_to_all_single`` with the plan's split sizes;
4. experts: SwiGLU per local slot, master slots from the layer's parameters, redundant slots from the
   manager's replicated weights;
5. combine: ``all_to_all_single`` back, restore assignment order, weight by the router probabilities
   and sum the k outputs of each token.

This is a readable reference (a Python loop over local slots, one matmul each), not a fast kernel.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ultraep.comm import chunk_bounds, communication_errors, wait_all
from ultraep.runtime.manager import ReplicaManager

__all__ = ["MoELayer", "all_to_all", "expert_init_generator", "swiglu_weight_shapes"]


def swiglu_weight_shapes(hidden_size: int, ffn_hidden_size: int) -> tuple[tuple[int, int], ...]:
    """Return the per-expert weight shapes of a SwiGLU expert: gate, up and down, each ``(ffn, hidden)``.

    The intermediate dimension comes first in all three, so a block of first-dimension rows (one
    weight sync chunk) is a slice of the intermediate dimension, which a replica can compute alone.
    """
    return ((ffn_hidden_size, hidden_size),) * 3


def expert_init_generator(seed: int, layer_id: int, expert_id: int) -> torch.Generator:
    """Return a CPU generator seeded from (seed, layer, logical expert).

    Initializing each expert from its own generator gives the same weights for logical expert ``e``
    whatever the number of ranks, so runs with different EP sizes or balance settings start equal.
    """
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + layer_id) * 1_000_003 + expert_id)
    return generator


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over dim 0 whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, tensor, output_splits, input_splits, group, timeout, description, rank):
        ctx.splits = (output_splits, input_splits)
        ctx.comm = (group, timeout, description, rank)
        return _all_to_all(tensor, output_splits, input_splits, group, timeout, description, rank)

    @staticmethod
    def backward(ctx, grad_output):
        output_splits, input_splits = ctx.splits
        group, timeout, description, rank = ctx.comm
        grad = _all_to_all(grad_output, input_splits, output_splits, group, timeout, f"{description} (backward)", rank)
        return grad, None, None, None, None, None, None


def _all_to_all(tensor, output_splits, input_splits, group, timeout, description, rank):
    out = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
    peers = [r for r, (a, b) in enumerate(zip(output_splits, input_splits, strict=True)) if (a or b) and r != rank]
    with communication_errors(description, rank=rank, peer_ranks=peers):
        work = dist.all_to_all_single(
            out, tensor.contiguous(), list(output_splits), list(input_splits), group=group, async_op=True
        )
        wait_all([work], timeout)
    return out


def all_to_all(
    tensor: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    *,
    group: dist.ProcessGroup | None = None,
    timeout: datetime.timedelta | None = None,
    description: str = "all-to-all",
) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0.

    tensor: [sum(input_splits), ...] on this rank; rows ``input_splits[:d]`` .. go to rank ``d``.
    output_splits: rows received from each rank. Returns [sum(output_splits), ...], rows grouped by
    source rank. With 2 ranks, rank 0 passing rows ``[a0, a1 | a2]`` with ``input_splits=(2, 1)`` and
    rank 1 passing ``[b0 | b1]`` with ``(1, 1)``: rank 0 gets ``[a0, a1, b0]``, rank 1 gets ``[a2, b1]``.
    """
    rank = dist.get_rank(group)
    return _AllToAll.apply(tensor, tuple(output_splits), tuple(input_splits), group, timeout, description, rank)


def _swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Apply one SwiGLU expert. x: [rows, hidden]; w_gate, w_up, w_down: [ffn, hidden] or a block of
    ffn rows. Returns [rows, hidden]."""
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down


class MoELayer(nn.Module):
    """Expert-parallel Mixtral-style MoE layer (top-k softmax router, SwiGLU experts), balanced per microbatch.

    Parameters on each rank:

    - ``router_weight`` [num_experts, hidden_size]: the same on every rank (replicated, like any
      data-parallel parameter; all-reduce its gradient over the EP group);
    - ``w_gate``, ``w_up`` and ``w_down``, each [experts_per_rank, ffn_hidden_size, hidden_size]:
      this rank's master experts, logical experts ``rank * experts_per_rank ..``. The output of an
      expert is ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down``. Their gradients are complete after
      backward, because replica gradients are already reduced into them.
    """

    def __init__(
        self,
        manager: ReplicaManager,
        layer_id: int,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        topk: int = 2,
        balance: bool = True,
        seed: int = 0,
    ) -> None:
        """Build the layer and initialize it from ``seed`` (the same on every rank).

        manager: shared by all MoE layers of the model; its weight shapes must be
          ``swiglu_weight_shapes(hidden_size, ffn_hidden_size)``.
        layer_id: this layer's id (>= 0), unique among the layers sharing the manager.
        balance: ``False`` routes with the masters-only plan (no replicas), the unbalanced baseline.
        """
        super().__init__()
        layout = manager.layout
        shapes = swiglu_weight_shapes(hidden_size, ffn_hidden_size)
        if manager.spec.shapes != shapes:
            raise ValueError(
                f"the manager's weight shapes {list(manager.spec.shapes)} do not match a SwiGLU expert with "
                f"hidden_size={hidden_size}, ffn_hidden_size={ffn_hidden_size} ({list(shapes)}); build the manager "
                "with swiglu_weight_shapes(hidden_size, ffn_hidden_size)"
            )
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= layout.num_experts:
            raise ValueError(f"topk must be an int in [1, num_experts={layout.num_experts}], got {topk!r}")
        self.manager = manager
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.topk = topk
        self.balance = balance
        kwargs = {"dtype": manager.dtype, "device": manager.device}
        self.router_weight = nn.Parameter(torch.empty(layout.num_experts, hidden_size, **kwargs))
        self.w_gate = nn.Parameter(torch.empty(layout.experts_per_rank, ffn_hidden_size, hidden_size, **kwargs))
        self.w_up = nn.Parameter(torch.empty(layout.experts_per_rank, ffn_hidden_size, hidden_size, **kwargs))
        self.w_down = nn.Parameter(torch.empty(layout.experts_per_rank, ffn_hidden_size, hidden_size, **kwargs))
        self.reset_parameters(seed)

    def master_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return this rank's master expert weights in the manager's weight order (gate, up, down)."""
        return (self.w_gate, self.w_up, self.w_down)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialize from ``seed``: logical expert ``e`` gets the same weights on any number of ranks."""
        layout = self.manager.layout
        router_gen = expert_init_generator(seed, self.layer_id, layout.num_experts)
        bound = 1.0 / math.sqrt(self.hidden_size)
        self.router_weight.copy_(torch.empty(self.router_weight.shape).uniform_(-bound, bound, generator=router_gen))
        ffn_bound = 1.0 / math.sqrt(self.ffn_hidden_size)
        first = self.manager.rank * layout.experts_per_rank
        for local_idx in range(layout.experts_per_rank):
            gen = expert_init_generator(seed, self.layer_id, first + local_idx)
            for weight, limit in ((self.w_gate, bound), (self.w_up, bound), (self.w_down, ffn_bound)):
                weight[local_idx].copy_(torch.empty(weight.shape[1:]).uniform_(-limit, limit, generator=gen))

    def forward(self, hidden_states: torch.Tensor, microbatch_id: int = 0) -> torch.Tensor:
        """Apply the MoE layer.

        hidden_states: [..., hidden_size] on the manager's device and dtype; any number of tokens
          (including 0) per rank.
        microbatch_id: distinguishes microbatches whose backward is still pending (pipeline parallelism).
        Returns [..., hidden_size]. Collective over the EP group: every rank calls it in the same order.
        """
        manager, layout = self.manager, self.manager.layout
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must end in hidden_size={self.hidden_size}, got shape {list(hidden_states.shape)}"
            )
        x = hidden_states.reshape(-1, self.hidden_size)  # [num_tokens, hidden_size]
        num_tokens, topk = x.shape[0], self.topk
        where = f"layer {self.layer_id} microbatch {microbatch_id}"

        # Step 1: router (softmax over the top-k logits).
        logits = F.linear(x, self.router_weight)  # [num_tokens, num_experts]
        topk_logits, topk_ids = torch.topk(logits, topk, dim=-1)
        probs = torch.softmax(topk_logits, dim=-1)  # [num_tokens, topk]

        # Step 2: count, gather, plan, reroute.
        routing = manager.route(self.layer_id, microbatch_id, topk_ids, self.master_weights(), balance=self.balance)

        # Step 3: start the weight sync (in the background with overlap_sync), then dispatch, grouped by
        # destination rank then slot (physical slot ids sort that way).
        replica_weights = manager.replicate(routing)
        order = torch.argsort(routing.slot_ids.reshape(-1), stable=True)  # [num_tokens * topk]
        send_x = x[order // topk]  # [num_tokens * topk, hidden_size]
        recv_x = all_to_all(
            send_x, routing.recv_counts, routing.send_counts,
            group=manager.group, timeout=manager.timeout, description=f"dispatch all-to-all of {where}",
        )  # [num_received, hidden_size], grouped by source rank, then slot

        # Step 4: experts, one local slot at a time: masters first, then the redundant slots once their
        # weights have arrived (chunk by chunk with ManagerConfig.pipeline_replicas).
        spr = layout.slots_per_rank
        local_slot = torch.repeat_interleave(
            torch.arange(spr).repeat(layout.num_ranks), routing.recv_slot_counts.reshape(-1)
        ).to(x.device)  # [num_received]
        by_slot = torch.argsort(local_slot, stable=True)
        slot_counts = routing.recv_slot_counts.sum(dim=0).tolist()  # [slots_per_rank]
        slot_rows = torch.split(recv_x[by_slot], slot_counts)
        outputs = [
            _swiglu(slot_rows[idx], self.w_gate[idx], self.w_up[idx], self.w_down[idx]) for idx in range(layout.experts_per_rank)
        ]
        outputs.extend(self._replica_outputs(routing, replica_weights, slot_rows[layout.experts_per_rank :]))
        expert_out = torch.cat(outputs)[torch.argsort(by_slot)]  # [num_received, hidden_size], arrival order
        expert_out = manager.resync_on_backward(routing, expert_out)

        # Step 5: combine in token order, weighted by the router probabilities.
        back = all_to_all(
            expert_out, routing.send_counts, routing.recv_counts,
            group=manager.group, timeout=manager.timeout, description=f"combine all-to-all of {where}",
        )  # [num_tokens * topk, hidden_size], in dispatch order
        per_assignment = back[torch.argsort(order)].view(num_tokens, topk, self.hidden_size)
        out = (probs.unsqueeze(-1) * per_assignment).sum(dim=1)  # [num_tokens, hidden_size]
        return out.view(hidden_states.shape)

    def _replica_outputs(
        self, routing, replica_weights: tuple[torch.Tensor, ...], slot_rows: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Run every redundant slot on its rows and return one [rows, hidden_size] output per slot.

        Empty slots run too (0 rows): every replica weight view must reach the output so grad reduce
        runs, and every rank builds the same autograd graph, so collectives stay in order. With
        ``replica_chunks`` = n > 1 each slot computes the gate and up projections of intermediate rows
        ``chunk_bounds(ffn, c, n)`` as soon as chunk ``c`` has arrived, and the down projection once
        the last chunk is there, as one GEMM over the whole intermediate dimension.
        """
        manager = self.manager
        num_chunks = manager.replica_chunks
        w_gate, w_up, w_down = replica_weights  # each [redundant_slots_per_rank, ffn, hidden]
        if num_chunks == 1:
            manager.wait_replicas(routing)
            return [_swiglu(rows, w_gate[j], w_up[j], w_down[j]) for j, rows in enumerate(slot_rows)]
        activations: list[list[torch.Tensor]] = [[] for _ in slot_rows]  # per slot, [rows, chunk rows] per chunk
        for chunk in range(num_chunks):
            manager.wait_replicas(routing, chunk=chunk)
            first, last = chunk_bounds(self.ffn_hidden_size, chunk, num_chunks)
            for j, rows in enumerate(slot_rows):
                gate, up = w_gate[j, first:last], w_up[j, first:last]  # [chunk rows, hidden]
                activations[j].append(F.silu(rows @ gate.t()) * (rows @ up.t()))
        return [torch.cat(parts, dim=1) @ w_down[j] for j, parts in enumerate(activations)]
