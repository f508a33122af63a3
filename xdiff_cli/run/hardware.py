"""The machine: what `--device auto` means here, and the throughput the estimates assume.

The one home of device resolution: `resolve_device` turns auto/cpu/cuda/cuda:N into a
concrete device or a one-line error; loading, training, planning and the plan all use it.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

from xdiff_cli.errors import XdiffError

# Time estimates (estimates, not promises). On CPU the plan measures fp32 matmul FLOP/s now
# (`measure_cpu_flops`, load included); CPU_FLOPS_PER_CORE only stands in when it cannot.
CPU_FLOPS_PER_CORE = 8e9
GPU_FLOPS = 150e12
# The matmul rate the plan's fixed costs are quoted at (a quiet 2-core EPYC); a machine
# measuring half of it pays twice the fixed costs.
REFERENCE_CPU_FLOPS = 50e9


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is present, else 'cpu'; asking for CUDA without one is an error."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise XdiffError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise XdiffError(f"--device {device} was asked for but no CUDA GPU is visible", "use --device cpu")
    index_text = device.split(":", 1)[1] if ":" in device else "0"
    if not index_text.isdigit():
        raise XdiffError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N")
    if int(index_text) >= torch.cuda.device_count():
        raise XdiffError(f"no GPU {device}", f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class Hardware:
    device: str  # "cuda" or "cpu": what `--device auto` resolves to
    cpu_count: int
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None
    measured_flops: float | None = None  # CPU matmul FLOP/s measured now (load included)

    @property
    def has_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        if self.has_gpu:
            return f"{self.gpu_name} ({self.gpu_memory_bytes / 2**30:.0f} GiB)"
        if self.measured_flops:
            return f"CPU only ({self.cpu_count} cores, {self.measured_flops / 1e9:.0f} GFLOP/s fp32 measured now)"
        return f"CPU only ({self.cpu_count} cores)"

    @property
    def flops(self) -> float:
        if self.has_gpu:
            return GPU_FLOPS
        return self.measured_flops or CPU_FLOPS_PER_CORE * self.cpu_count

    @property
    def slowdown(self) -> float:
        """How much slower than the reference CPU the fixed per-token/per-step costs run."""
        return 1.0 if self.has_gpu else REFERENCE_CPU_FLOPS / self.flops

    def device_for(self, requested: str) -> str:
        """The device a run asking for `requested` uses on this machine."""
        return self.device if requested == "auto" else resolve_device(requested)


def detect_hardware() -> Hardware:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", cpus, props.name, int(props.total_memory))
    return Hardware("cpu", cpus, measured_flops=measure_cpu_flops())


_measured_cpu_flops: float | None = None


def measure_cpu_flops(seconds: float = 0.25) -> float:
    """fp32 matmul FLOP/s on this CPU right now, with torch's threads (once per process).

    Estimates scale with it, so a busy shared box or a slow laptop gets longer estimates
    than a quiet workstation. XDIFF_CPU_FLOPS overrides it (reproducible plans)."""
    global _measured_cpu_flops
    override = os.environ.get("XDIFF_CPU_FLOPS")
    if override:
        return float(override)
    if _measured_cpu_flops is None:
        import time

        import torch

        a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
        a @ b  # warm-up (thread pool, allocator)
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or n < 3:
            a @ b
            n += 1
        _measured_cpu_flops = n * 2 * 512 * 1024 * 1024 / elapsed
    return _measured_cpu_flops


def free_accelerator_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
