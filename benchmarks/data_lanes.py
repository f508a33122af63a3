"""Data lanes: what reading the training data in 8 lanes costs against one lane.

    python benchmarks/data_lanes.py [--shards 24] [--shard-tokens 8192] [--d 1216] [--batch 2048]

One process cuts the same number of batches from a store-like in-memory source (bf16
shards, the smol-gemma widths by default) with `ShuffledBatches` in 1 lane (the stream
before lanes; the baseline, run first in this process) and in 8 lanes (the default now),
then as 2 and 4 "ranks" (each reading only its lanes), best of --repeat runs each. Prints
batches/s, the ratio to the baseline, the host memory the shuffle buffers hold at their
peak, and the shards each reader loaded.
"""

from __future__ import annotations

import argparse
import time

import torch

from xdiff_cli.dfc.training import InMemorySource, ShuffledBatches


class _Source(InMemorySource):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: list[int] = []

    def load_shard(self, i: int):  # noqa: ANN201
        self.read.append(i)
        return super().load_shard(i)


def _buffer_bytes(batches: ShuffledBatches) -> int:
    return sum(a.nbytes + b.nbytes for lane in batches._lanes.values() if lane._buffer for a, b in [lane._buffer])


def _measure(source_args, batch: int, lanes: int, own: range | None, n_batches: int) -> tuple[float, int, int]:
    source = _Source(*source_args[0], **source_args[1])
    batches = ShuffledBatches(source, batch, seed=0, device=torch.device("cpu"), lanes=lanes, own=own)
    peak, start = 0, time.perf_counter()
    for _ in range(n_batches):
        batches.next()
        peak = max(peak, _buffer_bytes(batches))
    return n_batches / (time.perf_counter() - start), peak, len(set(source.read))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=24)
    p.add_argument("--shard-tokens", type=int, default=8192)
    p.add_argument("--d", type=int, default=1216, help="d_a + d_b (split evenly)")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3, help="runs per reader; the best is shown")
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.shards * args.shard_tokens
    g = torch.Generator().manual_seed(0)
    half = args.d // 2
    acts = (torch.randn(n, half, generator=g).bfloat16(), torch.randn(n, args.d - half, generator=g).bfloat16())
    source_args = (acts, {"shard_size": args.shard_tokens})
    n_batches = 2 * n // args.batch  # two epochs
    print(f"{args.shards} shards × {args.shard_tokens:,} tokens, d={args.d} bf16, batch {args.batch}, {n_batches} batches")
    print("| reader | batches/s | × 1 lane | peak buffer | shards read |")
    print("|---|---|---|---|---|")
    _measure(source_args, args.batch, 1, None, n_batches // 4)  # warm-up (allocator, caches), not shown
    base = None
    for name, lanes, own in (
        ("1 lane (before lanes)", 1, None),
        ("8 lanes, one process", 8, None),
        ("8 lanes, rank 0 of 2", 8, range(0, 4)),
        ("8 lanes, rank 0 of 4", 8, range(0, 2)),
    ):
        runs = [_measure(source_args, args.batch, lanes, own, n_batches) for _ in range(args.repeat)]
        rate, peak, read = max(runs)  # best of the repeats: the machine is shared and noisy
        base = base or rate
        print(f"| {name} | {rate:,.1f} | {rate / base:.2f} | {peak / 2**20:,.0f} MiB | {read} of {args.shards} |")


if __name__ == "__main__":
    main()
