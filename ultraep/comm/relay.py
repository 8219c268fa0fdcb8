"""Relay trees for weight sync and grad reduce: spread one master's fan-out over the receivers.

When logical expert ``e`` has ``n`` replicas to fill, a direct copy makes its master's rank send
``n`` full copies while every receiver takes one. In a relay tree every sender, the master included,
feeds at most ``f`` receivers (the fan-out), and every receiver that has children forwards what it
received, chunk by chunk. With ``m`` chunks per copy, a receiver at level ``L`` (1 = fed by the
master) gets chunk ``c`` in step ``c + L - 1``, so a tree of depth ``D`` takes ``m + D - 1`` steps.
Each step's busiest sender moves ``f`` chunks, so the tree's link time is ``f * (m + D - 1)`` chunk
times (:func:`relay_send_chunks`). :func:`choose_fan_out` picks the ``f`` that makes this smallest:
with 8 chunks, a chain (``f = 1``) for up to 12 receivers and a binary tree from 13 to at least 2,000.

Everything here is pure Python on integers, so every rank derives the same trees from the same plan
without communicating.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, MutableSequence, Sequence

from ultraep.layout import ExpertLayout

__all__ = [
    "RelayTree",
    "choose_fan_out",
    "copy_edges",
    "plan_relay_tree",
    "plan_relay_trees",
    "relay_send_chunks",
    "tree_depth",
]


@dataclasses.dataclass(frozen=True)
class RelayTree:
    """Copy tree of one logical expert in which every sender feeds at most ``fan_out`` receivers.

    Receivers are numbered breadth first. The master sends to receivers ``0 .. fan_out - 1``, and
    receiver ``i`` forwards to receivers ``(i + 1) * fan_out .. (i + 2) * fan_out - 1`` (those that
    exist). Example: expert 0 mastered on rank 0, receivers on ranks 1 to 5 (slot id ``10 * rank`` for
    readability) and ``fan_out = 2``::

        receivers = ((1, 10), (2, 20), (3, 30), (4, 40), (5, 50))
        parents() == (-1, -1, 0, 0, 1)      # rank 0 -> 10, 20; 10 -> 30, 40; 20 -> 50
        levels()  == (1, 1, 2, 2, 2), depth == 2

    Grad reduce walks the same edges backwards.
    """

    expert_id: int
    """Logical expert the tree copies."""
    master_rank: int
    """Rank holding the expert's master slot; the root of the tree."""
    fan_out: int
    """Most receivers one sender feeds."""
    receivers: tuple[tuple[int, int], ...]
    """(rank, physical slot id) of every redundant slot the tree fills, in breadth-first order."""

    def parents(self) -> tuple[int, ...]:
        """Return per receiver the index of the receiver it gets its copy from; -1 = the master."""
        return tuple(idx // self.fan_out - 1 for idx in range(len(self.receivers)))

    def levels(self) -> tuple[int, ...]:
        """Return per receiver its level: 1 when the master feeds it, one more than its parent's otherwise."""
        levels: list[int] = []
        for parent in self.parents():
            levels.append(1 if parent < 0 else levels[parent] + 1)
        return tuple(levels)

    @property
    def depth(self) -> int:
        """Deepest level; 1 when the master feeds every receiver."""
        return tree_depth(len(self.receivers), self.fan_out)


def tree_depth(num_receivers: int, fan_out: int) -> int:
    """Return the levels of a breadth-first tree of ``num_receivers`` with ``fan_out`` (0 for none)."""
    if isinstance(num_receivers, bool) or not isinstance(num_receivers, int) or num_receivers < 0:
        raise ValueError(f"num_receivers must be an int >= 0, got {num_receivers!r}")
    if isinstance(fan_out, bool) or not isinstance(fan_out, int) or fan_out < 1:
        raise ValueError(f"fan_out must be a positive int, got {fan_out!r}")
    depth, capacity, width = 0, 0, 1
    while capacity < num_receivers:
        width *= fan_out
        capacity += width
        depth += 1
    return depth


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def choose_fan_out(num_receivers: int, num_chunks: int) -> int:
    """Return the fan-out that copies one expert to ``num_receivers`` slots the fastest.

    A tree of fan-out ``f`` and depth ``D`` takes ``m + D - 1`` steps of ``m = num_chunks`` chunks
    each, and its busiest sender moves ``f`` chunks per step, so it takes ``f * (m + D - 1)`` chunk
    times. The chosen ``f`` minimises that; ties go to the larger ``f``, whose tree has fewer levels.
    ``f = num_receivers`` is a direct copy. Examples with 8 chunks: 1 -> 1, 2 -> 1 (a chain of 2),
    12 -> 1, 13 -> 2; with 4 chunks: 8 -> 1, 9 -> 2; with 1 chunk (nothing to pipeline): 2 -> 2 and
    4 -> 4 (direct), 5 -> 2.

    NOTE: the fixed cost of a step is left out, and its size on GPUs is not measured. Where a step's
    latency outweighs a chunk's transfer, as for small experts, a shallower tree or a direct copy is faster.
    """
    _check_positive("num_receivers", num_receivers)
    _check_positive("num_chunks", num_chunks)
    return _best_fan_out(num_receivers, num_chunks)


@functools.lru_cache(maxsize=4096)
def _best_fan_out(num_receivers: int, num_chunks: int) -> int:
    best_fan_out, best_time = 1, num_chunks + num_receivers - 1
    # Every tree takes at least f * num_chunks, so once that exceeds the best time no larger f ties it.
    for fan_out in range(2, num_receivers + 1):
        if fan_out * num_chunks > best_time:
            break
        time = fan_out * (num_chunks + tree_depth(num_receivers, fan_out) - 1)
        if time <= best_time:
            best_fan_out, best_time = fan_out, time
    return best_fan_out


def relay_send_chunks(num_receivers: int, num_chunks: int) -> int:
    """Return the link time, in chunk times, of copying one expert to ``num_receivers`` slots.

    ``f * (m + D - 1)`` for the tree of :func:`choose_fan_out` (``m = num_chunks``); ``num_chunks``
    for one receiver and 0 for none. Never more than ``num_receivers * num_chunks``, the direct copy,
    and non-decreasing in ``num_receivers``. The quota planner's copy cost and the simulator's sync
    time use it.
    """
    _check_positive("num_chunks", num_chunks)
    if isinstance(num_receivers, bool) or not isinstance(num_receivers, int) or num_receivers < 0:
        raise ValueError(f"num_receivers must be an int >= 0, got {num_receivers!r}")
    if num_receivers == 0:
        return 0
    fan_out = choose_fan_out(num_receivers, num_chunks)
    return fan_out * (num_chunks + tree_depth(num_receivers, fan_out) - 1)


def plan_relay_tree(
    expert_id: int,
    master_rank: int,
    receivers: Sequence[tuple[int, int]],
    sends_per_rank: MutableSequence[int],
    *,
    num_chunks: int,
    fan_out: int | None = None,
) -> RelayTree:
    """Build the relay tree of one expert and add its sends to ``sends_per_rank``.

    receivers: (rank, physical slot id) of every redundant slot that needs the expert's weights, in
      ascending slot id order; none on ``master_rank``.
    sends_per_rank: copies each rank sends under the schedule so far, indexed by rank, with this
      expert still counted as ``len(receivers)`` direct copies from its master. The receivers go into
      the tree in ascending order of their rank's sends (ties: lower slot id first), so the ranks
      that send the least forward. Updated in place: the master's count drops to its ``fan_out`` (or
      fewer) copies and each forwarding receiver's count rises by its children.
    num_chunks: chunks per copy, which sets the best fan-out.
    fan_out: the tree's fan-out; ``None`` means :func:`choose_fan_out`.

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
    f = choose_fan_out(num_receivers, num_chunks) if fan_out is None else fan_out
    if isinstance(f, bool) or not isinstance(f, int) or not 1 <= f <= num_receivers:
        raise ValueError(f"fan_out must be an int in [1, {num_receivers}] for expert {expert_id}, got {f!r}")

    ordered = tuple(sorted(receivers, key=lambda slot: (sends_per_rank[slot[0]], slot[1])))
    tree = RelayTree(expert_id, master_rank, f, ordered)
    sends_per_rank[master_rank] -= num_receivers - min(f, num_receivers)
    for parent in tree.parents():
        if parent >= 0:
            sends_per_rank[ordered[parent][0]] += 1
    return tree


def plan_relay_trees(
    layout: ExpertLayout, receivers: Mapping[int, Sequence[tuple[int, int]]], mode: str, num_chunks: int
) -> dict[int, RelayTree]:
    """Choose which experts go through relay trees and build their trees.

    receivers: per logical expert, (rank, physical slot id) of every redundant slot it reaches, in
      ascending slot id order.
    mode: ``"direct"`` (no trees), ``"relay"`` (a tree for every expert whose best fan-out is below its
      receivers) or ``"auto"``. ``"auto"`` builds a tree only while the expert's master rank sends more
      copies than the busiest receiver takes in, the bound no schedule can beat.
    num_chunks: chunks per copy (:func:`choose_fan_out`).
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
        if len(slots) < 2 or choose_fan_out(len(slots), num_chunks) == len(slots):
            continue
        master = layout.master_rank(expert)
        if mode == "auto" and sends_per_rank[master] <= receive_bound:
            continue
        trees[expert] = plan_relay_tree(expert, master, slots, sends_per_rank, num_chunks=num_chunks)
    return trees


def copy_edges(
    layout: ExpertLayout, expert_id: int, receivers: Sequence[tuple[int, int]], tree: RelayTree | None
) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """Return the copy edges of one expert as (level, (source rank, slot id), (destination rank, slot id)).

    Without a tree every receiver gets its copy from the master slot at level 1. With one, the edges
    follow ``tree``, whose receivers must be ``receivers``. Weight sync sends along the edges and grad
    reduce sends back along them.
    """
    master = (layout.master_rank(expert_id), layout.master_slot_id(expert_id))
    if tree is None:
        return [(1, master, slot) for slot in receivers]
    nodes = tree.receivers
    return [
        (level, master if parent < 0 else nodes[parent], slot)
        for slot, parent, level in zip(nodes, tree.parents(), tree.levels(), strict=True)
    ]
