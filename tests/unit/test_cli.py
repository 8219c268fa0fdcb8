import json
import re
import warnings

import numpy as np
import pytest

from ultraep.cli import main
from ultraep.plan import Plan


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr()


def test_plan_writes_stable_json(tmp_path, capsys):
    loads = np.full((4, 8), 5)
    loads[:, 0] = 100
    path = tmp_path / "loads.npy"
    np.save(path, loads)
    out = tmp_path / "plan.json"
    code, _ = _run(capsys, ["plan", "--loads", str(path), "--ranks", "4", "--slots", "1", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert list(data) == [
        "num_ranks",
        "experts_per_rank",
        "redundant_slots_per_rank",
        "physical_to_logical",
        "logical_to_physical",
        "logical_replica_count",
        "quota",
        "rank_load",
        "imbalance",
    ]
    assert sum(q for q, e in zip(data["quota"], data["physical_to_logical"]) if e == 0) == 400
    assert data["rank_load"] == [135, 135, 135, 135]
    assert data["logical_to_physical"][1] == [1, -1, -1, -1]
    assert data["imbalance"] == 1.0


def test_plan_accepts_json_vector(tmp_path, capsys):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps([40, 0, 0, 0]))
    code, captured = _run(capsys, ["plan", "--loads", str(path), "--ranks", "2", "--slots", "1"])
    assert code == 0
    data = json.loads(captured.out)
    assert data["rank_load"] == [20, 20]


@pytest.mark.parametrize(
    "content, suffix, argv, pattern",
    [
        pytest.param([[1.5, 2.0], [1.0, 1.0]], ".json", ["--ranks", "2"], "is 1.5; loads must be whole assignment counts", id="fraction"),
        pytest.param([[float("nan"), 2.0], [1.0, 1.0]], ".npy", ["--ranks", "2"], "is nan; loads must be finite", id="nan"),
        pytest.param([[-5, 2], [1, 1]], ".json", ["--ranks", "2"], r"entry \[0, 0\] is -5; loads must be counts", id="negative"),
        pytest.param(
            [1] * 8, ".json", ["--ranks", "3"], "num_experts=8 is not divisible by --ranks 3.*use --ranks 2 or 4", id="indivisible"
        ),
        pytest.param([[1, True], [2, 2]], ".json", ["--ranks", "2"], r"entry \[0, 1\] .* is the JSON value true", id="boolean"),
        pytest.param([[1, "8"], [2, 2]], ".json", ["--ranks", "2"], r"entry \[0, 1\] .* is the JSON value \"8\"", id="string"),
        pytest.param([[1, 2], [None, 2]], ".json", ["--ranks", "2"], r"entry \[1, 0\] .* is the JSON value null", id="null"),
        pytest.param([[1, 10**30], [2, 2]], ".json", ["--ranks", "2"], r"entry \[0, 1\] is 10{30}; loads must be counts", id="huge_int"),
        pytest.param([[2**61] * 2] * 2, ".npy", ["--ranks", "2"], "loads must be counts in \\[0, 34359738368\\]", id="overflow"),
        pytest.param([[1, 2], [3]], ".json", ["--ranks", "2"], r"rows have \[2, 1\] entries", id="ragged"),
        pytest.param({"expert": 3}, ".json", ["--ranks", "2"], "contains a JSON dict, but it must contain a list of counts", id="object"),
        pytest.param([], ".json", ["--ranks", "2"], r"is empty \(shape \[0\]\)", id="empty"),
        pytest.param([[1, 2]] * 3, ".json", ["--ranks", "2"], "--loads has 3 rows but --ranks is 2", id="rows"),
        pytest.param("x", ".csv", ["--ranks", "2"], "must end in .npy or .json, got '.csv'", id="suffix"),
        pytest.param(
            [[1, 2], [3, 4]], ".json", ["--ranks", "2", "--slots", "1000000000"],
            r"--slots 1000000000 is too many: .* of the 1 expert\(s\) on other ranks; use --slots 1 or fewer", id="huge_slots",
        ),
        pytest.param(None, ".json", ["--ranks", "2"], "is empty; write the counts as a JSON list", id="empty_json_file"),
        pytest.param([[1, 2], [3, 4]], ".json", ["--ranks", "0"], "usage: ultraep plan .*ultraep plan: error: --ranks must be >= 1, got 0", id="zero_ranks"),
    ],
)
def test_plan_bad_input_exits_with_message(tmp_path, capsys, content, suffix, argv, pattern):
    path = tmp_path / f"loads{suffix}"
    if suffix == ".npy":
        np.save(path, np.asarray(content))
    elif suffix == ".json":
        path.write_text("" if content is None else json.dumps(content))
    else:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--loads", str(path), "--slots", "1", *argv])
    assert exit_info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err, re.DOTALL)


def test_plan_rejects_empty_npy_and_directory(tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    folder = tmp_path / "loads.json"
    folder.mkdir()
    for path, pattern in [(empty, "is empty or truncated"), (folder, "is a directory; pass a .npy or .json file")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--loads", str(path), "--ranks", "2", "--slots", "1"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("ultraep plan: error: --loads ")
        assert pattern in err


def test_plan_quota_settings_change_the_plan(tmp_path, capsys):
    # Two ranks, one hot expert on rank 0: a replica on rank 1 halves the peak, 100 -> 50 assignments.
    path = tmp_path / "loads.json"
    path.write_text(json.dumps([[100, 0], [0, 0]]))
    argv = ["plan", "--loads", str(path), "--ranks", "2", "--slots", "1"]
    code, captured = _run(capsys, argv)
    assert code == 0
    assert json.loads(captured.out)["rank_load"] == [50, 50]
    # A blocking copy that costs 60 assignments makes the replica slower (50 + 60 > 100): masters only.
    code, captured = _run(capsys, [*argv, "--quota-setting", "copy_cost=60"])
    assert code == 0
    assert json.loads(captured.out)["rank_load"] == [100, 0]
    # At 40 the replica still pays (50 + 40 < 100).
    code, captured = _run(capsys, [*argv, "--quota-setting", "copy_cost=40"])
    assert code == 0
    assert json.loads(captured.out)["rank_load"] == [50, 50]


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--quota-setting", "copy_cost=-1"], r"copy_cost must be in \[0, 16777216\]"),
        (["--quota-setting", "speed=3"], "NAME one of"),
        (["--quota-setting", "copy_cost=60", "--planner", "pairing"], "applies only to --planner quota, got --planner pairing"),
        (["--quota-setting", "copy_cost=60", "--quota-setting", "copy_cost=0"], "copy_cost is given twice"),
        (["--quota-setting", "num_rounds=some"], "num_rounds takes int or none, got 'some'"),
    ],
)
def test_plan_bad_quota_setting_exits_with_message(tmp_path, capsys, extra, pattern):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps([[100, 0], [0, 0]]))
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--loads", str(path), "--ranks", "2", "--slots", "1", *extra])
    assert exit_info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_plan_num_rounds_none_is_the_default(tmp_path, capsys):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps([[100, 7, 3, 0], [0, 0, 1, 2]]))
    argv = ["plan", "--loads", str(path), "--ranks", "2", "--slots", "1"]
    _, default = _run(capsys, argv)
    code, captured = _run(capsys, [*argv, "--quota-setting", "num_rounds=None"])
    assert code == 0
    assert captured.out == default.out


def test_plan_missing_file_and_out_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--loads", str(tmp_path / "missing.npy"), "--ranks", "2", "--slots", "1"])
    assert exit_info.value.code == 2
    assert "not found" in capsys.readouterr().err
    path = tmp_path / "loads.json"
    path.write_text("[[1, 2], [3, 4]]")
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--loads", str(path), "--ranks", "2", "--slots", "1", "--out", str(tmp_path / "no" / "plan.json")])
    assert exit_info.value.code == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--loads", str(path), "--ranks", "2", "--slots", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--out {str(tmp_path)!r} is a folder; give a file name inside it" in capsys.readouterr().err


def test_plan_reads_float16_loads_quietly(tmp_path, capsys):
    path = tmp_path / "loads.npy"
    np.save(path, np.array([[4, 1, 0, 0], [2, 0, 1, 1]], dtype=np.float16))
    out = tmp_path / "plan.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, _ = _run(capsys, ["plan", "--loads", str(path), "--ranks", "2", "--slots", "1", "--out", str(out)])
    assert code == 0
    plan = Plan.from_dict(json.loads(out.read_text()))
    assert plan.expert_load().tolist() == [6, 1, 1, 1]


def test_demo_rejects_microbatch_larger_than_trace(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--ranks", "8", "--tokens-per-rank", "100000", "--no-progress"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "--tokens-per-rank 100000 x 8 ranks needs 800000 tokens" in message
    assert "use --tokens-per-rank <= 4159" in message
    assert "resample=True" not in message


@pytest.mark.parametrize(
    "argv, pattern",
    [
        pytest.param(["--ranks", "7"], r"--ranks 7 does not divide the trace's 64 experts; .* use one of \[1, 2, 4, 8, 16, 32, 64\]", id="ranks_not_divisor"),
        pytest.param(["--trace", "{six}"], r"none of the demo's EP sizes \[8, 16, 32, 64\] divides the trace's 6 experts", id="no_demo_size"),
        pytest.param(["--trace", "{tiny}", "--ranks", "6"], r"--ranks 6 needs at least 12 tokens .* use --ranks <= 2", id="too_few_tokens"),
        pytest.param(["--trace", "{tiny}", "--ranks", "6", "--tokens-per-rank", "1"], r"the trace holds 5; use --ranks <= 5 or a longer trace", id="fewer_tokens_than_ranks"),
        pytest.param(["--trace", "{folder}"], r"trace path .* is a folder", id="folder"),
    ],
)
def test_demo_rejects_runs_it_cannot_make(tmp_path, capsys, argv, pattern):
    np.savez(tmp_path / "six.npz", topk_ids=np.arange(200).reshape(100, 1, 2) % 6, num_experts=6)
    np.savez(tmp_path / "tiny.npz", topk_ids=np.arange(10).reshape(5, 1, 2) % 6, num_experts=6)
    paths = {"six": tmp_path / "six.npz", "tiny": tmp_path / "tiny.npz", "folder": tmp_path}
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--no-progress", *(item.format(**paths) for item in argv)])
    assert exit_info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_demo_reads_npy_trace_with_num_experts(tmp_path, capsys):
    path = tmp_path / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 16, (4096, 2)))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--trace", str(path), "--ranks", "4", "--no-progress"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "does not store the number of logical experts; pass --num-experts N" in message
    assert "load_trace" not in message
    code, captured = _run(capsys, ["demo", "--trace", str(path), "--num-experts", "16", "--ranks", "4", "--microbatches", "1", "--no-progress"])
    assert code == 0
    assert "EP4: the first 1 of 2 microbatch(es) x 1 layers, 512 tokens per rank." in captured.out
    rows = [line for line in captured.out.splitlines() if line.startswith("| 4 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["none"] + ["eplb (previous microbatch)", "quota"] * 2
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--num-experts", "16", "--no-progress"])
    assert exit_info.value.code == 2
    assert "--num-experts applies to a --trace file that does not store it" in capsys.readouterr().err


def test_demo_one_rank_default_slots(capsys):
    code, captured = _run(capsys, ["demo", "--ranks", "1", "--microbatches", "1", "--no-progress"])
    assert code == 0
    slots = [line.split("|")[2].strip() for line in captured.out.splitlines() if line.startswith("| 1 |")]
    assert slots == ["0", "1", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--ranks", "1", "--slots", "2", "--no-progress"])
    assert exit_info.value.code == 2
    assert "with one rank every expert is a master there and no replica can be placed; use --slots 1" in capsys.readouterr().err


def test_demo_runs_on_bundled_trace(capsys):
    code, captured = _run(capsys, ["demo", "--ranks", "8", "--slots", "1", "--microbatches", "1", "--no-progress"])
    assert code == 0
    rows = [line for line in captured.out.splitlines() if line.startswith("| 8 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["none", "eplb (previous microbatch)", "quota"]
    quota_after_mean = float(rows[2].split("|")[5].split("/")[0])
    none_after_mean = float(rows[0].split("|")[5].split("/")[0])
    assert none_after_mean > 1.2
    assert quota_after_mean < 1.01
