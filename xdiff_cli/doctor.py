"""Environment checks behind `xdiff doctor`: can this machine run xdiff, and how big?

`iter_checks()` yields each check as soon as it is done, so the command can print them as
they come: the cheap ones first, the hub probe (a short timeout, never a hang) and the 4-bit
check (which imports bitsandbytes, seconds on some machines) last.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field

from xdiff_cli import paths


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return all(c.ok for c in self.checks if c.required)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_checks() -> list[Check]:
    checks = [Check("python", True, platform.python_version())]
    for dist, required in (("torch", True), ("transformers", True), ("bitsandbytes", False)):
        version = _version(dist)
        checks.append(Check(dist, version is not None, version or "not installed", required))
    return checks


def _cuda_checks() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("cuda", True, "no CUDA device: CPU only (fine for tiny/small pairs)", required=False)]
    checks = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        checks.append(
            Check(f"cuda:{index}", True, f"{name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB", False)
        )
    return checks


def quantization_check() -> Check:
    """Actually quantise a small linear layer to 4-bit and run it: 'installed' is not 'works'."""
    import logging

    # bitsandbytes logs optional-kernel warnings while importing (e.g. "Failed to load CPU
    # gemm_4bit_forward … pip install kernels"): noise inside doctor's list; the check's
    # own line says whether 4-bit works.
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        return _quantize_small_layer()
    finally:
        bnb_logger.setLevel(level)


def _quantize_small_layer() -> Check:
    try:
        import bitsandbytes as bnb
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer = layer.to(device)
        out = layer(torch.randn(2, 64, device=device, dtype=torch.bfloat16))
        ok = bool(torch.isfinite(out).all())
        return Check("4-bit quantisation", ok, f"nf4 works on {device}" if ok else "nf4 gave non-finite output", False)
    except Exception as exc:  # any failure here means "not available", which doctor reports
        return Check("4-bit quantisation", False, f"unavailable: {exc.__class__.__name__}: {exc}"[:160], False)


def token_check() -> Check:
    """Whether an HF token is configured; never reveals it."""
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:
        token = None
    detail = "configured (needed only for gated models)" if token else "none (gated models like Llama need one)"
    return Check("hf token", True, detail, required=False)


def disk_check() -> Check:
    root = paths.data_root()
    free = paths.free_bytes(root)
    return Check("data dir", True, f"{root} ({free / 2**30:.1f} GiB free)")


HUB_TIMEOUT_S = 3.0
DEFAULT_HUB = "https://huggingface.co"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HUB).rstrip("/")


def hub_check(timeout: float = HUB_TIMEOUT_S) -> Check:
    """Can this machine reach the model hub? Any HTTP answer counts; no answer within
    `timeout` seconds is a failure (not required: local and tiny models need no hub)."""
    import urllib.error
    import urllib.request

    from xdiff_cli.models.hub import hub_offline

    endpoint = hub_endpoint()
    if hub_offline():
        return Check("hub", True, "offline mode (HF_HUB_OFFLINE): only models already in the cache", False)
    request = urllib.request.Request(f"{endpoint}/api/models?limit=1", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered: reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check(
            "hub", False,
            f"{endpoint} unreachable ({reason}): hub models cannot be pulled; tiny and local models work",
            False,
        )
    return Check("hub", True, f"{endpoint} reachable", False)


def iter_checks() -> Iterator[Check]:
    """Every check, yielded as soon as it is done (cheap ones first)."""
    packages = _package_checks()
    yield from packages
    yield token_check()
    yield disk_check()
    if all(c.ok for c in packages):
        yield from _cuda_checks()
    yield hub_check()
    if all(c.ok for c in packages):
        yield quantization_check()


def run_doctor() -> DoctorReport:
    return DoctorReport(list(iter_checks()))
