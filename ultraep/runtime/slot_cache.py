"""Place a rank's planned replicas in the redundant slots that already contain their weights.

The planner decides which logical expert each rank replicates, and fills a rank's redundant slots in
order. Which of the rank's slots a replica lands in does not change any rank load, so the runtime
may permute them. With per-layer buffers a slot keeps its weights until a copy overwrites it, so a
rank's slots act as a small cache of the experts it replicated recently. Putting each replica in the
slot that already contains its expert's current weights, and a new replica in the least recently used
free slot, skips copies that slot order alone would repeat. Every rank runs this on the same tables
and gets the same placement.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["cached_slot_order"]


def cached_slot_order(
    requested: Sequence[Hashable | None], contents: Sequence[Hashable | None], last_use: Sequence[int]
) -> tuple[list[int], list[bool]]:
    """Choose a slot for each of one rank's planned redundant-slot entries.

    requested: per planned entry ``j`` (in the plan's slot order), the key of the weights it needs (for
      example ``(layer_id, expert_id, version)``), or ``None`` for an entry that needs none (an empty
      slot or a replica with quota 0).
    contents: per slot ``k``, the key of the weights it contains now, or ``None``.
    last_use: per slot ``k``, when it last served a replica (larger is later; -1 = never).
    All three have length ``redundant_slots_per_rank``.

    Returns ``(order, copied)``: ``order[k]`` is the planned entry placed in slot ``k`` (a permutation
    of ``range(len(requested))``), and ``copied[k]`` is True when slot ``k`` must receive a copy. Entries
    whose key a slot contains go to that slot. The other entries that need weights go to the free slots
    used least recently (ties to the lower slot), and entries that need none fill the remaining slots
    in order.
    """
    if not len(requested) == len(contents) == len(last_use):
        raise ValueError(
            f"requested, contents and last_use must have one entry per redundant slot, got lengths "
            f"{len(requested)}, {len(contents)} and {len(last_use)}"
        )
    width = len(requested)
    order: list[int | None] = [None] * width
    copied = [False] * width
    placed = [False] * width
    # Step 1: entries whose weights a slot already contains.
    for j, key in enumerate(requested):
        if key is None:
            continue
        for k in range(width):
            if order[k] is None and contents[k] == key:
                order[k], placed[j] = j, True
                break
    # Step 2: the other entries that need weights, into the least recently used free slots.
    for j, key in enumerate(requested):
        if key is None or placed[j]:
            continue
        k = min((k for k in range(width) if order[k] is None), key=lambda k: (last_use[k], k))
        order[k], placed[j], copied[k] = j, True, True
    # Step 3: entries that need no weights fill the rest in order.
    free = [k for k in range(width) if order[k] is None]
    for k, j in zip(free, [j for j in range(width) if not placed[j]], strict=True):
        order[k] = j
    return [int(j) for j in order], copied
