"""What the write-time checksum and the done-stage verification cost (issue #18, item 5).

Writes one activation-shard-sized safetensors file (default 256 MB: 32k pairs of two
2048-wide bf16 models) three ways in the same process, best of 3:

- plain:   save_file to a temp name, fsync, rename (what atomic_path did before);
- atomic:  `atomic.atomic_path` as it is now (the same + CRC-32 recorded in .xdiff-sums.json);
- verify:  `integrity.safetensors_problem` on the written file (header + size + CRC-32), what
           a later command pays per shard before it trusts a done harvest.

Run: `python benchmarks/checksums.py [--mb 256]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from xdiff_cli.atomic import atomic_path
from xdiff_cli.integrity import safetensors_problem


def best_of(n: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    args = parser.parse_args()
    n = args.mb * 1_000_000 // (2 * 4096)
    tensors = {"acts_a": torch.randn(n, 2048).to(torch.bfloat16), "acts_b": torch.randn(n, 2048).to(torch.bfloat16)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("XDIFF_HOME")) as tmp:
        target = Path(tmp) / "shard-00000.safetensors"

        def plain() -> None:
            part = Path(tmp) / ".plain.tmp"
            save_file(tensors, str(part))
            with open(part, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(part, Path(tmp) / "plain.safetensors")

        def atomic() -> None:
            with atomic_path(target) as part:
                save_file(tensors, str(part))

        t_plain, t_atomic = best_of(3, plain), best_of(3, atomic)
        t_verify = best_of(3, lambda: safetensors_problem(target))
        assert safetensors_problem(target) is None
        size = target.stat().st_size / 1e6
    print(f"shard: {size:.0f} MB ({n:,} pairs × 2 × 2048 bf16)")
    print(f"plain write+fsync+rename {t_plain:6.2f}s   atomic write with CRC-32 {t_atomic:6.2f}s   "
          f"overhead {t_atomic / t_plain - 1:+.0%}")
    print(f"verify (header, size, CRC-32) {t_verify:6.2f}s = {size / t_verify:,.0f} MB/s")


if __name__ == "__main__":
    main()
