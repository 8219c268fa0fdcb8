"""Pure planning of weight sync, relay trees and grad reduce (no communication)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultraep.comm import (
    GradReduceTransfer,
    SyncTransfer,
    WeightSpec,
    check_replica_placement,
    chunk_bounds,
    execute_weight_sync,
    choose_fan_out,
    copy_edges,
    plan_grad_reduce,
    plan_relay_tree,
    relay_send_chunks,
    tree_depth,
    plan_weight_sync,
    reduce_replica_grads,
)
from ultraep.layout import ExpertLayout

# ----------------------------------------------------------------------------------------------
# WeightSpec


def test_weight_spec_offsets_and_views():
    spec = WeightSpec(((4, 8), (4, 8), (8, 4)))
    assert spec.numels == (32, 32, 32)
    assert spec.offsets == (0, 32, 64)
    assert spec.numel == 96
    buffer = torch.arange(2 * 96, dtype=torch.float32).view(2, 96)
    gate, up, down = spec.row_views(buffer)
    assert gate.shape == (2, 4, 8)
    assert down.shape == (2, 8, 4)
    assert up[1, 0, 0].item() == 96 + 32
    down[0, 0, 0] = -1.0
    assert buffer[0, 64].item() == -1.0, "views must share memory with the buffer"


def test_chunk_segments_split_first_dim_rows():
    spec = WeightSpec(((4, 3), (4, 3), (4, 3)))  # numel 12 each, row length 3
    assert spec.chunk_segments(0, 1) == [(0, 0, 12), (1, 0, 12), (2, 0, 12)]
    assert spec.chunk_segments(0, 2) == [(0, 0, 6), (1, 0, 6), (2, 0, 6)]
    assert spec.chunk_segments(1, 2) == [(0, 6, 12), (1, 6, 12), (2, 6, 12)]
    # 4 rows in 3 chunks: 1, 1 and 2 rows (chunk_bounds).
    assert [spec.chunk_segments(c, 3)[0] for c in range(3)] == [(0, 0, 3), (0, 3, 6), (0, 6, 12)]
    assert chunk_bounds(4, 2, 3) == (2, 4)


def test_chunk_segments_cover_every_element_once():
    spec = WeightSpec(((3,), (2, 2), (5, 1, 2)))
    for num_chunks in range(1, 8):
        covered = [torch.zeros(numel, dtype=torch.int64) for numel in spec.numels]
        for chunk in range(num_chunks):
            for weight_idx, begin, end in spec.chunk_segments(chunk, num_chunks):
                assert begin < end
                covered[weight_idx][begin:end] += 1
        assert all(bool((c == 1).all()) for c in covered), f"num_chunks={num_chunks}"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param((0, 0), "num_chunks must be a positive int, got 0", id="zero_chunks"),
        pytest.param((2, 2), r"chunk_idx must be an int in \[0, 1\], got 2", id="chunk_past_end"),
        pytest.param((-1, 2), r"chunk_idx must be an int in \[0, 1\], got -1", id="negative_chunk"),
    ],
)
def test_chunk_segments_reject_bad_chunks(args, match):
    with pytest.raises(ValueError, match=match):
        WeightSpec(((2, 2),)).chunk_segments(*args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param((10, 0, 0), "num_chunks must be a positive int, got 0", id="zero_chunks"),
        pytest.param((10, 3, 3), r"chunk_idx must be an int in \[0, 2\], got 3", id="chunk_past_end"),
        pytest.param((10, -1, 3), r"chunk_idx must be an int in \[0, 2\], got -1", id="negative_chunk"),
        pytest.param((-1, 0, 3), "length must be an int >= 0, got -1", id="negative_length"),
    ],
)
def test_chunk_bounds_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        chunk_bounds(*args)


def test_weight_spec_docstring_example_chunks_intermediate_rows():
    spec = WeightSpec(((8, 4), (8, 4), (8, 4)))  # gate, up, down of hidden 4, ffn 8
    assert spec.chunk_segments(1, 2) == [(0, 16, 32), (1, 16, 32), (2, 16, 32)]
    assert chunk_bounds(10, 2, 3) == (6, 10)
    assert chunk_bounds(0, 1, 2) == (0, 0)


@pytest.mark.parametrize(
    ("shapes", "error", "match"),
    [
        pytest.param((), ValueError, "non-empty sequence", id="empty"),
        pytest.param(((2, 0),), ValueError, r"shapes\[0\] must hold positive ints", id="zero_dim"),
        pytest.param((3,), TypeError, r"shapes\[0\] must be a sequence of ints", id="bare_int"),
        pytest.param(((4, 3), ()), ValueError, r"shapes\[1\] is empty \(a 0-d tensor\)", id="zero_dims"),
    ],
)
def test_weight_spec_rejects_bad_shapes(shapes, error, match):
    with pytest.raises(error, match=match):
        WeightSpec(shapes)


def test_weight_spec_rejects_bad_buffer_and_masters():
    spec = WeightSpec(((2, 3), (3,)))
    with pytest.raises(ValueError, match=r"buffer must have shape \[num_rows, 9\]"):
        spec.row_views(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="master_weights has 1 tensors but the weight spec has 2"):
        spec.check_master_weights([torch.zeros(2, 2, 3)], experts_per_rank=2)
    with pytest.raises(ValueError, match=r"master_weights\[1\] must have shape .* \[2, 3\], got \[2, 4\]"):
        spec.check_master_weights([torch.zeros(2, 2, 3), torch.zeros(2, 4)], experts_per_rank=2)
    with pytest.raises(TypeError, match="share one dtype and device"):
        spec.check_master_weights([torch.zeros(2, 2, 3), torch.zeros(2, 3, dtype=torch.float64)], experts_per_rank=2)
    with pytest.raises(TypeError, match="must be a sequence of tensors"):
        spec.check_master_weights(torch.zeros(2, 2, 3), experts_per_rank=2)


# ----------------------------------------------------------------------------------------------
# Relay trees


@pytest.mark.parametrize(
    ("num_receivers", "num_chunks", "expected"),
    [(1, 8, 1), (2, 8, 1), (12, 8, 1), (13, 8, 2), (100, 8, 2), (8, 4, 1), (9, 4, 2), (2, 1, 2), (4, 1, 4), (5, 1, 2)],
    ids=lambda value: str(value),
)
def test_choose_fan_out_minimises_link_time(num_receivers, num_chunks, expected):
    assert choose_fan_out(num_receivers, num_chunks) == expected
    # Brute force over every fan-out: f * (chunks + depth - 1) chunk times, ties to the larger f.
    times = {f: f * (num_chunks + tree_depth(num_receivers, f) - 1) for f in range(1, num_receivers + 1)}
    best = min(times.values())
    assert expected == max(f for f, time in times.items() if time == best)
    assert relay_send_chunks(num_receivers, num_chunks) == best


def test_relay_send_chunks_never_decreases():
    for num_chunks in (1, 2, 4, 8, 16):
        times = [relay_send_chunks(n, num_chunks) for n in range(0, 300)]
        assert times[0] == 0
        assert times[1] == num_chunks
        assert all(a <= b for a, b in zip(times, times[1:], strict=False))
        assert all(time <= n * num_chunks for n, time in enumerate(times))


def test_tree_depth():
    assert [tree_depth(n, 2) for n in (0, 1, 2, 3, 6, 7, 14, 15)] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert tree_depth(5, 1) == 5
    with pytest.raises(ValueError, match="fan_out must be a positive int, got 0"):
        tree_depth(3, 0)


def test_choose_fan_out_rejects_zero():
    with pytest.raises(ValueError, match="num_receivers must be a positive int, got 0"):
        choose_fan_out(0, 4)


def test_relay_tree_hand_example():
    # Expert 0 on rank 0 fans out to ranks 1..5 (slot ids 10 * rank for readability).
    sends = [5, 0, 0, 0, 0, 0]
    tree = plan_relay_tree(0, 0, [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)], sends, num_chunks=4, fan_out=2)
    assert tree.receivers == ((1, 10), (2, 20), (3, 30), (4, 40), (5, 50))
    assert tree.parents() == (-1, -1, 0, 0, 1)
    assert tree.levels() == (1, 1, 2, 2, 2)
    assert tree.depth == 2
    assert sends == [2, 2, 1, 0, 0, 0]
    layout = ExpertLayout(6, 1, 1)  # master slot of expert 0 is slot 0
    assert copy_edges(layout, 0, tree.receivers, tree) == [
        (1, (0, 0), (1, 10)), (1, (0, 0), (2, 20)), (2, (1, 10), (3, 30)), (2, (1, 10), (4, 40)), (2, (2, 20), (5, 50)),
    ]


def test_relay_tree_prefers_idle_ranks():
    # Rank 1 already forwards two copies, so ranks 2 and 3 forward and rank 1 comes last in the chain.
    sends = [4, 2, 0, 0, 0]
    tree = plan_relay_tree(0, 0, [(1, 10), (2, 20), (3, 30), (4, 40)], sends, num_chunks=8)
    assert tree.fan_out == 1
    assert tree.receivers == ((2, 20), (3, 30), (4, 40), (1, 10))
    assert sends == [1, 2, 1, 1, 1]


@pytest.mark.parametrize(
    ("receivers", "fan_out", "match"),
    [
        pytest.param([], None, "has no receivers", id="no_receivers"),
        pytest.param([(0, 3)], None, "receiver on its master rank 0", id="receiver_on_master"),
        pytest.param([(1, 3), (2, 6)], 3, r"fan_out must be an int in \[1, 2\]", id="fan_out_too_large"),
    ],
)
def test_relay_tree_rejects_bad_input(receivers, fan_out, match):
    with pytest.raises(ValueError, match=match):
        plan_relay_tree(0, 0, receivers, [0, 0, 0], num_chunks=4, fan_out=fan_out)


# ----------------------------------------------------------------------------------------------
# Weight sync plans


def test_direct_plan_hand_example():
    layout = ExpertLayout(2, 2, 1)  # slots per rank 3; rank 1's redundant slot is 5
    plan = plan_weight_sync(layout, [[-1], [0]], mode="direct")
    assert plan.transfers == (SyncTransfer(0, 0, 0, 0, 1, 5, 0),)
    assert (plan.num_steps, plan.num_chunks, plan.relay_expert_ids) == (1, 1, ())
    assert plan.copies_sent_per_rank() == [1.0, 0.0]
    assert plan.copies_received_per_rank() == [0.0, 1.0]
    assert plan.num_copies == 1


def test_needs_copy_skips_cached_slots():
    layout = ExpertLayout(2, 2, 2)
    plan = plan_weight_sync(layout, [[2, 3], [0, -1]], needs_copy=[[True, False], [False, False]], mode="direct")
    assert [(t.expert_id, t.dst_slot_id) for t in plan.transfers] == [(2, 2)]
    nothing = plan_weight_sync(layout, [[2, 3], [0, -1]], needs_copy=torch.zeros(2, 2, dtype=torch.bool))
    assert nothing.transfers == ()
    assert nothing.num_steps == 0


def test_relay_plan_chains_copies_of_hot_expert():
    # 8 ranks; expert 0 (rank 0) has a replica on each of the other 7 ranks.
    layout = ExpertLayout(8, 2, 2)
    placement = [[-1, -1]] + [[0, -1]] * 7
    direct = plan_weight_sync(layout, placement, mode="direct")
    relay = plan_weight_sync(layout, placement, mode="relay", num_chunks=4)
    assert direct.copies_sent_per_rank()[0] == 7.0
    # With 4 chunks a chain is fastest: every rank forwards one copy, and the last of 7 gets chunk c
    # in step c + 6.
    assert max(relay.copies_sent_per_rank()) == 1.0
    assert (relay.num_steps, relay.depth) == (10, 7)
    assert relay.relay_expert_ids == (0,)
    # Link time in expert copies: direct 7; the chain's 10 steps each move one quarter per rank.
    assert direct.link_time() == 7.0
    assert relay.link_time() == 2.5
    # With 2 chunks a binary tree of depth 3 is as fast as the chain (4 chunk steps of 2 chunks).
    binary = plan_weight_sync(layout, placement, mode="relay", num_chunks=2)
    assert (binary.num_steps, binary.depth, max(binary.copies_sent_per_rank())) == (4, 3, 2.0)
    assert binary.link_time() == 3.5


def test_auto_relays_only_when_fan_out_exceeds_intake():
    layout = ExpertLayout(4, 2, 2)
    # Expert 0 (rank 0) goes to 3 ranks; expert 3 (rank 1) to 2 ranks; no rank receives more than 2.
    placement = [[3, -1], [0, 6], [0, 3], [0, -1]]
    assert plan_weight_sync(layout, placement, mode="auto").relay_expert_ids == (0,)
    assert plan_weight_sync(layout, placement, mode="relay").relay_expert_ids == (0, 3)
    assert plan_weight_sync(layout, placement, mode="direct").relay_expert_ids == ()
    # One copy per master: nothing to gain, so auto stays direct with one chunk.
    balanced = plan_weight_sync(layout, [[2, -1], [0, -1], [-1, -1], [-1, -1]], mode="auto", num_chunks=4)
    assert balanced.relay_expert_ids == ()
    assert balanced.num_chunks == 1
    assert balanced.num_steps == 1


def test_pipeline_plan_sends_every_copy_in_chunks():
    layout = ExpertLayout(2, 2, 1)
    plan = plan_weight_sync(layout, [[-1], [0]], mode="direct", num_chunks=3, pipeline=True)
    assert plan.transfers == tuple(SyncTransfer(c, 0, 0, 0, 1, 5, c) for c in range(3))
    assert (plan.num_steps, plan.num_chunks) == (3, 3)
    assert [plan.ready_step(c) for c in range(3)] == [0, 1, 2]
    assert plan.elements_moved(10) == 10
    assert plan.link_time() == 1.0
    with pytest.raises(ValueError, match=r"chunk_idx must be in \[0, 2\], got 3"):
        plan.ready_step(3)


def test_relayed_chunks_ready_after_deepest_level():
    layout = ExpertLayout(8, 2, 2)
    placement = [[-1, -1]] + [[0, -1]] * 7
    plan = plan_weight_sync(layout, placement, mode="relay", num_chunks=4, pipeline=True)
    assert plan == plan_weight_sync(layout, placement, mode="relay", num_chunks=4)
    assert [plan.ready_step(c) for c in range(4)] == [6, 7, 8, 9]
    assert plan.num_steps == 10


def _check_schedule(layout: ExpertLayout, placement, needs_copy, plan) -> None:
    """Every slot that needs a copy gets each chunk exactly once, from a rank that already has that chunk."""
    held = {}  # (rank, chunk) -> expert held before the current step, for redundant slots
    received = {}
    for step in range(plan.num_steps):
        arriving = {}
        for t in (t for t in plan.transfers if t.step == step):
            assert t.src_rank != t.dst_rank
            assert layout.slot_rank(t.dst_slot_id) == t.dst_rank
            assert layout.is_redundant_slot(t.dst_slot_id)
            if layout.is_redundant_slot(t.src_slot_id):
                assert held.get((t.src_slot_id, t.chunk_idx)) == t.expert_id, f"relay sends chunk {t.chunk_idx} too early"
            else:
                assert t.src_slot_id == layout.master_slot_id(t.expert_id)
            key = (t.dst_slot_id, t.chunk_idx)
            assert key not in received, f"slot {t.dst_slot_id} receives chunk {t.chunk_idx} twice"
            received[key] = t.expert_id
            arriving[key] = t.expert_id
        held.update(arriving)
    expected = {
        (layout.redundant_slot_id(rank, idx), chunk): expert
        for rank, row in enumerate(placement)
        for idx, expert in enumerate(row)
        if expert >= 0 and needs_copy[rank][idx]
        for chunk in range(plan.num_chunks)
    }
    assert received == expected


@st.composite
def placements(draw):
    num_ranks = draw(st.integers(2, 8))
    experts_per_rank = draw(st.integers(1, 3))
    slots = draw(st.integers(1, 3))
    layout = ExpertLayout(num_ranks, experts_per_rank, slots)
    hot = draw(st.lists(st.integers(0, layout.num_experts - 1), min_size=1, max_size=3))
    placement = []
    for rank in range(num_ranks):
        row, seen = [], set()
        for _ in range(slots):
            expert = draw(st.sampled_from([-1, *hot, draw(st.integers(0, layout.num_experts - 1))]))
            if expert >= 0 and (layout.master_rank(expert) == rank or expert in seen):
                expert = -1
            seen.add(expert)
            row.append(expert)
        placement.append(row)
    needs_copy = [[draw(st.booleans()) or draw(st.booleans()) for _ in range(slots)] for _ in range(num_ranks)]
    return layout, placement, needs_copy


@settings(max_examples=60, deadline=None)
@given(
    case=placements(), mode=st.sampled_from(["direct", "relay", "auto"]), num_chunks=st.integers(1, 5), pipeline=st.booleans()
)
def test_any_plan_delivers_every_chunk_once(case, mode, num_chunks, pipeline):
    layout, placement, needs_copy = case
    plan = plan_weight_sync(layout, placement, needs_copy=needs_copy, mode=mode, num_chunks=num_chunks, pipeline=pipeline)
    _check_schedule(layout, placement, needs_copy, plan)
    if plan.transfers:
        # Chunk c has reached every receiving slot by the end of ready_step(c).
        for chunk in range(plan.num_chunks):
            assert max(t.step for t in plan.transfers if t.chunk_idx == chunk) == plan.ready_step(chunk)
    assert plan == plan_weight_sync(
        layout, placement, needs_copy=needs_copy, mode=mode, num_chunks=num_chunks, pipeline=pipeline
    )
    direct = plan_weight_sync(layout, placement, needs_copy=needs_copy, mode="direct")
    assert max(plan.copies_sent_per_rank(), default=0) <= max(direct.copies_sent_per_rank(), default=0)


@pytest.mark.parametrize(
    ("placement", "kwargs", "error", "match"),
    [
        pytest.param([[-1], [0]], {"mode": "tree"}, ValueError, "mode must be one of", id="bad_mode"),
        pytest.param([[-1], [0]], {"num_chunks": 0}, ValueError, "num_chunks must be a positive int", id="zero_chunks"),
        pytest.param([[-1], [0]], {"pipeline": 1}, TypeError, "pipeline must be a bool, got 1 \\(int\\)", id="pipeline_not_bool"),
        pytest.param([[-1]], {}, ValueError, r"shape \[num_ranks, redundant_slots_per_rank\] = \[2, 1\]", id="short"),
        pytest.param([[-1], [4]], {}, ValueError, r"replica_expert_ids\[1\]\[0\] = 4 is outside \[-1, 3\]", id="bad_id"),
        pytest.param([[0], [-1]], {}, ValueError, "replica on the expert's master rank 0", id="on_master"),
        pytest.param(
            [[-1], [0]], {"needs_copy": torch.ones(2, 1, dtype=torch.int64)}, TypeError, "needs_copy must be a bool tensor",
            id="needs_copy_dtype",
        ),
        pytest.param(
            torch.zeros(2, 1), {}, TypeError, "replica_expert_ids must be an integer tensor", id="float_placement",
        ),
    ],
)
def test_plan_weight_sync_rejects_bad_input(placement, kwargs, error, match):
    with pytest.raises(error, match=match):
        plan_weight_sync(ExpertLayout(2, 2, 1), placement, **kwargs)


def test_placement_rejects_duplicate_replica_on_rank():
    with pytest.raises(ValueError, match="two replicas of expert 0 on rank 1"):
        check_replica_placement(ExpertLayout(2, 2, 2), [[-1, -1], [0, 0]])


# ----------------------------------------------------------------------------------------------
# Grad reduce plans


def test_grad_reduce_slot_order_and_steps():
    layout = ExpertLayout(4, 2, 1)  # slots per rank 3; redundant slots 2, 5, 8, 11
    # Expert 0 (rank 0) on ranks 1, 2, 3; expert 2 (rank 1) on rank 0.
    plan = plan_grad_reduce(layout, [[2], [0], [0], [0]], scratch_rows=2)
    # Fields: step, expert, source rank and slot, destination rank and slot, chunk, scratch row.
    assert plan.transfers == (
        GradReduceTransfer(0, 0, 1, 5, 0, 0, 0, 0),
        GradReduceTransfer(0, 0, 2, 8, 0, 0, 0, 1),
        GradReduceTransfer(0, 2, 0, 2, 1, 3, 0, 0),
        GradReduceTransfer(1, 0, 3, 11, 0, 0, 0, 0),
    )
    assert (plan.num_steps, plan.num_chunks, plan.relay_expert_ids) == (2, 1, ())
    assert plan.scratch_rows == 2


def test_grad_reduce_sums_through_relays():
    layout = ExpertLayout(8, 2, 2)  # redundant slots of rank r: 4r + 2, 4r + 3
    placement = [[-1, -1]] + [[0, -1]] * 7  # 7 replicas of expert 0
    plan = plan_grad_reduce(layout, placement, mode="relay", num_chunks=2, scratch_rows=3)
    weights = plan_weight_sync(layout, placement, mode="relay", num_chunks=2)
    assert plan.relay_expert_ids == weights.relay_expert_ids == (0,)
    # The same tree, walked backwards: every sync edge appears as a reduce edge.
    sync_edges = {(t.src_slot_id, t.dst_slot_id) for t in weights.transfers}
    assert {(t.dst_slot_id, t.src_slot_id) for t in plan.transfers} == sync_edges
    # A binary tree of depth 3 (master -> 6, 10; 6 -> 14, 18; 10 -> 22, 26; 14 -> 30): the master
    # receives from slots 6 and 10 only.
    assert sorted(t.src_slot_id for t in plan.transfers if t.dst_slot_id == 0 and t.chunk_idx == 0) == [6, 10]
    assert plan.num_steps == 4  # slot 30 sends chunk c in step c, 14 in c + 1, 6 and 10 in c + 2
    # With 1 scratch row the second sender into each rank waits one step.
    assert plan_grad_reduce(layout, placement, mode="relay", num_chunks=2, scratch_rows=1).num_steps == 5
    assert plan.elements_moved(10) == 70


def _check_reduce_schedule(layout: ExpertLayout, placement, quota, plan) -> None:
    """Replay the plan on sets of contributing slots: each master gets every gradient exactly once,
    a row leaves only once it contains all of its subtree, and no step overfills a scratch row."""
    contents = {}  # (slot, chunk) -> slots whose gradients that row chunk contains
    for rank, row in enumerate(placement):
        for idx, expert in enumerate(row):
            slot = layout.redundant_slot_id(rank, idx)
            for chunk in range(plan.num_chunks):
                contents[(slot, chunk)] = [slot]
    pending = {}  # (slot, chunk) -> children still to arrive
    for t in plan.transfers:
        pending[(t.dst_slot_id, t.chunk_idx)] = pending.get((t.dst_slot_id, t.chunk_idx), 0) + 1
    sent, masters = set(), {}
    for step in range(plan.num_steps):
        step_transfers = [t for t in plan.transfers if t.step == step]
        rows = {}
        for t in step_transfers:
            assert t.step >= t.chunk_idx
            assert layout.slot_rank(t.src_slot_id) == t.src_rank
            assert layout.slot_rank(t.dst_slot_id) == t.dst_rank
            assert pending.get((t.src_slot_id, t.chunk_idx), 0) == 0, f"slot {t.src_slot_id} sends before its children"
            assert (t.src_slot_id, t.chunk_idx) not in sent
            sent.add((t.src_slot_id, t.chunk_idx))
            key = (t.dst_rank, t.chunk_idx)
            rows.setdefault(key, set())
            assert t.scratch_row not in rows[key]
            assert 0 <= t.scratch_row < plan.scratch_rows
            rows[key].add(t.scratch_row)
        for t in step_transfers:
            payload = contents[(t.src_slot_id, t.chunk_idx)]
            if layout.is_redundant_slot(t.dst_slot_id):
                contents[(t.dst_slot_id, t.chunk_idx)] = contents[(t.dst_slot_id, t.chunk_idx)] + payload
            else:
                assert t.dst_slot_id == layout.master_slot_id(t.expert_id)
                masters.setdefault((t.dst_slot_id, t.chunk_idx), []).extend(payload)
            pending[(t.dst_slot_id, t.chunk_idx)] -= 1
    expected = {}
    for rank, row in enumerate(placement):
        for idx, expert in enumerate(row):
            if expert >= 0 and (quota is None or quota[rank][idx] != 0):
                for chunk in range(plan.num_chunks):
                    expected.setdefault((layout.master_slot_id(expert), chunk), []).append(layout.redundant_slot_id(rank, idx))
    assert {key: sorted(value) for key, value in masters.items()} == expected


@settings(max_examples=60, deadline=None)
@given(
    case=placements(),
    mode=st.sampled_from(["direct", "relay", "auto"]),
    num_chunks=st.integers(1, 4),
    scratch_rows=st.integers(1, 3),
    zero_quota=st.booleans(),
)
def test_reduce_plan_sums_each_gradient_once(case, mode, num_chunks, scratch_rows, zero_quota):
    layout, placement, needs_copy = case
    quota = [[int(flag) for flag in row] for row in needs_copy] if zero_quota else None
    plan = plan_grad_reduce(
        layout, placement, replica_quota=quota, scratch_rows=scratch_rows, mode=mode, num_chunks=num_chunks
    )
    _check_reduce_schedule(layout, placement, quota, plan)
    assert plan == plan_grad_reduce(
        layout, placement, replica_quota=quota, scratch_rows=scratch_rows, mode=mode, num_chunks=num_chunks
    )


def test_grad_reduce_skips_zero_quota_replicas():
    layout = ExpertLayout(2, 2, 2)
    plan = plan_grad_reduce(layout, [[2, 3], [0, -1]], replica_quota=[[5, 0], [0, 0]])
    assert [(t.expert_id, t.src_slot_id) for t in plan.transfers] == [(2, 2)]
    assert plan.scratch_rows == 2
    assert plan_grad_reduce(layout, [[-1, -1], [-1, -1]]).num_steps == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"scratch_rows": 0}, "scratch_rows must be a positive int, got 0", id="scratch_rows"),
        pytest.param({"mode": "tree"}, "mode must be one of", id="mode"),
        pytest.param({"num_chunks": 0}, "num_chunks must be a positive int, got 0", id="num_chunks"),
    ],
)
def test_grad_reduce_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_grad_reduce(ExpertLayout(2, 2, 1), [[-1], [0]], **kwargs)


def test_elements_moved_counts_every_chunk():
    layout = ExpertLayout(8, 2, 2)
    placement = [[-1, -1]] + [[0, -1]] * 7
    # 7 copies of a 10-element row, whether sent whole or as 4 chunks through relays.
    assert plan_weight_sync(layout, placement, mode="direct").elements_moved(10) == 70
    assert plan_weight_sync(layout, placement, mode="relay", num_chunks=4).elements_moved(10) == 70


# ----------------------------------------------------------------------------------------------
# Executors reject bad arguments before communicating, so these run without a process group.


def test_execute_weight_sync_rejects_bad_arguments():
    layout = ExpertLayout(2, 2, 1)
    spec = WeightSpec(((3,),))
    plan = plan_weight_sync(layout, [[-1], [0]])
    masters = [torch.zeros(2, 3)]
    with pytest.raises(ValueError, match=r"rank=2 is outside \[0, 1\]"):
        execute_weight_sync(plan, layout=layout, spec=spec, rank=2, master_weights=masters, replica_buffer=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"replica_buffer must have shape \[1, 3\], got \[2, 3\]"):
        execute_weight_sync(plan, layout=layout, spec=spec, rank=0, master_weights=masters, replica_buffer=torch.zeros(2, 3))


def test_reduce_replica_grads_rejects_bad_arguments():
    layout = ExpertLayout(2, 2, 1)
    spec = WeightSpec(((3,),))
    plan = plan_grad_reduce(layout, [[-1], [0]])
    common = {"layout": layout, "spec": spec, "master_grads": [torch.zeros(2, 3)]}
    with pytest.raises(ValueError, match=r"rank=-1 is outside \[0, 1\]"):
        reduce_replica_grads(plan, rank=-1, replica_grad_buffer=torch.zeros(1, 3), scratch=torch.zeros(1, 3), **common)
    with pytest.raises(ValueError, match=r"replica_grad_buffer must have shape \[1, 3\], got \[1, 4\]"):
        reduce_replica_grads(plan, rank=0, replica_grad_buffer=torch.zeros(1, 4), scratch=torch.zeros(1, 3), **common)
    with pytest.raises(ValueError, match=r"scratch must have shape \[1, 3\] for this plan, got \[2, 3\]"):
        reduce_replica_grads(plan, rank=0, replica_grad_buffer=torch.zeros(1, 3), scratch=torch.zeros(2, 3), **common)
    with pytest.raises(ValueError, match="master_grads is None but the plan sends replica gradients to rank 0"):
        reduce_replica_grads(
            plan, layout=layout, spec=spec, rank=0, replica_grad_buffer=torch.zeros(1, 3), master_grads=None,
            scratch=torch.zeros(1, 3),
        )
