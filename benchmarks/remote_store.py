"""Stores at URLs: reading every shard locally vs over HTTP through the bounded cache; bf16 vs fp32 steps.

    python benchmarks/remote_store.py [--shards 8] [--tokens-per-shard 8192] [--width 512]

Builds a synthetic store with `StoreWriter` (d_a = d_b = --width, bf16), serves its folder
with a plain HTTP server on 127.0.0.1 (fsspec's http backend, aiohttp) and times, in this one
process:
- local:       `ActivationStore.load_shard` over every shard (the baseline);
- http cold:   the same through `RemoteActivationStore`, empty cache (download + CRC-32 + load);
- http warm:   again, every shard a cache hit;
- http bound:  cache bounded to 3 shards, two passes (every fetch evicts: the worst case);
and training steps/s of the real trainer on CPU with --precision fp32 vs bf16 (d=256+256,
4,096 features, k=32, batch 1,024).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def _build(directory: Path, shards: int, rows: int, width: int) -> None:
    import torch

    from xdiff_cli.data.store import Shard, StoreWriter

    identity = {"model_a": "a", "model_b": "b", "layer_a": 1, "layer_b": 1, "d_a": width, "d_b": width, "dtype": "bfloat16"}
    writer = StoreWriter.open_or_create(directory, identity)
    g = torch.Generator().manual_seed(0)
    for i in range(shards):
        shard = Shard(torch.randn(rows, width, generator=g).bfloat16(), torch.randn(rows, width, generator=g).bfloat16(),
                      torch.full((rows,), i), torch.arange(rows), torch.arange(rows), torch.arange(rows) + 1)
        writer.write_shard(shard, [(i, f"doc {i}")], next_doc_index=i + 1, stats={})
    writer.finish(scale_a=1.0, scale_b=1.0, aligned_fraction=1.0, eval_fraction=0.1)


def _pass(store, passes: int = 1) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(passes):
        for i in range(store.num_shards):
            store.load_shard(i)
    return time.perf_counter() - start


def _train_steps_per_s(precision: str, steps: int) -> float:
    import torch

    from xdiff_cli.dfc.crosscoder import CrosscoderConfig
    from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    source = InMemorySource(torch.randn(16_384, 256, generator=g), torch.randn(16_384, 256, generator=g))
    cc = CrosscoderConfig(d_a=256, d_b=256, dict_size=4096, k=32, exclusive_frac=0.05)
    tc = TrainConfig(steps=steps + 3, batch_size=1024, device="cpu", precision=precision, k_anneal_steps=1)
    trainer = Trainer(source, cc, tc, torch.device("cpu"))
    for _ in range(3):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--tokens-per-shard", type=int, default=8192)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDIFF_HOME"] = str(Path(tmp) / "home")
        from xdiff_cli.data.remote import RemoteActivationStore, StoreCache, cache_root
        from xdiff_cli.data.store import ActivationStore

        _build(Path(tmp) / "activations", args.shards, args.tokens_per_shard, args.width)
        local = ActivationStore.open(Path(tmp) / "activations")
        total = sum(e["bytes"] for e in local.manifest["shards"])
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=tmp))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/activations"
        try:
            base = _pass(local)
            rows = [("local (baseline)", base, 1)]
            remote = RemoteActivationStore.open_url(url, cache=StoreCache(cache_root(), 10**12))
            rows.append(("http, cold cache", _pass(remote), 1))
            rows.append(("http, warm cache", _pass(remote), 1))
            shard_bytes = max(e["bytes"] for e in local.manifest["shards"])
            bounded = RemoteActivationStore.open_url(url, cache=StoreCache(Path(tmp) / "bounded", 3 * shard_bytes))
            rows.append(("http, cache = 3 shards, 2 passes", _pass(bounded, 2), 2))
        finally:
            server.shutdown()
        print(f"store: {args.shards} shards x {args.tokens_per_shard} tokens x (2 x {args.width}) bf16 = {total / 1e6:.0f} MB")
        print(f"{'read every shard':36s} {'s/pass':>8s} {'MB/s':>8s} {'x local':>8s}")
        for name, seconds, passes in rows:
            per_pass = seconds / passes
            print(f"{name:36s} {per_pass:8.3f} {total / 1e6 / per_pass:8.0f} {base / per_pass:8.2f}")
        print(f"evictions in the bounded pass: {len(bounded.cache.evicted)}")
    fp32 = _train_steps_per_s("fp32", args.steps)
    bf16 = _train_steps_per_s("bf16", args.steps)
    print(f"train steps/s on CPU: fp32 {fp32:.2f}, bf16 {bf16:.2f} ({bf16 / fp32:.2f}x fp32)")


if __name__ == "__main__":
    main()
