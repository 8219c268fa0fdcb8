import pytest
import torch

from ultraep.layout import (
    ExpertLayout,
    as_load_matrix,
    check_load_matrix,
    check_logical_to_physical,
    fold_slot_counts,
)


def test_sizes_and_id_conversions():
    layout = ExpertLayout(num_ranks=3, experts_per_rank=2, redundant_slots_per_rank=1)
    assert layout.num_experts == 6
    assert layout.slots_per_rank == 3
    assert layout.num_slots == 9
    assert layout.max_instances == 3
    experts = torch.arange(6)
    assert layout.master_rank(experts).tolist() == [0, 0, 1, 1, 2, 2]
    assert layout.master_slot_id(experts).tolist() == [0, 1, 3, 4, 6, 7]
    slots = torch.arange(9)
    assert layout.slot_rank(slots).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert layout.is_redundant_slot(slots).tolist() == [False, False, True] * 3
    assert layout.redundant_slot_id(2, 0) == 8
    assert layout.master_physical_to_logical().tolist() == [0, 1, -1, 2, 3, -1, 4, 5, -1]


def test_max_instances_bounded_by_slots():
    assert ExpertLayout(8, 4, 0).max_instances == 1
    assert ExpertLayout(8, 4, 1).max_instances == 8
    assert ExpertLayout(1, 4, 2).max_instances == 1


def test_experts_not_divisible_by_ranks_names_both_values():
    with pytest.raises(ValueError, match=r"num_experts=8 is not divisible by num_ranks=3.*num_ranks=2 or 4"):
        ExpertLayout.from_num_experts(8, 3, 1)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        pytest.param({"num_ranks": 0, "experts_per_rank": 2}, ValueError, "num_ranks must be >= 1, got 0", id="zero_ranks"),
        pytest.param({"num_ranks": 2, "experts_per_rank": 0}, ValueError, "experts_per_rank must be >= 1", id="zero_experts"),
        pytest.param(
            {"num_ranks": 2, "experts_per_rank": 2, "redundant_slots_per_rank": -1},
            ValueError,
            "redundant_slots_per_rank must be >= 0, got -1",
            id="negative_slots",
        ),
        pytest.param({"num_ranks": 2.0, "experts_per_rank": 2}, TypeError, "num_ranks must be an int", id="float_ranks"),
    ],
)
def test_layout_rejects_bad_settings(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ExpertLayout(**kwargs)


def test_check_load_matrix_errors():
    layout = ExpertLayout(2, 2, 1)
    with pytest.raises(TypeError, match="integer tensor.*float32"):
        check_load_matrix(torch.zeros(2, 4), layout)
    with pytest.raises(ValueError, match=r"shape \[num_ranks, num_experts\] = \[2, 4\].*got \[4\]"):
        check_load_matrix(torch.zeros(4, dtype=torch.int64), layout)
    with pytest.raises(ValueError, match=r"loads\[1, 2\] = -3 is negative"):
        check_load_matrix(torch.tensor([[1, 1, 1, 1], [1, 1, -3, 1]]), layout)
    with pytest.raises(ValueError, match="exceeds"):
        check_load_matrix(torch.full((2, 4), 2**34), layout)
    check_load_matrix(torch.zeros(2, 4, dtype=torch.int32), layout)
    meta = torch.zeros(2, 4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="loads is on the meta device, which has no values"):
        check_load_matrix(meta, layout)
    check_load_matrix(meta, layout, check_values=False)  # shape and dtype only


def test_fold_slot_counts_to_logical_loads():
    physical_to_logical = torch.tensor([0, 1, 2, 2, 3, 0])
    slot_counts = torch.tensor([5, 3, 4, 2, 2, 3])
    assert fold_slot_counts(slot_counts, physical_to_logical, 4).tolist() == [8, 3, 6, 2]
    per_rank = slot_counts.view(2, 3).sum(dim=1)
    assert per_rank.tolist() == [12, 7]


def test_slot_vector_passed_as_logical_loads_names_lengths():
    layout = ExpertLayout(2, 2, 1)
    with pytest.raises(ValueError, match="load vector has 6 entries but the layout has 4 logical experts"):
        as_load_matrix(torch.tensor([5, 3, 4, 2, 2, 3]), layout)
    with pytest.raises(ValueError, match=r"slot_counts has shape \[4\] but physical_to_logical has shape \[6\]"):
        fold_slot_counts(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 2, 3, 0]), 4)


def test_fold_rejects_count_in_empty_slot():
    with pytest.raises(ValueError, match="empty physical slot 2 has count 4"):
        fold_slot_counts(torch.tensor([1, 1, 4, 1, 1, 0]), torch.tensor([0, 1, -1, 2, 3, -1]), 4)


def test_as_load_matrix_puts_vector_on_source_rank():
    layout = ExpertLayout(2, 2, 0)
    matrix = as_load_matrix(torch.tensor([1, 2, 3, 4]), layout)
    assert matrix.tolist() == [[1, 2, 3, 4], [0, 0, 0, 0]]


def test_logical_to_physical_padding_before_real_entry_rejected():
    physical_to_logical = torch.tensor([0, 1, 2, 2, 3, 0])
    good = torch.tensor([[0, 5], [1, -1], [2, 3], [4, -1]])
    check_logical_to_physical(good, physical_to_logical)
    bad = torch.tensor([[0, 5], [1, -1], [2, 3], [-1, 4]])
    with pytest.raises(ValueError, match="row of expert 3 is \\[-1, 4\\]: -1 padding stands before slot 4"):
        check_logical_to_physical(bad, physical_to_logical)
    wrong = torch.tensor([[0, 5], [1, -1], [2, 3], [5, -1]])
    with pytest.raises(ValueError, match="slot 5 holds expert 3 but physical_to_logical\\[5\\] = 0"):
        check_logical_to_physical(wrong, physical_to_logical)
    missing = torch.tensor([[0, -1], [1, -1], [2, 3], [4, -1]])
    with pytest.raises(ValueError, match="slot 5 holds expert 0 but is missing"):
        check_logical_to_physical(missing, physical_to_logical)


def test_numpy_integers_become_ints():
    import numpy as np

    layout = ExpertLayout(np.int64(4), np.int32(2), np.int64(1))
    assert layout == ExpertLayout(4, 2, 1)
    assert repr(layout) == repr(ExpertLayout(4, 2, 1))
    assert ExpertLayout.from_num_experts(np.int64(8), np.int64(4)) == ExpertLayout(4, 2, 0)
    with pytest.raises(TypeError, match="ExpertLayout.num_ranks must be an int, got float 4.0"):
        ExpertLayout(4.0, 2)


@pytest.mark.parametrize(
    "slot_counts, physical_to_logical, num_experts, error, pattern",
    [
        pytest.param(torch.tensor([1.5, 1, 0, 1, 1, 0]), torch.tensor([0, 1, -1, 2, 3, -1]), 4, TypeError, "slot_counts must be an integer tensor", id="float_counts"),
        pytest.param(torch.tensor([1, 1, 0, 1, 1, 0]), torch.tensor([0, 1, -1, 2, 3, 7]), 4, ValueError, r"physical_to_logical\[5\] = 7 is outside \[-1, 3\]", id="bad_map"),
        pytest.param(torch.tensor([1, -1, 0, 1, 1, 0]), torch.tensor([0, 1, -1, 2, 3, -1]), 4, ValueError, r"slot_counts\[1\] = -1 is negative", id="negative"),
        pytest.param(torch.tensor([1, 1, 0, 1, 1, 0]), torch.tensor([0, 1, -1, 2, 3, -1]), 0, ValueError, "num_experts must be a positive int, got 0", id="no_experts"),
    ],
)
def test_fold_rejects_bad_inputs(slot_counts, physical_to_logical, num_experts, error, pattern):
    with pytest.raises(error, match=pattern):
        fold_slot_counts(slot_counts, physical_to_logical, num_experts)


@pytest.mark.parametrize("src_rank", [2, -1, 1.0, True])
def test_as_load_matrix_rejects_bad_source_rank(src_rank):
    with pytest.raises(ValueError, match=r"must be an int in \[0, 1\]"):
        as_load_matrix(torch.tensor([1, 2, 3, 4]), ExpertLayout(2, 2, 0), src_rank=src_rank)
