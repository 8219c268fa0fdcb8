"""Tests for ultraep.traces: loaders, the bundled trace, microbatch forming, counting, synthetic loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ultraep.layout import ExpertLayout
from ultraep.planners.base import masters_only_plan
from ultraep.traces import (
    LoadTrace,
    TokenTrace,
    bundled_trace_path,
    count_loads,
    load_bundled_trace,
    load_trace,
    max_ranks_without_reuse,
    microbatch_loads,
    microbatch_topk_ids,
    moving_hot_loads,
    step_loads_to_matrices,
    synthetic_topk_ids,
    zipf_loads,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_TRACES = REPO_ROOT.parent / "shared" / "traces"
ESFT_FILE = SHARED_TRACES / "esft_dsv2lite_token_routing.npz"

needs_shared_traces = pytest.mark.skipif(
    not SHARED_TRACES.is_dir(), reason=f"real routing traces not found at {SHARED_TRACES}"
)


@pytest.fixture(scope="module")
def bundled() -> TokenTrace:
    return load_bundled_trace()


@pytest.fixture(scope="module")
def esft_original() -> TokenTrace:
    if not ESFT_FILE.is_file():
        pytest.skip(f"real routing trace not found at {ESFT_FILE}")
    return load_trace(ESFT_FILE)


def small_trace(topk_ids, num_experts: int, seq_ids=None) -> TokenTrace:
    """Build a TokenTrace from a nested list of ids, [num_tokens, num_layers, topk]."""
    seq_tensor = None if seq_ids is None else torch.tensor(seq_ids)
    return TokenTrace(topk_ids=torch.tensor(topk_ids), num_experts=num_experts, seq_ids=seq_tensor)


# Loaders on the real traces.


@needs_shared_traces
def test_load_esft_token_trace(esft_original):
    trace = esft_original
    assert isinstance(trace, TokenTrace)
    assert tuple(trace.topk_ids.shape) == (33279, 26, 6)
    assert trace.topk_ids.dtype == torch.int64
    assert trace.num_experts == 64
    assert trace.layer_ids == list(range(1, 27))
    assert trace.seq_ids is not None and trace.seq_ids.unique().numel() == 213
    assert trace.dataset_names == ("intent", "law", "summary", "translation")
    assert trace.licence.startswith("MIT")
    assert "deepseek-ai/ESFT" in trace.source
    assert int(trace.topk_ids.min()) == 0
    assert int(trace.topk_ids.max()) == 63


@needs_shared_traces
@pytest.mark.parametrize(
    ("file_name", "shape", "row_sum", "licence_start"),
    [
        pytest.param("harmoeny_qwen15moe_top1_step_loads.npz", (80, 12, 60), 98304, "none", id="qwen_top1"),
        pytest.param("harmoeny_switch128_step_loads.npz", (120, 6, 128), 524288, "none", id="switch128"),
    ],
)
def test_load_step_loads_trace(file_name, shape, row_sum, licence_start):
    trace = load_trace(SHARED_TRACES / file_name)
    assert isinstance(trace, LoadTrace)
    assert trace.kind == "step_loads"
    assert tuple(trace.loads.shape) == shape
    assert trace.top_k == 1
    assert bool((trace.loads.sum(dim=-1) == row_sum).all())
    assert trace.licence.startswith(licence_start)
    assert trace.dataset_names == ("bookcorpus", "random", "wikitext", "wmt19")
    assert trace.dataset_ids is not None and tuple(trace.dataset_ids.shape) == (shape[0],)


@needs_shared_traces
@pytest.mark.parametrize(
    ("file_name", "shape", "top_k"),
    [
        pytest.param("olmoe_repo_olmoe_aggregate_loads.npz", (6, 3, 64), 8, id="olmoe"),
        pytest.param("olmoe_repo_mixtral_aggregate_loads.npz", (5, 3, 8), 2, id="mixtral"),
    ],
)
def test_load_aggregate_trace(file_name, shape, top_k):
    trace = load_trace(SHARED_TRACES / file_name)
    assert isinstance(trace, LoadTrace)
    assert trace.kind == "aggregate"
    assert tuple(trace.loads.shape) == shape
    assert trace.top_k == top_k
    assert trace.layer_ids == [0, 7, 15]
    assert trace.licence.startswith("Apache-2.0")


# The bundled trace.


def test_bundled_trace_size_and_notice():
    path = bundled_trace_path()
    assert path.is_file()
    assert path.stat().st_size <= 5 * 1024 * 1024
    notice = (path.parent / "NOTICE.md").read_text()
    assert "579a7711e4b332b4c57b47e378a0cf240d85caa6" in notice
    assert "MIT" in notice


def test_bundled_trace_shape(bundled):
    assert tuple(bundled.topk_ids.shape) == (33279, 26, 6)
    assert bundled.topk_ids.dtype == torch.int64
    assert bundled.num_experts == 64
    assert bundled.layer_ids == list(range(1, 27))
    assert bundled.licence.startswith("MIT")
    assert bundled.seq_ids is not None and bundled.seq_ids.unique().numel() == 213
    assert bundled.dataset_ids is not None and bundled.dataset_names == ("intent", "law", "summary", "translation")


def test_bundled_trace_equals_original(bundled, esft_original):
    assert torch.equal(bundled.topk_ids, esft_original.topk_ids)
    assert torch.equal(bundled.seq_ids, esft_original.seq_ids)
    assert torch.equal(bundled.dataset_ids, esft_original.dataset_ids)


# Loaders on user files.


def test_load_npy_three_dims(tmp_path):
    ids = np.array([[[0, 1]], [[2, -1]]], dtype=np.int32)  # [2 tokens, 1 layer, top 2]
    np.save(tmp_path / "ids.npy", ids)
    trace = load_trace(tmp_path / "ids.npy", num_experts=3)
    assert isinstance(trace, TokenTrace)
    assert trace.topk_ids.tolist() == [[[0, 1]], [[2, -1]]]
    assert trace.topk_ids.dtype == torch.int64
    assert trace.layer_ids == [0]
    assert trace.seq_ids is None
    assert trace.licence == "unknown"


def test_load_npy_two_dims_adds_layer_axis(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([[0, 1], [1, 2], [3, 0]], dtype=np.uint8))
    trace = load_trace(tmp_path / "ids.npy", num_experts=4)
    assert tuple(trace.topk_ids.shape) == (3, 1, 2)
    assert trace.topk_ids[:, 0].tolist() == [[0, 1], [1, 2], [3, 0]]


def test_load_npz_with_only_topk_ids(tmp_path):
    np.savez(tmp_path / "ids.npz", topk_ids=np.array([[[5, 6]], [[7, -1]]], dtype=np.int64))
    trace = load_trace(tmp_path / "ids.npz", num_experts=8)
    assert isinstance(trace, TokenTrace)
    assert trace.num_experts == 8
    assert trace.source == str(tmp_path / "ids.npz")


def test_load_npz_keeps_stored_metadata(tmp_path):
    np.savez(
        tmp_path / "t.npz",
        kind=np.array("token"),
        model=np.array("toy"),
        source=np.array("here"),
        num_experts=np.array(4),
        top_k=np.array(1),
        layer_ids=np.array([3, 5], dtype=np.int16),
        topk_ids=np.zeros((2, 2, 1), dtype=np.int16),
        seq_id=np.array([0, 1], dtype=np.int32),
        licence=np.array("CC0"),
    )
    trace = load_trace(tmp_path / "t.npz")
    assert (trace.model, trace.source, trace.licence) == ("toy", "here", "CC0")
    assert trace.layer_ids == [3, 5]
    assert trace.seq_ids.tolist() == [0, 1]


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.npz.*does not exist"):
        load_trace(tmp_path / "missing.npz")


def test_load_wrong_suffix(tmp_path):
    (tmp_path / "ids.txt").write_text("0 1\n")
    with pytest.raises(ValueError, match=r"suffix '\.txt'; expected \.npz"):
        load_trace(tmp_path / "ids.txt", num_experts=2)


def test_load_npy_needs_num_experts(tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"pass num_experts="):
        load_trace(tmp_path / "ids.npy")


def test_load_npy_float_ids(tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(TypeError, match=r"must hold integers, got dtype float32"):
        load_trace(tmp_path / "ids.npy", num_experts=2)


def test_load_npy_wrong_rank(tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((2, 2, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[num_tokens, num_layers, topk\] or \[num_tokens, topk\], got \[2, 2, 2, 2\]"):
        load_trace(tmp_path / "ids.npy", num_experts=2)


def test_load_npy_id_out_of_range(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([[0, 1], [1, 4]], dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[1, 0, 1\] = 4 is not a logical expert id: ids must be in 0\.\.3"):
        load_trace(tmp_path / "ids.npy", num_experts=4)


def test_load_npy_id_below_padding(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([[0, -2]], dtype=np.int64))
    with pytest.raises(ValueError, match=r"= -2 is not a logical expert id"):
        load_trace(tmp_path / "ids.npy", num_experts=4)


def test_load_unknown_kind(tmp_path):
    np.savez(tmp_path / "t.npz", kind=np.array("histogram"), loads=np.zeros((1, 1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"unknown trace kind 'histogram'; expected one of"):
        load_trace(tmp_path / "t.npz", num_experts=2)


def test_load_npz_without_kind_or_ids(tmp_path):
    np.savez(tmp_path / "t.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"no 'kind' field and no 'topk_ids' array \(arrays: \['weights'\]\)"):
        load_trace(tmp_path / "t.npz", num_experts=2)


def test_load_npz_needs_num_experts(tmp_path):
    np.savez(tmp_path / "t.npz", topk_ids=np.zeros((2, 1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match=r"does not store num_experts; pass num_experts="):
        load_trace(tmp_path / "t.npz")


def test_load_npz_conflicting_num_experts(tmp_path):
    np.savez(tmp_path / "t.npz", num_experts=np.array(4), topk_ids=np.zeros((2, 1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match=r"num_experts=8 was passed but the file stores num_experts=4"):
        load_trace(tmp_path / "t.npz", num_experts=8)


def test_load_npz_top_k_mismatch(tmp_path):
    np.savez(tmp_path / "t.npz", num_experts=np.array(4), top_k=np.array(2), topk_ids=np.zeros((2, 1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"top_k=2 but topk_ids has 3 entries per token"):
        load_trace(tmp_path / "t.npz")


def test_load_token_kind_without_ids(tmp_path):
    np.savez(tmp_path / "t.npz", kind=np.array("token"), num_experts=np.array(4))
    with pytest.raises(ValueError, match=r"kind='token' archive has no 'topk_ids' array"):
        load_trace(tmp_path / "t.npz")


def test_load_loads_kind_without_loads(tmp_path):
    np.savez(tmp_path / "t.npz", kind=np.array("step_loads"), num_experts=np.array(2), top_k=np.array(1))
    with pytest.raises(ValueError, match=r"kind='step_loads' archive has no 'loads' array"):
        load_trace(tmp_path / "t.npz")


def test_load_loads_without_top_k(tmp_path):
    np.savez(tmp_path / "t.npz", kind=np.array("aggregate"), num_experts=np.array(2), loads=np.ones((1, 1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"has no 'top_k' field"):
        load_trace(tmp_path / "t.npz")


def test_load_loads_float_dtype(tmp_path):
    np.savez(
        tmp_path / "t.npz", kind=np.array("step_loads"), num_experts=np.array(2), top_k=np.array(1), loads=np.ones((1, 1, 2))
    )
    with pytest.raises(TypeError, match=r"loads must hold integers, got dtype float64"):
        load_trace(tmp_path / "t.npz")


def test_load_loads_negative(tmp_path):
    loads = np.array([[[3, -1]]], dtype=np.int64)
    np.savez(tmp_path / "t.npz", kind=np.array("step_loads"), num_experts=np.array(2), top_k=np.array(1), loads=loads)
    with pytest.raises(ValueError, match=r"loads\[0, 0, 1\] = -1 is negative"):
        load_trace(tmp_path / "t.npz")


def test_load_loads_wrong_expert_axis(tmp_path):
    np.savez(
        tmp_path / "t.npz", kind=np.array("step_loads"), num_experts=np.array(4), top_k=np.array(1),
        loads=np.ones((1, 1, 3), dtype=np.int64),
    )
    with pytest.raises(ValueError, match=r"has 3 experts on its last axis but num_experts=4"):
        load_trace(tmp_path / "t.npz")


# Direct construction of the dataclasses.


def test_token_trace_rejects_two_dim_ids():
    with pytest.raises(ValueError, match=r"\[num_tokens, num_layers, topk\], got \[2, 2\]"):
        TokenTrace(topk_ids=torch.zeros(2, 2, dtype=torch.int64), num_experts=2)


def test_token_trace_rejects_float_ids():
    with pytest.raises(TypeError, match=r"TokenTrace\.topk_ids must be an integer tensor, got dtype torch\.float32"):
        TokenTrace(topk_ids=torch.zeros(2, 1, 1), num_experts=2)


def test_token_trace_rejects_layer_ids_length():
    with pytest.raises(ValueError, match=r"layer_ids has 3 entries but the trace has 1 layers"):
        TokenTrace(topk_ids=torch.zeros(2, 1, 1, dtype=torch.int64), num_experts=2, layer_ids=[0, 1, 2])


def test_token_trace_rejects_seq_ids_shape():
    with pytest.raises(ValueError, match=r"seq_ids must have shape \[num_tokens\] = \[2\], got \[3\]"):
        TokenTrace(topk_ids=torch.zeros(2, 1, 1, dtype=torch.int64), num_experts=2, seq_ids=torch.zeros(3, dtype=torch.int64))


def test_token_trace_rejects_bad_num_experts():
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        TokenTrace(topk_ids=torch.zeros(2, 1, 1, dtype=torch.int64), num_experts=0)


def test_load_trace_rejects_bad_kind():
    with pytest.raises(ValueError, match=r"LoadTrace\.kind must be one of \('step_loads', 'aggregate'\), got 'token'"):
        LoadTrace(loads=torch.zeros(1, 1, 2, dtype=torch.int64), kind="token", num_experts=2, top_k=1)


def test_load_trace_rejects_bad_top_k():
    with pytest.raises(ValueError, match=r"top_k must be an int in 1\.\.num_experts=2, got 3"):
        LoadTrace(loads=torch.zeros(1, 1, 2, dtype=torch.int64), kind="aggregate", num_experts=2, top_k=3)


def test_load_trace_rejects_dataset_ids_out_of_range():
    with pytest.raises(ValueError, match=r"dataset_ids contains values 0\.\.2 but dataset_names has 2 entries"):
        LoadTrace(
            loads=torch.zeros(3, 1, 2, dtype=torch.int64), kind="step_loads", num_experts=2, top_k=1,
            dataset_ids=torch.tensor([0, 1, 2]), dataset_names=("a", "b"),
        )


# count_loads.


def test_count_loads_ignores_padding_rows():
    topk_ids = torch.tensor([[0, 1], [-1, -1], [2, 3], [-1, -1]])
    assert count_loads(topk_ids, 4).tolist() == [1, 1, 1, 1]


def test_count_loads_counts_duplicates_twice():
    assert count_loads(torch.tensor([[0, 0], [1, 2]]), 3).tolist() == [2, 1, 1]


def test_count_loads_padding_never_reaches_last_expert():
    assert count_loads(torch.tensor([[-1, 0], [-1, -1]]), 3).tolist() == [1, 0, 0]


def test_count_loads_leading_dims():
    topk_ids = torch.tensor([[[0, 1], [1, -1]], [[2, 2], [-1, -1]]])  # [2 batches, 2 tokens, top 2]
    counts = count_loads(topk_ids, 3)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[1, 2, 0], [0, 0, 2]]


def test_count_loads_empty_tokens():
    assert count_loads(torch.empty(0, 2, dtype=torch.int64), 3).tolist() == [0, 0, 0]


def test_count_loads_rejects_large_id():
    with pytest.raises(ValueError, match=r"topk_ids contains 3, which is not a logical expert id: ids must be in 0\.\.2"):
        count_loads(torch.tensor([[0, 3]]), 3)


def test_count_loads_rejects_id_below_padding():
    with pytest.raises(ValueError, match=r"topk_ids contains -2, which is not a logical expert id"):
        count_loads(torch.tensor([[0, -2]]), 3)


def test_count_loads_rejects_float():
    with pytest.raises(TypeError, match=r"integer tensor of logical expert ids, got dtype torch\.float32"):
        count_loads(torch.zeros(2, 2), 3)


def test_count_loads_rejects_one_dim():
    with pytest.raises(ValueError, match=r"\[\.\.\., num_tokens, topk\], got \[4\]"):
        count_loads(torch.zeros(4, dtype=torch.int64), 3)


# Microbatch forming.

# Eight tokens, one layer, top 2, four experts; token t of the hand case below.
EIGHT_TOKENS = [[[0, 1]], [[1, 2]], [[3, -1]], [[0, 0]], [[2, 3]], [[-1, -1]], [[1, 1]], [[0, 3]]]


def test_microbatch_loads_hand_case():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    result = microbatch_loads(trace, num_ranks=2, tokens_per_rank=2)
    # Microbatch 0: rank 0 = tokens 0,1; rank 1 = tokens 2,3. Microbatch 1: rank 0 = tokens 4,5; rank 1 = tokens 6,7.
    expected = [
        [[[1, 2, 1, 0], [2, 0, 0, 1]]],
        [[[0, 0, 1, 1], [1, 2, 0, 1]]],
    ]
    assert result.loads.tolist() == expected
    assert result.loads.dtype == torch.int64
    assert result.resampled is False
    assert result.num_tokens_used == 8
    assert result.num_microbatches == 2
    assert "recording order" in result.description


def test_microbatch_loads_drops_leftover_tokens():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    result = microbatch_loads(trace, num_ranks=3, tokens_per_rank=2)
    assert tuple(result.loads.shape) == (1, 1, 3, 4)
    assert result.num_tokens_used == 6
    assert result.loads[0, 0, 2].tolist() == [0, 0, 1, 1]  # tokens 4 and 5; token 5 is all padding


def test_microbatch_loads_requested_count():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    result = microbatch_loads(trace, num_ranks=2, tokens_per_rank=2, num_microbatches=1)
    assert tuple(result.loads.shape) == (1, 1, 2, 4)


def test_microbatch_loads_too_short():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    with pytest.raises(ValueError, match=r"holds 8 tokens, fewer than the 12 needed .* fills at most 2 ranks"):
        microbatch_loads(trace, num_ranks=3, tokens_per_rank=4)


def test_microbatch_loads_tokens_per_rank_above_trace():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    with pytest.raises(ValueError, match=r"fills at most 0 ranks without reuse; use tokens_per_rank <= 8"):
        microbatch_loads(trace, num_ranks=1, tokens_per_rank=9)


def test_microbatch_loads_too_many_microbatches():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    with pytest.raises(ValueError, match=r"fewer than the 12 needed for 3 microbatch"):
        microbatch_loads(trace, num_ranks=2, tokens_per_rank=2, num_microbatches=3)


def test_microbatch_loads_rejects_bad_sizes():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    with pytest.raises(ValueError, match=r"num_ranks must be a positive int, got 0"):
        microbatch_loads(trace, num_ranks=0, tokens_per_rank=2)


def test_microbatch_loads_rejects_load_trace():
    trace = LoadTrace(loads=torch.ones(1, 1, 2, dtype=torch.int64), kind="step_loads", num_experts=2, top_k=1)
    with pytest.raises(TypeError, match=r"trace must be a TokenTrace, got LoadTrace; use step_loads_to_matrices"):
        microbatch_loads(trace, num_ranks=1, tokens_per_rank=1)


def test_microbatch_topk_ids_hand_case():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    ids = microbatch_topk_ids(trace, num_ranks=2, tokens_per_rank=2, microbatch=1, layer=0)
    assert ids.tolist() == [[[2, 3], [-1, -1]], [[1, 1], [0, 3]]]
    assert ids.dtype == torch.int64


def test_microbatch_topk_ids_rejects_layer():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    with pytest.raises(ValueError, match=r"layer must be a position on the layer axis, 0\.\.0, got 1"):
        microbatch_topk_ids(trace, num_ranks=2, tokens_per_rank=2, microbatch=0, layer=1)


def test_microbatch_topk_ids_rejects_microbatch():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    with pytest.raises(ValueError, match=r"fewer than the 12 needed for 3 microbatch"):
        microbatch_topk_ids(trace, num_ranks=2, tokens_per_rank=2, microbatch=2, layer=0)
    with pytest.raises(ValueError, match=r"microbatch must be an int >= 0, got -1"):
        microbatch_topk_ids(trace, num_ranks=2, tokens_per_rank=2, microbatch=-1, layer=0)


def test_microbatch_topk_ids_match_loads(bundled):
    loads = microbatch_loads(bundled, num_ranks=8, tokens_per_rank=1024).loads
    for microbatch, layer in [(0, 0), (3, 17)]:
        ids = microbatch_topk_ids(bundled, num_ranks=8, tokens_per_rank=1024, microbatch=microbatch, layer=layer)
        assert torch.equal(count_loads(ids, 64), loads[microbatch, layer])


def test_max_ranks_without_reuse():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    assert max_ranks_without_reuse(trace, 3) == 2
    assert max_ranks_without_reuse(trace, 8) == 1
    assert max_ranks_without_reuse(trace, 9) == 0
    with pytest.raises(ValueError, match=r"tokens_per_rank must be a positive int, got 0"):
        max_ranks_without_reuse(trace, 0)


def test_bundled_trace_at_4096_tokens_per_rank(bundled):
    assert max_ranks_without_reuse(bundled, 4096) == 8
    result = microbatch_loads(bundled, num_ranks=8, tokens_per_rank=4096)
    assert tuple(result.loads.shape) == (1, 26, 8, 64)
    assert bool((result.loads.sum(dim=-1) == 4096 * 6).all())
    layout = ExpertLayout.from_num_experts(64, 8)
    imbalance = [masters_only_plan(result.loads[0, layer], layout).imbalance() for layer in range(26)]
    assert min(imbalance) > 1.0


# Resampling whole sequences.

# Token t picks expert t, so the topk ids show which trace token sits where. Sequences: 0 = tokens 0-2,
# 1 = tokens 3-4, 2 = tokens 5-8, 3 = token 9.
SEQUENCE_STARTS = {0: 0, 3: 1, 5: 2, 9: 3}
SEQUENCE_LENGTHS = [3, 2, 4, 1]


def position_trace() -> TokenTrace:
    seq_ids = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    return small_trace([[[t]] for t in range(10)], num_experts=10, seq_ids=seq_ids)


def test_resample_draws_whole_sequences():
    trace = position_trace()
    ids = microbatch_topk_ids(trace, num_ranks=4, tokens_per_rank=8, microbatch=1, layer=0, resample=True, seed=3)
    stream = torch.cat(
        [microbatch_topk_ids(trace, 4, 8, microbatch=b, layer=0, resample=True, seed=3).reshape(-1) for b in range(2)]
    ).tolist()
    assert ids.reshape(-1).tolist() == stream[32:]
    # Split the stream into runs; each run but the last is a whole sequence from its first token.
    idx = 0
    while idx < len(stream):
        start = stream[idx]
        assert start in SEQUENCE_STARTS, f"run at stream position {idx} starts mid-sequence at token {start}"
        length = SEQUENCE_LENGTHS[SEQUENCE_STARTS[start]]
        run = stream[idx : idx + length]
        assert run == list(range(start, start + len(run)))
        idx += length


def test_resample_reproducible_and_seeded():
    trace = position_trace()
    first = microbatch_loads(trace, num_ranks=3, tokens_per_rank=5, resample=True, seed=7, num_microbatches=2)
    second = microbatch_loads(trace, num_ranks=3, tokens_per_rank=5, resample=True, seed=7, num_microbatches=2)
    other = microbatch_loads(trace, num_ranks=3, tokens_per_rank=5, resample=True, seed=8, num_microbatches=2)
    assert torch.equal(first.loads, second.loads)
    assert not torch.equal(first.loads, other.loads)
    assert first.resampled is True
    assert first.num_tokens_used == 30
    assert "drawn with replacement (seed=7)" in first.description
    assert bool((first.loads.sum(dim=-1) == 5).all())


def test_resample_prefix_is_stable():
    trace = position_trace()
    one = microbatch_loads(trace, num_ranks=2, tokens_per_rank=4, resample=True, seed=1, num_microbatches=1)
    three = microbatch_loads(trace, num_ranks=2, tokens_per_rank=4, resample=True, seed=1, num_microbatches=3)
    assert torch.equal(one.loads[0], three.loads[0])


def test_resample_default_count_at_least_one():
    trace = position_trace()
    result = microbatch_loads(trace, num_ranks=4, tokens_per_rank=8, resample=True)
    assert result.num_microbatches == 1


def test_resample_needs_seq_ids():
    trace = small_trace(EIGHT_TOKENS, num_experts=4)
    with pytest.raises(ValueError, match=r"resample=True draws whole sequences, but this trace has no seq_ids"):
        microbatch_loads(trace, num_ranks=4, tokens_per_rank=4, resample=True)


# step_loads_to_matrices.


def test_step_loads_split_hand_case():
    trace = LoadTrace(loads=torch.tensor([[[7, 2, 0]]]), kind="step_loads", num_experts=3, top_k=1)
    matrices = step_loads_to_matrices(trace, num_ranks=3)
    assert matrices.tolist() == [[[[3, 1, 0], [2, 1, 0], [2, 0, 0]]]]
    assert matrices.dtype == torch.int64


@needs_shared_traces
def test_step_loads_split_keeps_expert_loads():
    trace = load_trace(SHARED_TRACES / "harmoeny_qwen15moe_top1_step_loads.npz")
    matrices = step_loads_to_matrices(trace, num_ranks=6)
    assert tuple(matrices.shape) == (80, 12, 6, 60)
    assert torch.equal(matrices.sum(dim=2), trace.loads)
    spread = matrices.max(dim=2).values - matrices.min(dim=2).values
    assert int(spread.max()) <= 1


def test_step_loads_split_rejects_token_trace():
    with pytest.raises(TypeError, match=r"trace must be a LoadTrace, got TokenTrace; use microbatch_loads"):
        step_loads_to_matrices(small_trace(EIGHT_TOKENS, num_experts=4), num_ranks=2)


def test_step_loads_split_rejects_num_ranks():
    trace = LoadTrace(loads=torch.tensor([[[7, 2, 0]]]), kind="step_loads", num_experts=3, top_k=1)
    with pytest.raises(ValueError, match=r"num_ranks must be a positive int, got -2"):
        step_loads_to_matrices(trace, num_ranks=-2)


# Synthetic generators.


def test_synthetic_topk_ids_distinct_per_token():
    ids = synthetic_topk_ids(num_tokens=2000, num_experts=16, topk=6, skew=1.5, seed=0)
    assert tuple(ids.shape) == (2000, 6)
    assert ids.dtype == torch.int64
    assert int(ids.min()) >= 0
    assert int(ids.max()) < 16
    sorted_ids = ids.sort(dim=1).values
    assert bool((sorted_ids[:, 1:] != sorted_ids[:, :-1]).all())


def test_synthetic_topk_ids_seeded():
    first = synthetic_topk_ids(100, 8, 2, 1.0, seed=4)
    assert torch.equal(first, synthetic_topk_ids(100, 8, 2, 1.0, seed=4))
    assert not torch.equal(first, synthetic_topk_ids(100, 8, 2, 1.0, seed=5))


def test_synthetic_topk_ids_top1_follows_popularity():
    # With top 1 the pick frequencies must match popularity 1/rank**skew (skew=1, 4 experts).
    counts = count_loads(synthetic_topk_ids(200_000, 4, 1, 1.0, seed=0), 4).double()
    popularity = torch.tensor([1.0, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64)
    expected = popularity / popularity.sum()
    observed = counts.sort(descending=True).values / counts.sum()
    assert torch.allclose(observed, expected, atol=0.005)


def test_zipf_loads_shape_and_row_sums():
    loads = zipf_loads(4, 16, 256, 2, 1.0, num_microbatches=3, num_layers=2, seed=0)
    assert tuple(loads.shape) == (3, 2, 4, 16)
    assert loads.dtype == torch.int64
    assert bool((loads.sum(dim=-1) == 256 * 2).all())
    # A token picks distinct experts, so no expert gets more than one assignment per token.
    assert int(loads.max()) <= 256


def test_zipf_loads_seeded():
    first = zipf_loads(2, 8, 64, 2, 1.0, seed=1)
    assert torch.equal(first, zipf_loads(2, 8, 64, 2, 1.0, seed=1))
    assert not torch.equal(first, zipf_loads(2, 8, 64, 2, 1.0, seed=2))


def test_zipf_skew_creates_imbalance():
    def expert_imbalance(skew: float) -> float:
        expert_load = zipf_loads(4, 32, 2048, 4, skew, seed=0).sum(dim=(0, 1, 2)).double()
        return float(expert_load.max() / expert_load.mean())

    assert expert_imbalance(0.0) < 1.15
    assert expert_imbalance(1.2) > 3.0


def test_zipf_layers_permute_differently():
    loads = zipf_loads(1, 32, 4096, 1, 2.0, num_layers=2, seed=0)
    # With skew 2 the three hottest experts are clearly separated; the same permutation would repeat them.
    assert loads[0, 0, 0].topk(3).indices.tolist() != loads[0, 1, 0].topk(3).indices.tolist()


def test_moving_hot_loads_move():
    loads = moving_hot_loads(2, 16, 1024, 2, num_hot_experts=2, hot_weight=20.0, num_microbatches=4, seed=0)
    assert tuple(loads.shape) == (4, 1, 2, 16)
    assert bool((loads.sum(dim=-1) == 1024 * 2).all())
    expert_load = loads.sum(dim=2)[:, 0]  # [num_microbatches, num_experts]
    hot_sets = [set(expert_load[b].topk(2).indices.tolist()) for b in range(4)]
    for b in range(3):
        assert hot_sets[b].isdisjoint(hot_sets[b + 1]), f"hot experts {hot_sets[b]} stayed hot in microbatch {b + 1}"
    assert float(expert_load.max(dim=1).values.min()) > 3.0 * float(expert_load.double().mean())


def test_moving_hot_loads_seeded():
    first = moving_hot_loads(2, 8, 64, 2, seed=3)
    assert torch.equal(first, moving_hot_loads(2, 8, 64, 2, seed=3))
    assert not torch.equal(first, moving_hot_loads(2, 8, 64, 2, seed=4))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: zipf_loads(2, 4, 8, 5, 1.0), r"topk=5 exceeds num_experts=4", id="topk_above_experts"),
        pytest.param(lambda: zipf_loads(2, 4, 8, 2, -0.5), r"skew must be a finite number >= 0 .*got -0\.5", id="negative_skew"),
        pytest.param(lambda: zipf_loads(0, 4, 8, 2, 1.0), r"num_ranks must be an int >= 1, got 0", id="zero_ranks"),
        pytest.param(lambda: synthetic_topk_ids(-1, 4, 2, 1.0), r"num_tokens must be an int >= 0, got -1", id="negative_tokens"),
        pytest.param(lambda: moving_hot_loads(2, 4, 8, 2, hot_weight=0.0), r"hot_weight must be a finite number > 0", id="zero_hot_weight"),
        pytest.param(
            lambda: moving_hot_loads(2, 4, 8, 2, num_hot_experts=5), r"num_hot_experts must be an int in 0\.\.num_experts=4, got 5",
            id="too_many_hot",
        ),
    ],
)
def test_synthetic_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_load_empty_or_garbage_file(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty, truncated or not a NumPy file"):
        load_trace(empty)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not numpy at all" * 8)
    with pytest.raises(ValueError, match="garbage.npy"):
        load_trace(garbage, num_experts=4)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(dict(topk_ids=np.full((10, 1, 2), -1), num_experts=4), id="all_padding"),
        pytest.param(dict(topk_ids=np.zeros((10, 1, 0), dtype=np.int64), num_experts=4), id="topk_zero"),
        pytest.param(dict(kind="step_loads", loads=np.zeros((0, 1, 4), dtype=np.int64), num_experts=4, top_k=1), id="no_steps"),
        pytest.param(dict(kind="step_loads", loads=np.zeros((3, 1, 4), dtype=np.int64), num_experts=4, top_k=1), id="zero_loads"),
    ],
)
def test_load_rejects_traces_without_assignments(tmp_path, fields):
    path = tmp_path / "t.npz"
    np.savez(path, **fields)
    with pytest.raises(ValueError, match="the trace contains no assignments"):
        load_trace(path)


def test_load_rejects_unsigned_ids_above_int64(tmp_path):
    path = tmp_path / "u.npy"
    np.save(path, np.full((10, 2), 2**64 - 1, dtype=np.uint64))
    with pytest.raises(ValueError, match="contains 18446744073709551615, above the int64 range"):
        load_trace(path, num_experts=8)


@pytest.mark.parametrize(
    "extra, pattern",
    [
        pytest.param(dict(layer_ids=np.array([1.7])), "layer_ids must hold integers", id="float_layer_ids"),
        pytest.param(dict(seq_id=np.zeros((5, 2), dtype=np.int64)), "'seq_id' must be a 1-D array", id="seq_id_2d"),
        pytest.param(dict(task_id=np.zeros(10, dtype=np.int64), dataset_id=np.zeros(10, dtype=np.int64)), "stores both task_id and dataset_id", id="two_index_arrays"),
        pytest.param(dict(task_id=np.full(10, -2)), "contains -2; dataset indices must be >= 0", id="negative_task_id"),
    ],
)
def test_load_rejects_bad_metadata(tmp_path, extra, pattern):
    path = tmp_path / "t.npz"
    np.savez(path, topk_ids=np.zeros((10, 1, 2), dtype=np.int64), num_experts=4, **extra)
    with pytest.raises((TypeError, ValueError), match=pattern):
        load_trace(path)


@pytest.mark.parametrize("seed", [1.5, True, None, -1, 2**70])
def test_slicing_and_generators_reject_bad_seeds(seed):
    trace = TokenTrace(topk_ids=torch.zeros(64, 1, 2, dtype=torch.int64), num_experts=4, seq_ids=torch.arange(64) // 8)
    with pytest.raises(TypeError, match="seed must be an int in"):
        microbatch_loads(trace, 2, 8, resample=True, seed=seed)
    with pytest.raises(TypeError, match="seed must be an int in"):
        zipf_loads(2, 4, 8, 1, 1.0, seed=seed)


def test_resample_must_be_a_bool():
    trace = TokenTrace(topk_ids=torch.zeros(64, 1, 2, dtype=torch.int64), num_experts=4, seq_ids=torch.arange(64) // 8)
    with pytest.raises(TypeError, match="resample must be True or False, got str 'no'"):
        microbatch_loads(trace, 2, 8, resample="no")


def test_too_short_hint_counts_the_ranks():
    trace = TokenTrace(topk_ids=torch.zeros(100, 1, 2, dtype=torch.int64), num_experts=4)
    with pytest.raises(ValueError, match=r"use tokens_per_rank <= 50, or resample=True"):
        microbatch_loads(trace, 2, 1000)


def test_moving_hot_loads_rejects_a_bool_weight():
    with pytest.raises(ValueError, match="hot_weight must be a finite number > 0"):
        moving_hot_loads(2, 4, 8, 1, hot_weight=True)
