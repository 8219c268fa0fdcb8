"""Placement of a rank's replicas in the redundant slots that already contain their weights."""

from __future__ import annotations

import pytest
import torch

from ultraep.layout import ExpertLayout
from ultraep.runtime.slot_cache import cached_slot_order
from ultraep.sim.replay import _place_in_cached_slots


def test_cached_slot_order_reuses_and_evicts_oldest():
    # Slot 1 contains "b", which is requested again. "c" is new, so it goes to the least recently
    # used free slot (slot 2).
    order, copied = cached_slot_order(["c", "b", None], contents=["a", "b", "d"], last_use=[5, 3, 1])
    assert order == [2, 1, 0]
    assert copied == [False, False, True]


def test_cached_slot_order_fills_rest_in_order():
    order, copied = cached_slot_order([None, None, "x"], contents=[None, None, None], last_use=[-1, -1, -1])
    assert order == [2, 0, 1]  # "x" takes slot 0 (ties go to the lower slot)
    assert copied == [True, False, False]


def test_cached_slot_order_duplicate_contents():
    order, copied = cached_slot_order(["a", "a"], contents=["a", "a"], last_use=[0, 0])
    assert order == [0, 1]
    assert copied == [False, False]


def test_cached_slot_order_rejects_lengths():
    with pytest.raises(ValueError, match="requested, contents and last_use must have one entry per redundant slot, got lengths 2, 1 and 2"):
        cached_slot_order(["a", None], contents=["a"], last_use=[0, 0])


def test_simulator_slot_cache_copies():
    # 3 ranks, 1 master and 2 redundant slots each (9 physical slots). Rank 2 replicates expert 0, then
    # expert 1, then expert 0 again, each time planned into its first redundant slot.
    layout = ExpertLayout(num_ranks=3, experts_per_rank=1, redundant_slots_per_rank=2)
    replicas = torch.tensor(
        [
            [[-1, -1], [-1, -1], [0, -1]],
            [[-1, -1], [-1, -1], [1, -1]],
            [[-1, -1], [-1, -1], [0, -1]],
        ]
    ).unsqueeze(1)  # [microbatch, layer, rank, slot]
    quota = torch.tensor(
        [
            [6, 0, 0, 4, 0, 0, 4, 2, 0],
            [4, 0, 0, 6, 0, 0, 4, 2, 0],
            [6, 0, 0, 4, 0, 0, 4, 2, 0],
        ]
    ).unsqueeze(1)  # [microbatch, layer, slot]
    new_quota, new_replicas, synced = _place_in_cached_slots(quota, replicas, layout)
    # Expert 1 goes to the unused slot, so expert 0 is still in slot 0 when it comes back.
    assert new_replicas[:, 0, 2].tolist() == [[0, -1], [-1, 1], [0, -1]]
    assert new_quota[:, 0, 6:].tolist() == [[4, 2, 0], [4, 0, 2], [4, 2, 0]]
    assert synced[:, 0, 2].tolist() == [[True, False], [False, True], [False, False]]
    assert not synced[:, 0, :2].any()
