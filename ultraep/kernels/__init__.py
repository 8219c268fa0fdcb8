"""GPU hot path: Triton kernels for count, plan and reroute, chosen automatically per device.

The kernels live in ``ultraep.kernels.count``, ``.plan`` and ``.reroute`` (they need Triton); each
matches its PyTorch reference in ``ultraep.reroute`` or ``ultraep.planners.quota`` bit for bit.
Importing this package imports no Triton and touches no device.
"""

from ultraep.kernels.dispatch import (
    BACKEND_ENV_VAR,
    BACKENDS,
    KernelConfig,
    backend_from_env,
    count_load,
    plan_quota,
    reroute_ids,
    resolve_backend,
)

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
