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

# Rough sustained throughputs for the time estimates (FLOP/s); estimates, not promises.
CPU_FLOPS_PER_CORE = 8e9
GPU_FLOPS = 150e12


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

    @property
    def has_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        if self.has_gpu:
            return f"{self.gpu_name} ({self.gpu_memory_bytes / 2**30:.0f} GiB)"
        return f"CPU only ({self.cpu_count} cores)"

    @property
    def flops(self) -> float:
        return GPU_FLOPS if self.has_gpu else CPU_FLOPS_PER_CORE * self.cpu_count

    def device_for(self, requested: str) -> str:
        """The device a run asking for `requested` uses on this machine."""
        return self.device if requested == "auto" else resolve_device(requested)


def detect_hardware() -> Hardware:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", cpus, props.name, int(props.total_memory))
    return Hardware("cpu", cpus)


def free_accelerator_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
