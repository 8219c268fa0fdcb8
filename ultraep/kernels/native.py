"""Quota planner compiled from C for CPU tensors: the reference's plan, bit for bit, in microseconds.

The PyTorch reference (:func:`ultraep.planners.quota.plan_reference`) issues 1,000-1,400 small tensor
operations per plan, which costs milliseconds on a CPU. ``quota_plan.c`` runs the same steps in plain
loops. It is compiled on first use with the system C compiler (``$CC`` if set, else ``cc`` or ``gcc``)
into a cache folder (``$ULTRAEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/ultraep``, else
``~/.cache/ultraep``). It is called through ctypes, so it needs no Python or PyTorch headers. When no compiler works,
:func:`native_available` returns ``False``, a ``RuntimeWarning`` says why once, and the kernel
dispatcher keeps the PyTorch reference.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ultraep.layout import ExpertLayout, check_load_matrix
from ultraep.plan import Plan
from ultraep.planners import quota as quota_module
from ultraep.planners.base import masters_only_plan
from ultraep.planners.quota import QuotaConfig

__all__ = [
    "CACHE_DIR_ENV_VAR",
    "call_arguments",
    "native_available",
    "native_library_path",
    "native_unavailable_reason",
    "plan_quota_native",
]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV_VAR = "ULTRAEP_CACHE_DIR"
"""Environment variable naming the folder for the compiled library."""

_SOURCE = Path(__file__).with_name("quota_plan.c")
_COMPILE_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
_ERR_VALUES = 3
_ERR_RESIDENT = 4
_ERRORS = {1: "bad arguments", 2: "out of memory", _ERR_VALUES: "a load out of range", _ERR_RESIDENT: "a bad resident entry"}
_lock = threading.Lock()


def _cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV_VAR):
        return Path(os.environ[CACHE_DIR_ENV_VAR])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "ultraep"
    return Path.home() / ".cache" / "ultraep"


def _compiler() -> str:
    """Return the C compiler: ``$CC`` when it is set (and must then exist), else ``cc`` or ``gcc``."""
    chosen = os.environ.get("CC")
    if chosen:
        if shutil.which(chosen) is None:
            raise RuntimeError(f"CC={chosen!r} is not an executable on PATH; point CC at a C compiler or unset it")
        return chosen
    for name in ("cc", "gcc"):
        if shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (tried cc and gcc, CC is unset); install gcc or set CC")


def native_library_path() -> Path:
    """Return where the compiled library for this source, machine and flags is cached."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_COMPILE_FLAGS).encode()).hexdigest()[:16]
    return _cache_dir() / f"ultraep_quota_plan_{platform.machine()}_{digest}.so"


def _build(target: Path) -> None:
    compiler = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: processes that build at once never load a partial file.
    fd, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *_COMPILE_FLAGS, str(_SOURCE), "-o", partial],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to compile {_SOURCE.name} (exit {result.returncode}): {result.stderr.strip()}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | Exception:
    with _lock:
        path = native_library_path()
        try:
            if not path.exists():
                logger.info("compiling the native quota planner into %s", path)
                _build(path)
            library = ctypes.CDLL(str(path))
        except (OSError, RuntimeError) as error:
            message = f"native quota planner unavailable, the PyTorch reference plans on the CPU (320-580x slower): {error}"
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return error
    function = library.ultraep_quota_plan
    function.restype = ctypes.c_int
    function.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64] * 4 + [ctypes.c_int64] * 13 + [ctypes.c_void_p] * 3
    )
    packed = library.ultraep_quota_plan_packed
    packed.restype = ctypes.c_int
    packed.argtypes = [ctypes.c_void_p] * 10
    return library


def native_available() -> bool:
    """Return True when the compiled planner loads (compiling it on the first call)."""
    return not isinstance(_library(), Exception)


def native_unavailable_reason() -> str | None:
    """Return why the compiled planner cannot load, or None when it loads."""
    library = _library()
    return str(library) if isinstance(library, Exception) else None


@functools.lru_cache(maxsize=16)
def _settings(config: QuotaConfig) -> tuple:
    """Integer settings and constant arrays for one config, kept alive with it."""
    mean_steps = torch.tensor(quota_module._MEAN_STEPS_Q, dtype=torch.int64)
    gap_steps = torch.tensor(quota_module._GAP_STEPS_Q, dtype=torch.int64)
    anchors = torch.tensor(quota_module._ANCHORS, dtype=torch.int64)
    best_fit_steps = torch.tensor(quota_module._BEST_FIT_STEPS_Q, dtype=torch.int64)
    fraction_q = quota_module._to_fixed_point(config.min_replica_fraction)
    target_q = quota_module._to_fixed_point(config.balance_target)
    over_drain_q = quota_module._OVER_DRAIN_Q
    return mean_steps, gap_steps, anchors, best_fit_steps, quota_module._FRACTION_SCALE, fraction_q, target_q, over_drain_q


@functools.lru_cache(maxsize=16)
def _send_table(num_ranks: int, relay_chunks: int) -> torch.Tensor:
    """Return the relay send table (``relay_send_table``) as a [num_ranks + 1] int64 CPU tensor that the cache keeps alive."""
    return quota_module.relay_send_table(num_ranks, relay_chunks)


def _integer_settings(layout: ExpertLayout, config: QuotaConfig) -> tuple[int, ...]:
    """Return the integer settings in the order ``ultraep_quota_plan_packed`` takes them.

    They are the integer arguments of ``ultraep_quota_plan`` in its order, then ``stop_at_target``.
    The C function's order puts ``relay_chunks`` after ``gemm_passes``.
    """
    slots = layout.redundant_slots_per_rank
    mean_steps, gap_steps, anchors, best_fit_steps, scale, fraction_q, target_q, over_drain_q = _settings(config)
    return (
        layout.num_ranks,
        layout.experts_per_rank,
        slots,
        mean_steps.numel(),
        gap_steps.numel(),
        anchors.numel(),
        best_fit_steps.numel(),
        quota_module._num_drains(slots),
        over_drain_q,
        scale,
        config.min_replica_quota,
        fraction_q,
        target_q,
        int(config.prefer_local),
        quota_module.default_num_rounds(config, slots),
        config.copy_cost,
        int(config.copy_overlap),
        config.copy_chunks,
        config.gemm_passes,
        quota_module._relay_units(config),
        int(config.stop_at_target),
    )


def call_arguments(
    loads: torch.Tensor, layout: ExpertLayout, config: QuotaConfig, slot_expert: torch.Tensor, quota: torch.Tensor
) -> tuple:
    """Return the arguments of one ``ultraep_quota_plan`` call, in the C function's order.

    loads: [num_ranks, num_experts] contiguous int64 CPU tensor. slot_expert: [num_ranks,
    redundant_slots_per_rank] and quota: [num_slots], contiguous int64 CPU tensors the call fills.
    The tuple contains raw pointers, so the caller keeps every tensor alive while it calls. That entry
    point plans without ``QuotaConfig.stop_at_target``, so a config with it raises ValueError. It also
    plans without the rotated receiver lines, so with one redundant slot per rank its plan can differ
    from :func:`plan_quota_native`'s (it keeps the arguments of earlier builds for
    ``benchmarks/planner_ab.py``).
    """
    if config.stop_at_target:
        raise ValueError("call_arguments: ultraep_quota_plan has no stop_at_target argument; plan with plan_quota_native")
    mean_steps, gap_steps, anchors, best_fit_steps = _settings(config)[:4]
    ints = _integer_settings(layout, config)
    send_table = _send_table(layout.num_ranks, config.relay_chunks)
    return (
        loads.data_ptr(),
        *ints[:3],
        mean_steps.data_ptr(),
        ints[3],
        gap_steps.data_ptr(),
        ints[4],
        anchors.data_ptr(),
        ints[5],
        best_fit_steps.data_ptr(),
        *ints[6:-1],
        send_table.data_ptr(),
        slot_expert.data_ptr(),
        quota.data_ptr(),
    )


@functools.lru_cache(maxsize=64)
def _packed_arguments(layout: ExpertLayout, config: QuotaConfig) -> tuple:
    """Build the tensors that ``ultraep_quota_plan_packed`` reads for one layout and config.

    Returns (tensors, pointers). The tensors stay alive with the cache entry. The pointers are those of
    the packed integer settings (:func:`_integer_settings`, then the rotated receiver lines: their count,
    the number of their anchors and the anchors), the four step arrays and the relay send table, in the
    call's order after ``loads``.
    """
    mean_steps, gap_steps, anchors, best_fit_steps = _settings(config)[:4]
    num_rotations = quota_module._num_rotations(layout.redundant_slots_per_rank)
    rotations = (num_rotations, len(quota_module._ROTATION_ANCHORS), *quota_module._ROTATION_ANCHORS)
    ints = torch.tensor(_integer_settings(layout, config) + rotations, dtype=torch.int64)
    tensors = (ints, mean_steps, gap_steps, anchors, best_fit_steps, _send_table(layout.num_ranks, config.relay_chunks))
    return tensors, tuple(tensor.data_ptr() for tensor in tensors)


def plan_quota_native(
    loads: torch.Tensor, layout: ExpertLayout, config: QuotaConfig, resident: torch.Tensor | None = None
) -> Plan:
    """Plan one layer and microbatch with the compiled quota planner.

    loads: [num_ranks, num_experts] integer tensor on the CPU, of the layout's shape (the caller checks
      shape and dtype). The values are checked here, in the pass that sums them: a negative entry, or
      an entry or total above ``MAX_TOTAL_LOAD``, raises the ``ValueError`` of ``check_load_matrix``.
    resident: None, or the [num_ranks, redundant_slots_per_rank] table of
      :func:`~ultraep.planners.quota.check_resident` on the CPU, with its shape and dtype checked. Its
      values are checked here too, with the errors of ``check_resident``.
    Returns the plan of ``plan_reference(loads, layout, config, resident)``, bit for bit, on the CPU.
    Raises ``RuntimeError`` when the library cannot be built or loaded.
    """
    library = _library()
    if isinstance(library, Exception):
        raise RuntimeError(f"the native quota planner is unavailable: {library}")
    if loads.device.type != "cpu":
        raise ValueError(f"the native quota planner takes CPU tensors, got loads on {loads.device}; use backend='auto'")
    loads = loads.to(torch.int64).contiguous()
    if layout.redundant_slots_per_rank == 0 or layout.num_ranks == 1:
        check_load_matrix(loads, layout)
        return masters_only_plan(loads, layout)
    slot_expert = torch.empty((layout.num_ranks, layout.redundant_slots_per_rank), dtype=torch.int64)
    quota = torch.empty(layout.num_slots, dtype=torch.int64)
    pointers = _packed_arguments(layout, config)[1]
    resident_ptr = None
    if resident is not None:
        resident = resident.to(device="cpu", dtype=torch.int64).contiguous()
        resident_ptr = resident.data_ptr()
    status = library.ultraep_quota_plan_packed(
        loads.data_ptr(), *pointers, resident_ptr, slot_expert.data_ptr(), quota.data_ptr()
    )
    if status == _ERR_VALUES:
        check_load_matrix(loads, layout)  # raises the error that names the entry
    if status == _ERR_RESIDENT:
        from ultraep.planners.quota import check_resident

        check_resident(resident, layout, resident.device)  # raises the error that names the entry
    if status != 0:
        raise RuntimeError(f"the native quota planner failed with code {status} ({_ERRORS.get(status, 'unknown')}) for {layout}")
    return Plan(layout, slot_expert, quota)
