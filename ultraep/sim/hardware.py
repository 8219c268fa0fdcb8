"""GPU systems for the throughput simulator: peak rates per GPU and the efficiency achieved on them.

Peak numbers are vendor figures per GPU, without structured sparsity. Bandwidths are per direction:
an NVLink or network port sends and receives at the same time, so an all-to-all where each GPU sends
``x`` bytes and receives ``y`` bytes takes ``max(x, y) / bandwidth`` on that port.

Sources (public pages found with a web search):

- H100 SXM: 989.4 TFLOP/s dense BF16 (1978.9 with sparsity), 3.35 TB/s HBM3, NVLink 4 900 GB/s in
  total over both directions: glennklockwood.com/garden/processors/h100.
- H200 SXM: the H100 die with 141 GB HBM3e at 4.8 TB/s, with the same tensor-core rates and the same
  900 GB/s NVLink 4 (aiminingco.com/gpu/h200/specs, lzwjava.github.io/nvidia-h200-gpu-specs-en). The
  MLPerf Inference v4.1 system description "H200-SXM-141GBx8" lists "18x 4th Gen NVLink, 900GB/s".
- HGX network: one ConnectX-7 400 Gb/s (about 50 GB/s) InfiniBand card per GPU, as in the DeepEP README
  test setup (github.com/deepseek-ai/DeepEP, "Normal kernels with NVLink and RDMA forwarding").
- GB200 NVL72: 72 GPUs in one NVLink 5 domain; each GPU 1.8 TB/s NVLink in total, 900 GB/s per
  direction (verda.com/blog/gb300-nvl72-architecture); 2500 TFLOP/s dense BF16 for the GB200 variant
  of B200 at 1200 W and 8 TB/s HBM3e (glennklockwood.com/garden/processors/B200).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["HARDWARE", "Efficiency", "HardwareConfig", "get_hardware"]

GB = 1e9
TFLOP = 1e12


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
    """Peak rates of one GPU and the size of its NVLink domain."""

    name: str
    """Short name used on the command line, e.g. ``"gb200-nvl72"``."""
    display_name: str
    """Name for tables."""
    peak_flops: float
    """Dense BF16 tensor-core FLOP/s of one GPU (no sparsity)."""
    hbm_bytes_per_s: float
    """HBM bandwidth of one GPU, bytes/s."""
    nvlink_bytes_per_s: float
    """NVLink bandwidth of one GPU per direction, bytes/s."""
    network_bytes_per_s: float
    """Scale-out network bandwidth of one GPU per direction, bytes/s (traffic between NVLink domains)."""
    domain_size: int
    """GPUs joined by NVLink: ranks ``d * domain_size .. (d + 1) * domain_size - 1`` form domain ``d``."""
    source: str
    """Origin of the numbers."""

    def __post_init__(self) -> None:
        for name in ("peak_flops", "hbm_bytes_per_s", "nvlink_bytes_per_s", "network_bytes_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HardwareConfig.{name} must be a positive finite number, got {value!r}")
        if isinstance(self.domain_size, bool) or not isinstance(self.domain_size, int) or self.domain_size < 1:
            raise ValueError(f"HardwareConfig.domain_size must be a positive int, got {self.domain_size!r}")

    def scaled(self, *, flops: float = 1.0, bandwidth: float = 1.0) -> HardwareConfig:
        """Return a copy with FLOP/s multiplied by ``flops`` and every bandwidth by ``bandwidth`` (for what-if runs)."""
        if not (flops > 0 and bandwidth > 0):
            raise ValueError(f"scale factors must be positive, got flops={flops}, bandwidth={bandwidth}")
        return dataclasses.replace(
            self,
            peak_flops=self.peak_flops * flops,
            hbm_bytes_per_s=self.hbm_bytes_per_s * bandwidth,
            nvlink_bytes_per_s=self.nvlink_bytes_per_s * bandwidth,
            network_bytes_per_s=self.network_bytes_per_s * bandwidth,
        )


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of the peak rates that kernels reach; every value is in (0, 1].

    The defaults are estimates, not measurements on the simulated systems. The DeepEP README gives one
    anchor: on H800 its dispatch and combine kernels reach 153-158 GB/s of the "~160 GB/s NVLink
    maximum" and 43-47 GB/s of the "~50 GB/s" CX7 RDMA maximum. Those maxima are practical figures, not
    the nominal NVLink rate, so 0.8 and 0.85 of the nominal rates are guesses on the safe side.
    """

    gemm: float = 0.7
    """Fraction of the dense peak FLOP/s a grouped GEMM reaches with many tokens per expert."""
    hbm: float = 0.8
    """Fraction of the HBM bandwidth reached while streaming expert weights."""
    nvlink: float = 0.8
    """Fraction of the per-direction NVLink bandwidth reached by all-to-all and weight copies."""
    network: float = 0.85
    """Fraction of the per-direction network bandwidth reached between NVLink domains."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"Efficiency.{field.name} must be in (0, 1], got {value!r}")


HARDWARE: dict[str, HardwareConfig] = {
    hardware.name: hardware
    for hardware in (
        HardwareConfig(
            name="h100-hgx",
            display_name="H100 SXM HGX (8-GPU NVLink domain)",
            peak_flops=989.4 * TFLOP,
            hbm_bytes_per_s=3350 * GB,
            nvlink_bytes_per_s=450 * GB,
            network_bytes_per_s=50 * GB,
            domain_size=8,
            source="glennklockwood.com/garden/processors/h100; 400 Gb/s ConnectX-7 per GPU as in the DeepEP README setup",
        ),
        HardwareConfig(
            name="h200-hgx",
            display_name="H200 SXM HGX (8-GPU NVLink domain)",
            peak_flops=989.4 * TFLOP,
            hbm_bytes_per_s=4800 * GB,
            nvlink_bytes_per_s=450 * GB,
            network_bytes_per_s=50 * GB,
            domain_size=8,
            source="aiminingco.com/gpu/h200/specs (4.8 TB/s, H100 compute); MLPerf v4.1 H200-SXM-141GBx8 (NVLink 900 GB/s)",
        ),
        HardwareConfig(
            name="gb200-nvl72",
            display_name="GB200 NVL72 (72-GPU NVLink domain)",
            peak_flops=2500 * TFLOP,
            hbm_bytes_per_s=8000 * GB,
            nvlink_bytes_per_s=900 * GB,
            # NOTE: NVIDIA's GB200 reference configuration puts ConnectX-7 cards in the compute trays; one
            # 400 Gb/s card per GPU is assumed here. It matters only for EP groups larger than 72.
            network_bytes_per_s=50 * GB,
            domain_size=72,
            # NOTE: verda.com lists 2.25 PFLOP/s and 7.7 TB/s for GB200; the 1200 W figures are used here.
            source="glennklockwood.com/garden/processors/B200 (GB200 at 1200 W); verda.com (NVLink 5, 900 GB/s per direction)",
        ),
    )
}
"""The simulator's systems by :attr:`HardwareConfig.name`."""


def get_hardware(name: str) -> HardwareConfig:
    """Return the system called ``name``; raise ``ValueError`` naming the valid names."""
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; valid names are {sorted(HARDWARE)}")
    return HARDWARE[name]
