"""Count, plan and reroute on the hot path: Triton kernels on CUDA tensors, compiled C or PyTorch on the CPU.

Every backend returns the same integers, bit for bit. The Triton kernels run faster and need no
host synchronisation, so a training step that uses them can be captured in a CUDA graph. On the CPU
the quota planner runs compiled from C (:mod:`ultraep.kernels.native`), 320-580x faster than the
PyTorch reference in the planner benchmark (EP 8-64); count and reroute keep the PyTorch reference there.

Backend selection (``backend=`` argument, or ``ULTRAEP_KERNEL_BACKEND`` when the argument is ``None``):

| value    | CUDA tensors                                | CPU tensors                                          |
| -------- | ------------------------------------------- | ---------------------------------------------------- |
| `auto`   | Triton (PyTorch if Triton is not installed) | plan: C (PyTorch if it cannot compile); else PyTorch |
| `triton` | Triton                                      | Triton interpreter, else `RuntimeError`              |
| `native` | `RuntimeError`                              | plan: C, else `RuntimeError`; count, reroute: PyTorch |
| `torch`  | PyTorch                                     | PyTorch                                              |

The interpreter runs only when ``TRITON_INTERPRET=1`` was set before Triton was first imported.

On ROCm builds of PyTorch (``torch.version.hip``), ``auto`` keeps PyTorch because the kernels are
untested there; ``triton`` forces them. The kernel modules are imported on first use, so importing
this module works without Triton and compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types

import torch

from ultraep.layout import ExpertLayout, check_load_matrix
from ultraep.plan import Plan
from ultraep.planners.quota import QuotaConfig, check_resident, plan_reference
from ultraep.reroute import _check_topk_ids, count_local_load, reroute

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "KernelConfig",
    "backend_from_env",
    "count_load",
    "plan_quota",
    "reroute_ids",
    "resolve_backend",
]

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "ULTRAEP_KERNEL_BACKEND"
"""Environment variable read when a :class:`KernelConfig` is built without an explicit backend."""
BACKENDS = ("auto", "triton", "native", "torch")
"""Accepted backend names."""


def _check_backend_name(value: object, source: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{source} must be a str, one of {', '.join(BACKENDS)}; got {type(value).__name__} {value!r}")
    if value not in BACKENDS:
        raise ValueError(
            f"{source} = {value!r} is not a kernel backend; use one of {', '.join(repr(b) for b in BACKENDS)} "
            "(lower case, no spaces)"
        )
    return value


def backend_from_env() -> str:
    """Return the backend named by ``ULTRAEP_KERNEL_BACKEND``, or ``"auto"`` when it is unset.

    Raises ``ValueError`` naming the variable and the accepted values when it holds anything else,
    an empty string included.
    """
    value = os.environ.get(BACKEND_ENV_VAR)
    if value is None:
        return "auto"
    return _check_backend_name(value, f"environment variable {BACKEND_ENV_VAR}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Choice of implementation for count, plan and reroute. Build it once and reuse it on the hot path."""

    backend: str = dataclasses.field(default_factory=backend_from_env)
    """``"auto"`` (Triton on CUDA tensors, the compiled C planner and PyTorch on the CPU), ``"triton"``,
    ``"native"`` or ``"torch"``; see the module docstring. Defaults to
    ``ULTRAEP_KERNEL_BACKEND``, read when the config is built, else ``"auto"``."""

    def __post_init__(self) -> None:
        _check_backend_name(self.backend, "KernelConfig.backend")


def _as_config(backend: str | KernelConfig | None) -> KernelConfig:
    if backend is None:
        return KernelConfig()
    if isinstance(backend, KernelConfig):
        return backend
    return KernelConfig(_check_backend_name(backend, "backend"))


@functools.lru_cache(maxsize=1)
def _load_kernels() -> types.SimpleNamespace | ImportError:
    """Import the Triton kernel modules once; return them, or the ImportError that stopped them."""
    try:
        from ultraep.kernels import count, plan, reroute as reroute_kernels
    except ImportError as error:  # Triton missing, or too old for tl.gather
        return error
    return types.SimpleNamespace(
        count_load=count.count_load_triton,
        plan_quota=plan.plan_quota_triton,
        reroute=reroute_kernels.reroute_triton,
        interpreted=plan.RUNS_IN_INTERPRETER,
    )


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def resolve_backend(backend: str | KernelConfig | None, device: torch.device | str, op: str = "plan") -> str:
    """Return ``"triton"``, ``"native"`` or ``"torch"``: the implementation of ``op`` for tensors on ``device``.

    op: ``"count"``, ``"plan"`` or ``"reroute"``; only ``"plan"`` has a native (compiled C) version.
    Raises ``RuntimeError`` when a forced backend cannot run: ``"triton"`` without Triton, or on CPU
    tensors without ``TRITON_INTERPRET=1`` set before Triton was first imported; ``"native"`` on
    non-CPU tensors, or for a plan when the C planner cannot be compiled.
    """
    if op not in ("count", "plan", "reroute"):
        raise ValueError(f"op must be 'count', 'plan' or 'reroute', got {op!r}")
    choice = _as_config(backend).backend
    device = torch.device(device)
    if choice == "torch":
        return "torch"
    if choice == "native":
        if device.type != "cpu":
            raise RuntimeError(
                f"backend='native' runs on CPU tensors only, got tensors on {device}; use backend='auto' or 'triton'"
            )
        if op != "plan":
            return "torch"
        from ultraep.kernels.native import native_available, native_unavailable_reason

        if not native_available():
            raise RuntimeError(
                f"backend='native' needs the compiled C planner, which is unavailable: {native_unavailable_reason()}; "
                "until it builds, use backend='auto' or 'torch'"
            )
        return "native"
    if choice == "auto" and device.type == "cpu":
        if op != "plan":
            return "torch"
        from ultraep.kernels.native import native_available

        return "native" if native_available() else "torch"
    kernels = _load_kernels()
    if choice == "triton":
        if isinstance(kernels, ImportError):
            raise RuntimeError(
                f"backend='triton' needs Triton (tested with 3.9), but importing the kernels failed: {kernels}; "
                "install it with pip install 'ultraep[triton]' or use backend='torch'"
            )
        if device.type == "cuda":
            if kernels.interpreted:
                _warn_once(
                    "TRITON_INTERPRET=1 is set: Triton kernels run in the interpreter on the host, "
                    "slowly and not in CUDA graphs"
                )
            return "triton"
        if kernels.interpreted:
            return "triton"
        raise RuntimeError(
            f"backend='triton' got tensors on {device}, but compiled Triton kernels run on CUDA devices only; "
            "to run them on the CPU set TRITON_INTERPRET=1 before Triton is first imported "
            "(e.g. TRITON_INTERPRET=1 python script.py), or use backend='torch' or 'auto'"
        )
    # auto, on a device other than the CPU
    if device.type != "cuda" or torch.version.hip is not None:
        return "torch"
    if isinstance(kernels, ImportError):
        _warn_once(f"Triton kernels unavailable ({kernels}); count, plan and reroute use the PyTorch reference")
        return "torch"
    if kernels.interpreted:
        # The interpreter is for tests on the CPU; CUDA tensors keep the capturable reference.
        return "torch"
    return "triton"


def count_load(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    backend: str | KernelConfig | None = None,
    check_values: bool = False,
) -> torch.Tensor:
    """Count this rank's assignments per logical expert.

    topk_ids: [num_tokens, topk] integer tensor, any device. Logical expert per assignment; -1 = unused,
      never counted. A token that names one expert twice counts twice.
    num_experts: logical experts in the EP group (>= 1).
    backend: see the module docstring; ``None`` reads ``ULTRAEP_KERNEL_BACKEND``.
    check_values: also check that every id is in [-1, num_experts); reads ``topk_ids`` on the host, so
      leave it off on a CUDA-graph hot path. Unchecked out-of-range ids are not counted by the kernel.
    Returns [num_experts] int64 on ``topk_ids.device``: this rank's row of the load matrix.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    _check_topk_ids(topk_ids, num_experts, check_values)
    if resolve_backend(backend, topk_ids.device, "count") == "torch":
        return count_local_load(topk_ids, num_experts, check_values=False)
    return _load_kernels().count_load(topk_ids, num_experts)


def plan_quota(
    loads: torch.Tensor,
    layout: ExpertLayout,
    config: QuotaConfig | None = None,
    *,
    backend: str | KernelConfig | None = None,
    check_values: bool = False,
    resident: torch.Tensor | None = None,
) -> Plan:
    """Plan one layer and microbatch with the quota planner.

    loads: [num_ranks, num_experts] integer tensor, any device. ``loads[src_rank, expert]`` counts the
      assignments produced on ``src_rank`` for logical ``expert``; entries must be non-negative.
    layout: the expert layout of the EP group.
    config: quota planner settings; ``None`` means ``QuotaConfig()``.
    backend: see the module docstring; ``None`` reads ``ULTRAEP_KERNEL_BACKEND``.
    check_values: also check for negative entries and totals past ``MAX_TOTAL_LOAD``; reads ``loads`` on
      the host, so leave it off on a CUDA-graph hot path.
    resident: None, or [num_ranks, redundant_slots_per_rank] integer tensor on ``loads.device``: the
      logical expert whose current weights each redundant slot contains, -1 = none
      (:func:`~ultraep.planners.quota.check_resident`; its values are checked with ``check_values``
      and always by the compiled C planner).
    Returns a :class:`Plan` on ``loads.device``, identical on every backend to the PyTorch reference
    ``plan_reference(loads, layout, config, resident)``.
    """
    if not isinstance(layout, ExpertLayout):
        raise TypeError(f"layout must be an ExpertLayout, got {type(layout).__name__}")
    config = QuotaConfig() if config is None else config
    if not isinstance(config, QuotaConfig):
        raise TypeError(f"config must be a QuotaConfig or None, got {type(config).__name__}")
    check_load_matrix(loads, layout, check_values=False)
    return _plan_checked(resolve_backend(backend, loads.device, "plan"), loads, layout, config, check_values, resident)


def _plan_checked(
    implementation: str,
    loads: torch.Tensor,
    layout: ExpertLayout,
    config: QuotaConfig,
    check_values: bool,
    resident: torch.Tensor | None = None,
) -> Plan:
    """Check ``resident`` and the values unless the C planner does so itself, then plan.

    Shape and dtype of ``loads`` are already checked. With ``check_values`` off, only the C planner
    checks values. It checks them while it reads them, which costs less than a host-side check.
    """
    native = implementation == "native"
    if check_values and not native:
        check_load_matrix(loads, layout)
    if resident is not None:
        resident = check_resident(resident, layout, loads.device, check_values=check_values and not native)
    return _plan_with(implementation, loads, layout, config, resident)


def _plan_with(
    implementation: str,
    loads: torch.Tensor,
    layout: ExpertLayout,
    config: QuotaConfig,
    resident: torch.Tensor | None = None,
) -> Plan:
    """Plan with a resolved implementation; ``loads`` and ``resident`` are already validated."""
    if implementation == "torch":
        return plan_reference(loads.to(torch.int64), layout, config, resident)
    if implementation == "native":
        from ultraep.kernels.native import plan_quota_native

        return plan_quota_native(loads, layout, config, resident)
    return _load_kernels().plan_quota(loads, layout, config, resident)


def reroute_ids(
    topk_ids: torch.Tensor,
    plan: Plan,
    loads: torch.Tensor,
    src_rank: int,
    *,
    backend: str | KernelConfig | None = None,
    check_values: bool = False,
) -> torch.Tensor:
    """Map this rank's logical expert ids to physical slot ids so every instance gets exactly its quota.

    topk_ids: [num_tokens, topk] integer tensor on ``src_rank``, same device as the plan. Logical expert
      per assignment; -1 = unused.
    plan: the plan made from ``loads``.
    loads: [num_ranks, num_experts] integer tensor, same device. Row ``src_rank`` must equal this rank's
      ``count_load(topk_ids)``; unchecked mismatches give wrong slots (the kernel returns -1 for
      assignments past the counted load).
    src_rank: this rank's index in the EP group.
    backend: see the module docstring; ``None`` reads ``ULTRAEP_KERNEL_BACKEND``.
    check_values: check ids, the load matrix and that row ``src_rank`` matches ``topk_ids``. This reads
      values on the host, so leave it off on a CUDA-graph hot path.
    Returns [num_tokens, topk] int64 physical slot ids on the same device; -1 entries stay -1. Every
    backend returns ``ultraep.reroute.reroute(topk_ids, plan, loads, src_rank)``.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    layout = plan.layout
    if isinstance(src_rank, bool) or not isinstance(src_rank, int) or not 0 <= src_rank < layout.num_ranks:
        raise ValueError(f"src_rank={src_rank!r} is outside [0, {layout.num_ranks - 1}] for {layout}")
    _check_topk_ids(topk_ids, layout.num_experts, check_values)
    check_load_matrix(loads, layout, check_values=check_values)
    devices = {"topk_ids": topk_ids.device, "loads": loads.device, "plan": plan.device}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"reroute inputs must share one device, got {listed}; move them with .to(device)")
    if check_values:
        counted = count_local_load(topk_ids, layout.num_experts, check_values=False)
        row = loads[src_rank].to(torch.int64)
        if not torch.equal(counted, row):
            expert = int(torch.nonzero(counted != row)[0])
            raise ValueError(
                f"loads[{src_rank}, {expert}] = {int(row[expert])} but topk_ids on rank {src_rank} hold "
                f"{int(counted[expert])} assignments of expert {expert}; build the load matrix from "
                "count_load(topk_ids) on every rank"
            )
    if resolve_backend(backend, topk_ids.device, "reroute") == "torch":
        return reroute(topk_ids, plan, loads, src_rank, check_values=False)
    return _load_kernels().reroute(topk_ids, plan, loads, src_rank)
