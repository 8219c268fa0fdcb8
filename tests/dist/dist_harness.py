"""Run one test body on several gloo ranks: spawned processes, a FileStore rendezvous, every exit code checked."""

from __future__ import annotations

import datetime
import os
import pickle
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Seconds a whole multi-process test may take before its ranks are killed and the test fails.
DEFAULT_JOIN_TIMEOUT_S = 90.0
# Process group timeout; collectives that hang past it raise instead of blocking the test forever.
DEFAULT_GROUP_TIMEOUT_S = 30.0


def _entry(rank: int, world_size: int, workdir: str, worker, args: tuple, group_timeout_s: float) -> None:
    torch.set_num_threads(1)
    status = 0
    try:
        store = dist.FileStore(os.path.join(workdir, "store"), world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=group_timeout_s),
        )
        result = worker(rank, world_size, *args)
        with open(os.path.join(workdir, f"result_{rank}.pkl"), "wb") as handle:
            pickle.dump(result, handle)
    except BaseException:  # report every failure, including assertion errors, through the exit code
        with open(os.path.join(workdir, f"error_{rank}.txt"), "w") as handle:
            handle.write(traceback.format_exc())
        status = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(status)  # skip atexit handlers that could wait on a peer that already failed


def run_ranks(
    worker,
    world_size: int,
    workdir: Path,
    *args,
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
    group_timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
) -> list:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return each rank's result.

    ``worker`` must be a module-level function (it is pickled by name). Fails the calling test with
    every failing rank's traceback when any rank exits non-zero or does not finish in time.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "ultraep.runtime"])
    processes = []
    for rank in range(world_size):
        process = context.Process(target=_entry, args=(rank, world_size, str(workdir), worker, args, group_timeout_s))
        process.start()
        processes.append(process)

    deadline = time.monotonic() + join_timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()

    failures = []
    for rank, process in enumerate(processes):
        if rank in hung:
            failures.append(f"rank {rank} did not finish within {join_timeout_s} s and was killed")
        elif process.exitcode != 0:
            error_file = workdir / f"error_{rank}.txt"
            detail = error_file.read_text() if error_file.exists() else "(no traceback written)"
            failures.append(f"rank {rank} exited with code {process.exitcode}:\n{detail}")
    if failures:
        raise AssertionError("\n\n".join(failures))

    results = []
    for rank in range(world_size):
        with open(workdir / f"result_{rank}.pkl", "rb") as handle:
            results.append(pickle.load(handle))
    return results
