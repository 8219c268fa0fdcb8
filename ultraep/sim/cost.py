"""Cost model of one MoE layer under expert parallelism, per microbatch and balancing policy.

The model counts only what differs between balancing policies: the routed experts' grouped GEMM, the
dispatch and combine all-to-alls, and the balancing work (planning, weight sync of replicas, and in
training the re-sync and the gradient reduce). Attention, dense layers and shared experts take the
same time on every rank whatever the routing, so they are left out. Throughput ratios computed from
these times are therefore ratios of MoE-layer time. A whole training or prefill step adds the
routing-independent layers to both sides, so its ratios sit closer to 1.

Notation (all per layer and microbatch, float64, seconds and bytes):

- ``sigma = model.top_k / trace_top_k``: assignment scale. A trace's load matrix counts the trace's
  assignments; the cost counts ``sigma`` model assignments for each, so every token costs the
  model's top-k expert passes. Imbalance ratios are unchanged by the scale.
- ``q_i``: quota of instance ``i`` times ``sigma``. ``L_r = sum of q_i on rank r`` (rank load) and
  ``A_r``: assignments produced on rank ``r`` (its tokens times top-k, times ``sigma``).
- ``F = 2 * 3 * hidden * intermediate``: forward FLOPs of one assignment in a SwiGLU expert.
  ``W = 2 * 3 * hidden * intermediate``: bytes of one expert's bf16 weights.
- ``P, B_hbm, B_nv, B_net``: peak FLOP/s, HBM, NVLink (per direction) and network (per direction)
  bandwidths times their efficiency factors.

Formulas:

1. Grouped GEMM, per instance with ``q_i > 0``:
   ``t_i = max(F * (q_i + tile_rows / 2) / P, W / B_hbm)``, and ``t_i = 0`` when ``q_i = 0``.
   The first term is the compute time: a grouped GEMM computes whole tiles of ``tile_rows`` rows per
   expert, which wastes half a tile per expert on average. That makes the efficiency
   ``q / (q + tile_rows/2)`` fall for few tokens per expert. The second term is a floor: each
   instance reads its weights from HBM once. Rank time ``G_r = sum_i t_i``. Backward (training)
   is ``2 * G_r``: the data gradient and the weight gradient each cost one forward GEMM.
2. Dispatch, per rank: the sources of an assignment are spread over the ranks like the tokens, so a
   fraction ``(n_dom(r) - 1) / R`` of rank ``r``'s traffic stays inside its NVLink domain (of
   ``n_dom(r)`` ranks) and ``(R - n_dom(r)) / R`` crosses the network; ``1/R`` is local.
   Rank ``r`` sends ``A_r`` and receives ``L_r`` assignments of ``hidden * dispatch_bytes`` bytes:
   ``D_r = max(max(send_nv, recv_nv) / B_nv, max(send_net, recv_net) / B_net)``.
   Combine moves the same volumes back (``combine_bytes`` per value): ``C_r``. In training the
   backward pass runs both again on gradients.
   Replicas earn no locality credit in this model: a replica receives its quota from all ranks.
3. Weight sync: every replica to be filled receives ``W`` bytes from its master's rank. With
   ``"direct"`` the master sends every copy itself, so a hot expert with ``n`` replicas loads its
   master's outbound link with ``n * W``. With ``"relay"`` an expert with ``n`` copies goes through a
   tree of the runtime's shape (``ultraep.comm.relay``): every sender, the master included, feeds at
   most ``f`` receivers, and receivers forward chunk by chunk (``m = sync_chunks`` chunks per copy), so
   a receiver at level ``L`` gets chunk ``c`` in step ``c + L - 1``. The runtime places receivers, and
   ``"auto"`` picks the experts it relays, by the sends of the trees planned before; the model uses
   direct sends only. So the ranks that forward can differ: in random placements the model's busiest
   rank came out higher in about a quarter of them and lower in under 1%. The fan-out ``f`` minimises the
   tree's link time ``f * (m + D - 1)`` chunk times for depth ``D``: a chain for up to 12 copies with
   8 chunks, a binary tree beyond. ``"auto"`` relays only the experts whose master rank would send more
   copies than the busiest receiver takes in. Per rank,
   ``S_r = max(max(out_nv, in_nv) / B_nv, max(out_net, in_net) / B_net)``, and the sync time is
   ``max_r S_r`` plus the trees' fill, ``(D - 1) * f`` chunks ``W / m`` over the slowest link class
   used, for the tree where that is largest: the last chunk leaves the master ``D - 1`` levels above
   the deepest receiver, and each level's sender splits its link over its ``f`` children. With
   ``step_latency_s = a > 0`` each step of the schedule also costs ``a``: the runtime runs one batch
   of point-to-point sends per step, ``m + D - 1`` steps for the deepest tree ``D`` (``m`` chunks with
   relays or pipelined copies, else 1), so the sync adds ``(m + D - 1) * a`` and the fill ``(D - 1) * a``.
4. Gradient reduce (training): the same trees carry each replica's weight gradient
   (``grad_bytes_per_param`` per parameter) back to its master, so it is the sync formula with
   ``W * grad_bytes_per_param / 2`` bytes per copy.
5. Layer time (the slowest rank sets it):
   forward ``= planner + sync + max_r (D_r + G_r + C_r)``, or with ``overlap_sync`` (the runtime's
   ``ManagerConfig.overlap_sync``, the forward sync in the background)
   ``planner + max_r (D_r + max(Gm_r, sync) + Gr_r + C_r)``, where ``Gm_r`` and ``Gr_r`` are the
   GEMM times of rank ``r``'s masters and replicas: the replicas start once every copy has arrived
   and the masters' GEMM has run. A rank without replica work waits for no copy. With
   ``pipeline_replicas`` as well (``ManagerConfig.pipeline_replicas``), every copy arrives in
   ``n = sync_chunks`` chunks, chunk ``c`` by ``fill + (c + 1) (sync - fill) / n`` where ``fill`` is
   the relay trees' fill of formula 3. A chunk carries the same intermediate rows of the gate, up and
   down weights, so the replicas' gate and up projections (2/3 of ``Gr_r``) run chunk by chunk as the
   chunks arrive, and the down projection (1/3) runs once the whole copy is there:
   ``max(Gm_r + Gr_r, first + Gr_r, sync + Gr_r * (2 / (3 n) + 1 / 3))`` replaces
   ``max(Gm_r, sync) + Gr_r``, with ``first = fill + (sync - fill) / n`` the first chunk's arrival. With
   ``overlap_grad_reduce`` the gradient reduce runs behind the backward GEMMs of the layer below, and
   only ``max(0, grad_reduce - min_r 2 G_r)`` stays on the critical path. Only the GEMMs count as
   cover because the backward all-to-all uses the same links. This layer's GEMMs stand in for the
   layer below. The first layer has no layer below, so its reduce is really exposed in full; the
   model leaves that out, which is one layer in ``num_moe_layers``. The sync is counted from the end of the dispatch although the
   runtime starts it before, because both share the links;
   training adds ``resync + max_r (D_r + 2 G_r + C_r) + grad_reduce``; with
   ``hide_backward_replica_traffic`` the re-sync and the gradient reduce are left out (an optimistic
   bound for perfect overlap with other layers' backward work).
   Replicas that live for one microbatch (the ``quota`` policy) sync every forward, re-sync in
   backward (redundant buffers are reused across layers) and reduce gradients every microbatch; a
   replica with quota 0 is skipped. The runtime also skips a copy when the slot still holds the same
   layer's current weights, which happens only for the last layer's re-sync; that saving is ignored.
   Persistent replicas (``eplb``, ``lp_reroute``) sync only the slots whose expert changed and, in
   training, refresh every replica after the optimizer step and reduce their gradients once per step;
   those two costs are spread over ``microbatches_per_step``.
   Replicas planned every microbatch into per-layer buffers (``quota`` with
   ``ManagerConfig.buffer_layers``; the ``"layer"`` lifetime) keep each layer's slots between
   microbatches, and a rank's replicas go to the slots that already contain their expert (the
   runtime's slot cache). In prefill the forward copies only the slots whose expert changed
   (``sync_changed``). In training every forward copies every replica (``sync_all``): each backward
   accumulates into the masters' gradients, which changes the runtime's weight version, even within
   one optimizer step. The backward needs no re-sync. Gradients are reduced every microbatch because
   the placement changes. The buffers cost
   ``redundant_slots_per_rank`` expert copies per layer and rank, the memory of the persistent policies.
6. Ideal: every rank sends and receives the mean of ``A_r`` and holds its ``experts_per_rank`` masters
   with ``mean / experts_per_rank`` assignments each. No planner, sync, re-sync or gradient reduce.
   The ideal is never slower than a policy whose slowest rank runs at least ``experts_per_rank``
   instances with load; a rank whose load sits on fewer experts saves their fixed costs and could in
   principle beat it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ultraep.comm.relay import choose_fan_out
from ultraep.layout import ExpertLayout
from ultraep.sim.hardware import Efficiency, HardwareConfig
from ultraep.sim.models import ModelConfig

__all__ = [
    "MODES",
    "REPLICA_LIFETIMES",
    "SYNC_SCHEMES",
    "CostSettings",
    "LayerCosts",
    "SyncTraffic",
    "ideal_layer_costs",
    "instance_gemm_time",
    "layer_costs",
    "layer_time_lower_bound",
    "link_rates",
    "replica_sync_traffic",
    "sync_time",
]

MODES = ("train", "prefill")
# The down projection's share of a SwiGLU expert's FLOPs (one of its three equal GEMMs).
_DOWN_SHARE = 1 / 3
SYNC_SCHEMES = ("direct", "relay", "auto")
REPLICA_LIFETIMES = ("microbatch", "layer", "persistent")


@dataclasses.dataclass(frozen=True)
class CostSettings:
    """Settings of the cost model that are not properties of the model or the hardware."""

    mode: str = "train"
    """``"train"`` (forward and backward) or ``"prefill"`` (forward only)."""
    efficiency: Efficiency = dataclasses.field(default_factory=Efficiency)
    """Fractions of the peak rates reached."""
    tile_rows: int = 128
    """Rows per tile of the grouped GEMM; each expert with tokens wastes half a tile on average."""
    dispatch_bytes_per_value: int = 2
    """Bytes per hidden value in dispatch (2 for bf16, 1 for fp8 dispatch)."""
    combine_bytes_per_value: int = 2
    """Bytes per hidden value in combine (bf16)."""
    grad_bytes_per_param: int = 4
    """Bytes per parameter of a replica's weight gradient sent to its master (4: fp32 main gradients)."""
    sync_scheme: str = "auto"
    """Weight sync mode, as in the runtime: ``"direct"`` (the master sends every copy), ``"relay"``
    (experts with several copies go through relays) or ``"auto"`` (relay only where a master rank
    sends more copies than the busiest receiver takes in)."""
    sync_chunks: int = 4
    """Chunks per expert copy (``ManagerConfig.num_chunks``): relays forward chunk by chunk, which sets
    the relay trees' shape and fill (formula 3), and with ``pipeline_replicas`` replicas compute chunk
    by chunk."""
    step_latency_s: float = 0.0
    """Fixed cost of one step of a weight sync or gradient reduce schedule (one batch of point-to-point
    sends), formula 3. 0 leaves it out. Not measured: on GPUs a step costs some microseconds."""
    microbatches_per_step: int = 1
    """Microbatches per optimizer step; persistent replicas refresh and reduce once per step."""
    overlap_grad_reduce: bool = False
    """Run the gradient reduce in the background behind the backward GEMMs of the layer below, as the
    runtime does with ``ManagerConfig.overlap_grad_reduce`` (formula 5)."""
    overlap_sync: bool = False
    """Run the forward weight sync in the background, behind the masters' GEMM (formula 5), as the
    runtime does with ``ManagerConfig.overlap_sync``."""
    pipeline_replicas: bool = False
    """With ``overlap_sync``: every copy arrives in ``sync_chunks`` chunks and a replica computes each
    chunk once it has arrived, as the runtime does with ``ManagerConfig.pipeline_replicas`` (formula 5)."""
    hide_backward_replica_traffic: bool = False
    """Leave the backward re-sync (or refresh) and the gradient reduce off the critical path, as if they
    overlapped perfectly with other layers' backward work. An optimistic bound; their bytes still count."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CostSettings.mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.sync_scheme not in SYNC_SCHEMES:
            raise ValueError(f"CostSettings.sync_scheme must be one of {list(SYNC_SCHEMES)}, got {self.sync_scheme!r}")
        if not isinstance(self.overlap_grad_reduce, bool):
            raise TypeError(f"CostSettings.overlap_grad_reduce must be a bool, got {type(self.overlap_grad_reduce).__name__}")
        if not isinstance(self.overlap_sync, bool):
            raise TypeError(f"CostSettings.overlap_sync must be a bool, got {type(self.overlap_sync).__name__}")
        if not isinstance(self.pipeline_replicas, bool):
            raise TypeError(
                f"CostSettings.pipeline_replicas must be a bool, got {self.pipeline_replicas!r} ({type(self.pipeline_replicas).__name__})"
            )
        if self.pipeline_replicas and not self.overlap_sync:
            raise ValueError(
                "CostSettings.pipeline_replicas=True needs overlap_sync=True: replicas can compute early chunks only "
                "while the sync runs in the background"
            )
        if not isinstance(self.hide_backward_replica_traffic, bool):
            raise TypeError(
                "CostSettings.hide_backward_replica_traffic must be a bool, got "
                f"{type(self.hide_backward_replica_traffic).__name__}"
            )
        if isinstance(self.step_latency_s, bool) or not isinstance(self.step_latency_s, (int, float)) or not (
            math.isfinite(self.step_latency_s) and self.step_latency_s >= 0
        ):
            raise ValueError(f"CostSettings.step_latency_s must be a finite number >= 0 (seconds), got {self.step_latency_s!r}")
        if not isinstance(self.efficiency, Efficiency):
            raise TypeError(f"CostSettings.efficiency must be an Efficiency, got {type(self.efficiency).__name__}")
        for name in (
            "tile_rows",
            "dispatch_bytes_per_value",
            "combine_bytes_per_value",
            "grad_bytes_per_param",
            "sync_chunks",
            "microbatches_per_step",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CostSettings.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCosts:
    """Time and traffic of one MoE layer for a batch of samples (layer and microbatch pairs).

    Every field is [num_samples] float64 on the CPU; times are seconds, traffic is bytes.
    """

    total_s: torch.Tensor
    """Layer time: forward, plus backward in training."""
    planner_s: torch.Tensor
    """Planner time on the critical path."""
    sync_s: torch.Tensor
    """Forward weight sync of replicas."""
    forward_s: torch.Tensor
    """Slowest rank's dispatch + grouped GEMM + combine in forward."""
    backward_s: torch.Tensor
    """Slowest rank's backward all-to-alls and GEMMs (0 in prefill)."""
    resync_s: torch.Tensor
    """Backward re-sync of replicas, or the per-step refresh of persistent replicas spread over microbatches."""
    grad_reduce_s: torch.Tensor
    """Gradient reduce of replicas (0 in prefill)."""
    bytes_moved: torch.Tensor
    """Weight and gradient bytes sent for replicas: sync, re-sync or refresh, and gradient reduce."""
    max_rank_load: torch.Tensor
    """Largest rank load, in model assignments (``sigma`` times the trace's)."""
    mean_rank_load: torch.Tensor
    """Mean rank load, in model assignments."""


@dataclasses.dataclass(frozen=True, eq=False)
class SyncTraffic:
    """Bytes each rank sends and receives to fill a set of redundant slots; every field is per sample."""

    out_nvlink: torch.Tensor
    """[num_samples, num_ranks] float64. Bytes sent to ranks of the same NVLink domain."""
    in_nvlink: torch.Tensor
    """[num_samples, num_ranks] float64. Bytes received from ranks of the same NVLink domain."""
    out_network: torch.Tensor
    """[num_samples, num_ranks] float64. Bytes sent to other domains."""
    in_network: torch.Tensor
    """[num_samples, num_ranks] float64. Bytes received from other domains."""
    depth: torch.Tensor
    """[num_samples] int64. Deepest level of any copy tree (1 = all direct from the master, 0 = no copies)."""
    fill_chunks: torch.Tensor
    """[num_samples] int64. The trees' fill in chunk times, ``(D - 1) * f`` maximised over the relayed
    experts (formula 3); 0 without relays."""
    num_steps: torch.Tensor
    """[num_samples] int64. Steps of the schedule: ``m + D - 1`` with ``m`` chunks per copy when some
    expert is relayed or the copies are chunked, else ``D`` (formula 3); 0 without copies."""
    num_copies: torch.Tensor
    """[num_samples] int64. Replicas filled."""
    bytes_per_copy: float
    """Bytes sent per filled slot."""


def instance_gemm_time(
    quota: torch.Tensor, model: ModelConfig, hardware: HardwareConfig, settings: CostSettings
) -> torch.Tensor:
    """Return the forward grouped-GEMM time of each instance (formula 1 of the module docstring).

    quota: [...] float64 or integer tensor, CPU. Model assignments of each instance (already scaled
      by ``sigma``); 0 = the instance does no work.
    Returns [...] float64 seconds, same shape.
    """
    quota = quota.to(torch.float64)
    efficiency = settings.efficiency
    compute = model.flops_per_assignment * (quota + settings.tile_rows / 2) / (hardware.peak_flops * efficiency.gemm)
    weight_read = model.bytes_per_expert / (hardware.hbm_bytes_per_s * efficiency.hbm)
    return torch.where(quota > 0, torch.clamp(compute, min=weight_read), torch.zeros_like(quota))


def replica_sync_traffic(
    replica_expert_ids: torch.Tensor,
    synced: torch.Tensor,
    layout: ExpertLayout,
    bytes_per_copy: float,
    domain_size: int,
    settings: CostSettings,
    *,
    chunked_copies: bool = False,
) -> SyncTraffic:
    """Build the copy trees of formula 3 and count the bytes each rank sends and receives.

    replica_expert_ids: [num_samples, num_ranks, redundant_slots_per_rank] int64, CPU. Logical expert
      of each redundant slot; -1 = empty.
    synced: [num_samples, num_ranks, redundant_slots_per_rank] bool, CPU. Slots that receive a copy in
      this sample; slots with -1 are never synced.
    bytes_per_copy: bytes sent per filled slot (expert weights, or a replica's weight gradient).
    domain_size: ranks per NVLink domain.
    chunked_copies: the copies go in ``sync_chunks`` chunks even without relays (the forward sync with
      ``pipeline_replicas``); this sets the schedule's steps.

    ``"direct"``: every copy comes from the master. ``"relay"``: an expert with ``n`` copies uses the
    relay tree of fan-out ``f = choose_fan_out(n, sync_chunks)`` (``ultraep.comm.relay``). Its copies
    are ranked by how many direct copies their rank's masters send (fewest first, then slot id), and
    take the tree's places breadth first: the first ``f`` receive from the master, and copy ``p >= f``
    from copy ``p // f - 1``. ``"auto"``: relay only the experts whose master rank would send more
    direct copies than the busiest receiver takes in.
    """
    num_samples, num_ranks, slots = replica_expert_ids.shape
    num_flat = num_ranks * slots
    zeros = torch.zeros(num_samples, num_ranks, dtype=torch.float64)
    if num_flat == 0:
        empty = torch.zeros(num_samples, dtype=torch.int64)
        return SyncTraffic(
            zeros, zeros.clone(), zeros.clone(), zeros.clone(), empty, empty.clone(), empty.clone(), empty.clone(),
            float(bytes_per_copy),
        )
    flat_expert = replica_expert_ids.reshape(num_samples, num_flat)  # [num_samples, num_flat]
    valid = (flat_expert >= 0) & synced.reshape(num_samples, num_flat)
    slot_rank = torch.arange(num_flat).expand(num_samples, num_flat) // slots
    master_rank = flat_expert.clamp(min=0) // layout.experts_per_rank

    # Step 1: direct copy counts: what each master rank would send and each rank receive.
    valid_count = valid.to(torch.int64)
    direct_out = torch.zeros(num_samples, num_ranks, dtype=torch.int64).scatter_add_(1, master_rank, valid_count)
    direct_in = torch.zeros(num_samples, num_ranks, dtype=torch.int64).scatter_add_(1, slot_rank, valid_count)

    # Step 2: sort copies by (expert, sends of their rank, slot id); unsynced slots go last.
    sends = direct_out.gather(1, slot_rank)  # [num_samples, num_flat]
    expert_key = torch.where(valid, flat_expert, torch.full_like(flat_expert, layout.num_experts))
    slot_idx = torch.arange(num_flat).expand(num_samples, num_flat)
    key = (expert_key * (num_flat + 1) + sends) * num_flat + slot_idx
    order = torch.argsort(key, dim=1)
    sorted_expert = expert_key.gather(1, order)
    sorted_rank = slot_rank.gather(1, order)
    sorted_valid = valid.gather(1, order)
    sorted_master = master_rank.gather(1, order)

    # Step 3: position of each copy among its expert's copies and the expert's copy count.
    position_idx = torch.arange(num_flat).expand(num_samples, num_flat)
    previous_expert = torch.cat([torch.full((num_samples, 1), -1, dtype=torch.int64), sorted_expert[:, :-1]], dim=1)
    group_start = torch.where(sorted_expert != previous_expert, position_idx, torch.zeros_like(position_idx))
    group_start = torch.cummax(group_start, dim=1).values  # [num_samples, num_flat]
    position = position_idx - group_start
    copies_per_expert = torch.zeros(num_samples, layout.num_experts + 1, dtype=torch.int64).scatter_add_(
        1, sorted_expert, sorted_valid.to(torch.int64)
    )
    group_size = copies_per_expert.gather(1, sorted_expert)  # copies of this copy's expert

    # Step 4: which experts relay, and each copy's sender.
    if settings.sync_scheme == "direct":
        relayed = torch.zeros_like(sorted_valid)
    else:
        relayed = sorted_valid & (group_size > 1)
        if settings.sync_scheme == "auto":
            busiest_intake = direct_in.max(dim=1, keepdim=True).values
            relayed = relayed & (direct_out.gather(1, sorted_master) > busiest_intake)
    fan_out = _fan_out_table(num_flat, settings.sync_chunks)[group_size].clamp(min=1)
    from_relay = relayed & (position >= fan_out)
    parent_position = group_start + (position // fan_out - 1).clamp(min=0)
    sender = torch.where(from_relay, sorted_rank.gather(1, parent_position.clamp(max=num_flat - 1)), sorted_master)
    # Level in the tree: breadth-first place p has parent place p // f - 1, the master above place f - 1.
    level = torch.zeros_like(position)
    place = torch.where(relayed, position + 1, torch.ones_like(position))
    while bool((place > 0).any()):
        level += (place > 0).to(torch.int64)
        place = torch.where(place > 0, (place - 1) // fan_out, place)

    # Step 5: bytes per rank and link class.
    same_domain = (sender // domain_size) == (sorted_rank // domain_size)
    copy_bytes = torch.where(sorted_valid, float(bytes_per_copy), 0.0).to(torch.float64)
    nvlink_bytes = torch.where(same_domain, copy_bytes, 0.0)
    network_bytes = torch.where(same_domain, 0.0, copy_bytes)
    level = torch.where(sorted_valid, level, 0)
    depth = level.max(dim=1).values
    fill_chunks = torch.where(relayed, (level - 1) * fan_out, 0).max(dim=1).values
    # The runtime splits every copy into chunks once some expert is relayed (or when asked to).
    chunked = (from_relay.any(dim=1) | chunked_copies) & (depth > 0)
    num_steps = torch.where(chunked, settings.sync_chunks + depth - 1, depth)
    return SyncTraffic(
        out_nvlink=zeros.clone().scatter_add_(1, sender, nvlink_bytes),
        in_nvlink=zeros.clone().scatter_add_(1, sorted_rank, nvlink_bytes),
        out_network=zeros.clone().scatter_add_(1, sender, network_bytes),
        in_network=zeros.clone().scatter_add_(1, sorted_rank, network_bytes),
        depth=depth,
        fill_chunks=fill_chunks,
        num_steps=num_steps,
        num_copies=sorted_valid.sum(dim=1),
        bytes_per_copy=float(bytes_per_copy),
    )


@functools.lru_cache(maxsize=16)
def _fan_out_table(max_receivers: int, num_chunks: int) -> torch.Tensor:
    """Return [max_receivers + 1] int64: ``choose_fan_out(n, num_chunks)`` for every ``n`` (0 for 0)."""
    return torch.tensor([0] + [choose_fan_out(n, num_chunks) for n in range(1, max_receivers + 1)], dtype=torch.int64)


def sync_time(traffic: SyncTraffic, hardware: HardwareConfig, settings: CostSettings) -> torch.Tensor:
    """Return [num_samples] float64 seconds to move ``traffic`` (formula 3 of the module docstring)."""
    nvlink, network = link_rates(hardware, settings)
    per_rank = torch.maximum(
        torch.maximum(traffic.out_nvlink, traffic.in_nvlink) / nvlink,
        torch.maximum(traffic.out_network, traffic.in_network) / network,
    )  # [num_samples, num_ranks]
    steps = traffic.num_steps.to(torch.float64) * settings.step_latency_s
    return per_rank.max(dim=1).values + _fill_transfer_time(traffic, hardware, settings) + steps


def link_rates(hardware: HardwareConfig, settings: CostSettings) -> tuple[float, float]:
    """Return the NVLink and network bytes per second per direction after the efficiency factors."""
    return hardware.nvlink_bytes_per_s * settings.efficiency.nvlink, hardware.network_bytes_per_s * settings.efficiency.network


def relay_fill_time(traffic: SyncTraffic, hardware: HardwareConfig, settings: CostSettings) -> torch.Tensor:
    """Return [num_samples] float64 seconds: how much later than a direct copy the first chunk reaches
    the deepest receiver, the trees' fill with the latency of the steps below the first level
    (formula 3; 0 without relays). ``sync_time`` counts the same fill and the latency of every step."""
    latency = (traffic.depth - 1).clamp(min=0).to(torch.float64) * settings.step_latency_s
    return _fill_transfer_time(traffic, hardware, settings) + latency


def _fill_transfer_time(traffic: SyncTraffic, hardware: HardwareConfig, settings: CostSettings) -> torch.Tensor:
    """Return [num_samples] float64 seconds: the trees' fill, ``fill_chunks`` chunks over the slowest link class used."""
    nvlink, network = link_rates(hardware, settings)
    chunk_bytes = traffic.bytes_per_copy / settings.sync_chunks
    uses_network = traffic.out_network.sum(dim=1) > 0
    chunk_time = torch.where(uses_network, chunk_bytes / network, chunk_bytes / nvlink)
    return traffic.fill_chunks.to(torch.float64) * chunk_time


def layer_costs(
    quota: torch.Tensor,
    replica_expert_ids: torch.Tensor,
    source_load: torch.Tensor,
    layout: ExpertLayout,
    model: ModelConfig,
    hardware: HardwareConfig,
    settings: CostSettings,
    *,
    assignment_scale: float = 1.0,
    planner_time_s: float = 0.0,
    replica_lifetime: str = "microbatch",
    synced: torch.Tensor | None = None,
) -> LayerCosts:
    """Cost one MoE layer under a balancing policy for a batch of samples (formulas 1-5).

    quota: [num_samples, num_slots] integer tensor, CPU. Quota of every physical slot from the plan.
    replica_expert_ids: [num_samples, num_ranks, redundant_slots_per_rank] int64, CPU. Logical expert
      of each redundant slot; -1 = empty.
    source_load: [num_samples, num_ranks] integer tensor, CPU. Assignments produced on each rank
      (row sums of the load matrix).
    assignment_scale: ``sigma``, model assignments per trace assignment.
    planner_time_s: planner time on the critical path per layer and microbatch (forward only).
    replica_lifetime: ``"microbatch"`` (replicas refilled every microbatch in buffers shared by all
      layers), ``"layer"`` (replicas planned every microbatch into per-layer buffers) or
      ``"persistent"`` (replicas stay until the placement changes); see formula 5.
    synced: [num_samples, num_ranks, redundant_slots_per_rank] bool, CPU, or None. The slots whose
      expert changed in this sample; required for ``"layer"`` and ``"persistent"`` and ignored for
      ``"microbatch"`` (every filled slot is synced).
    """
    _check_cost_inputs(quota, replica_expert_ids, source_load, layout, assignment_scale, planner_time_s)
    if replica_lifetime not in REPLICA_LIFETIMES:
        raise ValueError(f"replica_lifetime must be one of {list(REPLICA_LIFETIMES)}, got {replica_lifetime!r}")
    if replica_lifetime != "microbatch" and synced is None:
        raise ValueError(f"replica_lifetime={replica_lifetime!r} needs synced, the mask of slots whose expert changed")
    num_samples = quota.shape[0]
    training = settings.mode == "train"
    replica_quota = quota.view(num_samples, layout.num_ranks, layout.slots_per_rank)[:, :, layout.experts_per_rank :]
    # A replica with quota 0 does no work, so it needs no weights and sends no gradient.
    filled = (replica_expert_ids >= 0) & (replica_quota > 0)

    # Step 1: dispatch, grouped GEMM and combine on every rank.
    instance_quota = quota.to(torch.float64).view(num_samples, layout.num_ranks, layout.slots_per_rank) * assignment_scale
    rank_load = instance_quota.sum(dim=2)  # [num_samples, num_ranks]
    instance_gemm = instance_gemm_time(instance_quota, model, hardware, settings)  # [num_samples, num_ranks, slots_per_rank]
    gemm = instance_gemm.sum(dim=2)
    dispatch, combine = _all_to_all_times(source_load.to(torch.float64) * assignment_scale, rank_load, model, hardware, settings)
    forward = (dispatch + gemm + combine).max(dim=1).values
    backward = (dispatch + 2 * gemm + combine).max(dim=1).values if training else torch.zeros(num_samples, dtype=torch.float64)

    # Step 2: weight sync, re-sync or refresh, and gradient reduce of replicas.
    weight_bytes = float(model.bytes_per_expert)
    grad_bytes = model.params_per_expert * float(settings.grad_bytes_per_param)
    # Forward copies go in chunks with pipeline_replicas (the backward re-sync reuses this schedule).
    pipelined = settings.pipeline_replicas
    all_traffic = replica_sync_traffic(
        replica_expert_ids, filled, layout, weight_bytes, hardware.domain_size, settings, chunked_copies=pipelined
    )
    all_sync = sync_time(all_traffic, hardware, settings)
    all_copy_bytes = all_traffic.num_copies.to(torch.float64) * weight_bytes
    zeros = torch.zeros(num_samples, dtype=torch.float64)
    if training:
        grad_traffic = replica_sync_traffic(replica_expert_ids, filled, layout, grad_bytes, hardware.domain_size, settings)
        grad_reduce = sync_time(grad_traffic, hardware, settings)
        grad_copy_bytes = grad_traffic.num_copies.to(torch.float64) * grad_bytes
    else:
        grad_reduce, grad_copy_bytes = zeros, zeros
    # fill: the relay trees' share of the forward sync, which delays the first chunk of a relayed copy.
    if replica_lifetime == "microbatch":
        sync, sync_bytes = all_sync, all_copy_bytes
        fill = relay_fill_time(all_traffic, hardware, settings)
        resync = all_sync if training else zeros
        resync_bytes = all_copy_bytes if training else zeros
    elif replica_lifetime == "layer":
        moved_traffic = replica_sync_traffic(
            replica_expert_ids, synced & filled, layout, weight_bytes, hardware.domain_size, settings, chunked_copies=pipelined
        )
        moved_sync = sync_time(moved_traffic, hardware, settings)
        moved_bytes = moved_traffic.num_copies.to(torch.float64) * weight_bytes
        moved_fill = relay_fill_time(moved_traffic, hardware, settings)
        if training:
            # Each backward accumulates into the masters' gradients, which changes the runtime's weight
            # version, so every training forward copies every replica.
            sync, sync_bytes = all_sync, all_copy_bytes
            fill = relay_fill_time(all_traffic, hardware, settings)
        else:
            sync, sync_bytes, fill = moved_sync, moved_bytes, moved_fill
        resync, resync_bytes = zeros, zeros
    else:
        moved_traffic = replica_sync_traffic(
            replica_expert_ids, synced & (replica_expert_ids >= 0), layout, weight_bytes, hardware.domain_size, settings,
            chunked_copies=pipelined,
        )
        sync = sync_time(moved_traffic, hardware, settings)
        sync_bytes = moved_traffic.num_copies.to(torch.float64) * weight_bytes
        fill = relay_fill_time(moved_traffic, hardware, settings)
        per_step = float(settings.microbatches_per_step)
        resync = all_sync / per_step if training else zeros
        resync_bytes = all_copy_bytes / per_step if training else zeros
        grad_reduce = grad_reduce / per_step
        grad_copy_bytes = grad_copy_bytes / per_step

    # Step 3: the layer's critical path. With the sync in the background, only the part of it that
    # outlasts the masters' GEMM on the slowest rank is exposed, and sync_s reports that part.
    if settings.overlap_sync:
        master_gemm = instance_gemm[:, :, : layout.experts_per_rank].sum(dim=2)
        replica_gemm = instance_gemm[:, :, layout.experts_per_rank :].sum(dim=2)
        if settings.pipeline_replicas:
            # Chunk c of every copy has arrived at fill + (c + 1) (sync - fill) / n. After the masters,
            # the replicas' gate and up projections run chunk by chunk as the chunks arrive. The last
            # chunk's share and the down projection run once the whole copy is there.
            n = settings.sync_chunks
            first_chunk = (fill + (sync - fill) / n)[:, None]
            tail = replica_gemm * ((1 - _DOWN_SHARE) / n + _DOWN_SHARE)
            replicas_done = torch.maximum(
                torch.maximum(master_gemm + replica_gemm, first_chunk + replica_gemm), sync[:, None] + tail
            )
            expert_phase = torch.where(replica_gemm > 0, replicas_done, master_gemm + replica_gemm)
        else:
            # A rank without replica work does not wait for the copies.
            expert_phase = torch.where(
                replica_gemm > 0, torch.maximum(master_gemm, sync[:, None]) + replica_gemm, master_gemm + replica_gemm
            )
        overlapped = dispatch + expert_phase + combine
        sync = overlapped.max(dim=1).values - forward
    if training and settings.overlap_grad_reduce:
        cover = (2 * gemm).min(dim=1).values  # the shortest backward GEMM time of any rank
        grad_reduce = (grad_reduce - cover).clamp(min=0.0)
    planner = torch.full((num_samples,), float(planner_time_s), dtype=torch.float64)
    total = planner + sync + forward
    if training:
        total = total + backward
        if not settings.hide_backward_replica_traffic:
            total = total + resync + grad_reduce
    return LayerCosts(
        total_s=total,
        planner_s=planner,
        sync_s=sync,
        forward_s=forward,
        backward_s=backward,
        resync_s=resync,
        grad_reduce_s=grad_reduce,
        bytes_moved=sync_bytes + resync_bytes + grad_copy_bytes,
        max_rank_load=rank_load.max(dim=1).values,
        mean_rank_load=rank_load.mean(dim=1),
    )


def ideal_layer_costs(
    source_load: torch.Tensor,
    layout: ExpertLayout,
    model: ModelConfig,
    hardware: HardwareConfig,
    settings: CostSettings,
    *,
    assignment_scale: float = 1.0,
) -> LayerCosts:
    """Cost the force-balanced ideal (formula 6): every rank at the mean load, no balancing cost.

    source_load: [num_samples, num_ranks] integer tensor, CPU. Assignments produced on each rank.
    """
    mean_load, uniform_load, dispatch, combine = _uniform_all_to_all(source_load, layout, model, hardware, settings, assignment_scale)
    num_samples = source_load.shape[0]
    instance_quota = (mean_load / layout.experts_per_rank).unsqueeze(2).expand(num_samples, layout.num_ranks, layout.experts_per_rank)
    gemm = instance_gemm_time(instance_quota, model, hardware, settings).sum(dim=2)
    forward = (dispatch + gemm + combine).max(dim=1).values
    zeros = torch.zeros(num_samples, dtype=torch.float64)
    if settings.mode == "train":
        backward = (dispatch + 2 * gemm + combine).max(dim=1).values
    else:
        backward = zeros
    return LayerCosts(
        total_s=forward + backward,
        planner_s=zeros,
        sync_s=zeros,
        forward_s=forward,
        backward_s=backward,
        resync_s=zeros,
        grad_reduce_s=zeros,
        bytes_moved=zeros,
        max_rank_load=uniform_load.max(dim=1).values,
        mean_rank_load=uniform_load.mean(dim=1),
    )


def layer_time_lower_bound(
    source_load: torch.Tensor,
    layout: ExpertLayout,
    model: ModelConfig,
    hardware: HardwareConfig,
    settings: CostSettings,
    *,
    assignment_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ([num_samples] forward, [num_samples] backward) seconds that no policy's layer beats.

    The slowest rank takes at least the mean over ranks of dispatch + GEMM + combine. Dispatch and
    combine are convex in a rank's sent and received load, so their mean is at least their value at the
    mean load. A rank's GEMM takes at least ``F * load / P``, formula 1 without its tile waste and
    weight-read floor. The ideal (formula 6) keeps those per-instance costs, so a policy that puts a
    rank's load on fewer experts can beat the ideal but not this bound. Backward (training) is the same
    with twice the GEMM; it is 0 in prefill.
    source_load: [num_samples, num_ranks] integer tensor, CPU. Assignments produced on each rank.
    """
    mean_load, _, dispatch, combine = _uniform_all_to_all(source_load, layout, model, hardware, settings, assignment_scale)
    gemm = model.flops_per_assignment * mean_load[:, 0] / (hardware.peak_flops * settings.efficiency.gemm)
    forward = dispatch[:, 0] + gemm + combine[:, 0]
    backward = dispatch[:, 0] + 2 * gemm + combine[:, 0] if settings.mode == "train" else torch.zeros_like(forward)
    return forward, backward


def _uniform_all_to_all(
    source_load: torch.Tensor,
    layout: ExpertLayout,
    model: ModelConfig,
    hardware: HardwareConfig,
    settings: CostSettings,
    assignment_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the mean load [num_samples, 1], it on every rank, and that load's dispatch and combine times.

    The two times are [num_samples, num_ranks] float64 seconds, every rank sending and receiving the mean.
    """
    if not isinstance(source_load, torch.Tensor) or source_load.dim() != 2 or source_load.shape[1] != layout.num_ranks:
        raise ValueError(
            f"source_load must be a [num_samples, num_ranks={layout.num_ranks}] tensor, got "
            f"{list(source_load.shape) if isinstance(source_load, torch.Tensor) else type(source_load).__name__}"
        )
    mean_load = source_load.to(torch.float64).mean(dim=1, keepdim=True) * assignment_scale
    uniform_load = mean_load.expand(source_load.shape[0], layout.num_ranks)
    dispatch, combine = _all_to_all_times(uniform_load, uniform_load, model, hardware, settings)
    return mean_load, uniform_load, dispatch, combine


def _all_to_all_times(
    send_load: torch.Tensor, recv_load: torch.Tensor, model: ModelConfig, hardware: HardwareConfig, settings: CostSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ([num_samples, num_ranks] dispatch seconds, same for combine) from formula 2.

    send_load, recv_load: [num_samples, num_ranks] float64 model assignments a rank sends in dispatch
    (its own) and receives (its rank load).
    """
    num_ranks = send_load.shape[1]
    domain_size = hardware.domain_size
    rank_ids = torch.arange(num_ranks)
    domain_start = (rank_ids // domain_size) * domain_size
    ranks_in_domain = torch.clamp(num_ranks - domain_start, max=domain_size).to(torch.float64)  # [num_ranks]
    nvlink_fraction = (ranks_in_domain - 1) / num_ranks
    network_fraction = (num_ranks - ranks_in_domain) / num_ranks
    nvlink, network = link_rates(hardware, settings)

    def one_direction(bytes_per_value: int) -> torch.Tensor:
        bytes_per_assignment = model.hidden_size * bytes_per_value
        volume = torch.maximum(send_load, recv_load) * bytes_per_assignment
        return torch.maximum(volume * nvlink_fraction / nvlink, volume * network_fraction / network)

    return one_direction(settings.dispatch_bytes_per_value), one_direction(settings.combine_bytes_per_value)


def _check_cost_inputs(
    quota: torch.Tensor,
    replica_expert_ids: torch.Tensor,
    source_load: torch.Tensor,
    layout: ExpertLayout,
    assignment_scale: float,
    planner_time_s: float,
) -> None:
    for name, tensor in (("quota", quota), ("replica_expert_ids", replica_expert_ids), ("source_load", source_load)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    num_samples = quota.shape[0] if quota.dim() == 2 else -1
    expected = {
        "quota": (num_samples, layout.num_slots),
        "replica_expert_ids": (num_samples, layout.num_ranks, layout.redundant_slots_per_rank),
        "source_load": (num_samples, layout.num_ranks),
    }
    for name, tensor in (("quota", quota), ("replica_expert_ids", replica_expert_ids), ("source_load", source_load)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {list(expected[name])} for {layout} (num_samples from quota), "
                f"got {list(tensor.shape)}"
            )
    if not (math.isfinite(assignment_scale) and assignment_scale > 0):
        raise ValueError(f"assignment_scale must be a positive finite number, got {assignment_scale!r}")
    if not (math.isfinite(planner_time_s) and planner_time_s >= 0):
        raise ValueError(f"planner_time_s must be a finite number >= 0, got {planner_time_s!r}")
