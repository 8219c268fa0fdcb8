"""Relay trees for weight sync: spread one master's fan-out over a few relay ranks.

When logical expert ``e`` has ``n`` replicas to fill, a direct copy makes its master's rank send
``n`` full copies while every receiver takes one. A relay tree lets the master send to ``k`` relays
only; each relay forwards what it received, chunk by chunk, to its share of the remaining
``n - k`` receivers. The master then sends ``k`` copies and each relay ``ceil((n - k) / k)`` or
fewer, so with ``k`` near ``sqrt(n)`` no rank sends more than about ``sqrt(n)`` copies.

Everything here is pure Python on integers, so every rank derives the same trees from the same plan
without communicating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableSequence, Sequence

from ultraep.layout import ExpertLayout

__all__ = ["RelayTree", "choose_num_relays", "plan_relay_tree", "plan_relay_trees"]


@dataclasses.dataclass(frozen=True)
class RelayTree:
    """Two-level copy tree of one logical expert: master to relays, relays to the other receivers.

    Example: expert 0 mastered on rank 0 with receivers on ranks 1, 2, 3 and 4 (one redundant slot
    per rank, so slot ids are those of the ranks' only redundant slots) and ``num_relays = 2``::

        relays   = ((1, slot_of_rank_1), (2, slot_of_rank_2))
        children = (((3, slot_of_rank_3),), ((4, slot_of_rank_4),))

    Rank 0 sends two copies, ranks 1 and 2 forward one each.
    """

    expert_id: int
    """Logical expert the tree copies."""
    master_rank: int
    """Rank holding the expert's master slot; the root of the tree."""
    relays: tuple[tuple[int, int], ...]
    """(rank, physical slot id) of each redundant slot the master fills directly."""
    children: tuple[tuple[tuple[int, int], ...], ...]
    """Per relay, (rank, physical slot id) of the redundant slots it forwards to, in slot id order."""


def choose_num_relays(num_receivers: int) -> int:
    """Return how many receivers the master should feed directly when ``num_receivers`` slots need a copy.

    Picks ``k`` in ``1 .. num_receivers`` minimising the largest fan-out of one rank,
    ``max(k, ceil((num_receivers - k) / k))``; ties go to the larger ``k`` because each relay hop adds
    one chunk of latency. ``num_receivers`` itself means a direct copy (1 -> 1, 2 -> 1, 3 -> 2,
    4 -> 2, 9 -> 3, 16 -> 4).
    """
    if isinstance(num_receivers, bool) or not isinstance(num_receivers, int) or num_receivers < 1:
        raise ValueError(f"num_receivers must be a positive int, got {num_receivers!r}")
    best_k, best_fan_out = num_receivers, num_receivers
    for k in range(num_receivers, 0, -1):
        fan_out = max(k, -(-(num_receivers - k) // k))
        if fan_out < best_fan_out:
            best_k, best_fan_out = k, fan_out
    return best_k


def plan_relay_tree(
    expert_id: int,
    master_rank: int,
    receivers: Sequence[tuple[int, int]],
    sends_per_rank: MutableSequence[int],
    *,
    num_relays: int | None = None,
) -> RelayTree:
    """Build the relay tree of one expert and add its sends to ``sends_per_rank``.

    receivers: (rank, physical slot id) of every redundant slot that needs the expert's weights, in
      ascending slot id order; none on ``master_rank``.
    sends_per_rank: copies each rank sends under the schedule so far, indexed by rank, with this
      expert still counted as ``len(receivers)`` direct copies from its master. Relays are the
      receivers whose ranks send the least (ties: lower slot id first); each remaining receiver joins
      the relay that sends the least at that point (ties: earlier relay). Updated in place: the
      master's count drops by the copies it hands to relays and each relay's count rises by its
      children.
    num_relays: relays to use; ``None`` means :func:`choose_num_relays`.

    The result depends only on the arguments, so every rank that plans the same experts in the same
    order with the same counts builds the same tree.
    """
    num_receivers = len(receivers)
    if num_receivers == 0:
        raise ValueError(f"expert {expert_id} has no receivers; build relay trees only for experts that need copies")
    if any(rank == master_rank for rank, _ in receivers):
        raise ValueError(
            f"expert {expert_id} lists a receiver on its master rank {master_rank}; a rank may contain only one "
            "instance of an expert, so the plan is invalid"
        )
    k = choose_num_relays(num_receivers) if num_relays is None else num_relays
    if not 1 <= k <= num_receivers:
        raise ValueError(f"num_relays must be in [1, {num_receivers}] for expert {expert_id}, got {k}")

    # Step 1: relays are the receivers on the ranks that send the least so far.
    by_load = sorted(range(num_receivers), key=lambda idx: (sends_per_rank[receivers[idx][0]], receivers[idx][1]))
    relay_idx = sorted(by_load[:k], key=lambda idx: receivers[idx][1])
    relays = tuple(receivers[idx] for idx in relay_idx)

    # Step 2: every other receiver, in slot id order, joins the relay that currently sends the least.
    chosen = set(relay_idx)
    children: list[list[tuple[int, int]]] = [[] for _ in relays]
    sends_per_rank[master_rank] -= num_receivers - k
    for idx in range(num_receivers):
        if idx in chosen:
            continue
        pick = min(range(k), key=lambda r: (sends_per_rank[relays[r][0]], r))
        children[pick].append(receivers[idx])
        sends_per_rank[relays[pick][0]] += 1
    return RelayTree(expert_id, master_rank, relays, tuple(tuple(group) for group in children))


def plan_relay_trees(
    layout: ExpertLayout, receivers: Mapping[int, Sequence[tuple[int, int]]], mode: str
) -> dict[int, RelayTree]:
    """Choose which experts go through relay trees and build their trees.

    receivers: per logical expert, (rank, physical slot id) of every redundant slot it reaches, in
      ascending slot id order.
    mode: ``"direct"`` (no trees), ``"relay"`` (a tree for every expert whose tree uses fewer relays
      than receivers) or ``"auto"`` (as ``"relay"``, but only while the expert's master rank sends
      more copies than the busiest receiver takes in, the bound no schedule can beat).
    Experts with the most receivers are planned first (ties: lower expert id), each starting from the
    direct schedule's per-rank counts as updated by the trees before it. Weight sync sends along
    these trees and grad reduce sums back along them, so both build them with this function.
    """
    trees: dict[int, RelayTree] = {}
    if mode == "direct":
        return trees
    sends_per_rank = [0] * layout.num_ranks
    receives_per_rank = [0] * layout.num_ranks
    for expert, slots in receivers.items():
        sends_per_rank[layout.master_rank(expert)] += len(slots)
        for rank, _ in slots:
            receives_per_rank[rank] += 1
    receive_bound = max(receives_per_rank, default=0)
    for expert in sorted(receivers, key=lambda e: (-len(receivers[e]), e)):
        slots = receivers[expert]
        if len(slots) < 2:
            continue
        master = layout.master_rank(expert)
        if mode == "auto" and sends_per_rank[master] <= receive_bound:
            continue
        tree = plan_relay_tree(expert, master, slots, sends_per_rank)
        if len(tree.relays) < len(slots):
            trees[expert] = tree
    return trees
