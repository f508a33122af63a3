"""Training throughput: the trainer's sparse-decoder step against a plain dense step.

Both run the same crosscoder, loss and optimizer in this process on random activations;
the only difference is the decoder: `sparse` reads just the k·N active decoder rows
(embedding_bag over the batch top-k), `dense` multiplies the whole [N, F] activation
matrix. FLOP/s are *dense-equivalent*: 6·N·F·(d_a+d_b) per step (forward + backward of a
dense encoder and decoder) divided by the step time, so the two rows share a numerator.

    python benchmarks/train_speed.py                 # CPU-sized default
    python benchmarks/train_speed.py --paper         # d=4096 per model, 131,072 features, k=200, batch 2,048 (GPU)
"""

from __future__ import annotations

import argparse
import time

import torch

from xdiff_cli.crosscoder import CrosscoderConfig
from xdiff_cli.training import InMemorySource, TrainConfig, Trainer, resolve_device


def time_steps(trainer: Trainer, n_warmup: int, n_steps: int, device: torch.device) -> float:
    """Seconds per optimizer step, after warm-up (k annealing is over by then)."""
    for _ in range(n_warmup):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the paper's scale (needs a big GPU)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--dict-size", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.paper:
        args.d, args.dict_size, args.k, args.batch_size = 4096, 131_072, 200, 2048
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n_tokens = args.batch_size * 4
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(n_tokens, args.d, generator=g), torch.randn(n_tokens, args.d, generator=g)
    source = InMemorySource(*acts, shard_size=args.batch_size)
    cc = CrosscoderConfig(d_a=args.d, d_b=args.d, dict_size=args.dict_size, k=args.k)
    flops_per_step = 6 * args.batch_size * args.dict_size * 2 * args.d
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"config: d_a=d_b={args.d} features={args.dict_size} k={args.k} batch={args.batch_size} on {where}")
    results = {}
    for name, sparse in (("dense (baseline)", False), ("sparse decoder", True)):
        tc = TrainConfig(steps=10**9, batch_size=args.batch_size, device=str(device), sparse_decode=sparse,
                         k_anneal_steps=1, warmup_steps=1, buffer_tokens=n_tokens)
        trainer = Trainer(source, cc, tc, device)
        seconds = time_steps(trainer, n_warmup=3, n_steps=args.steps, device=device)
        results[name] = seconds
        print(f"{name:18s} {1 / seconds:8.2f} steps/s  {flops_per_step / seconds / 1e12:8.3f} TFLOP/s (dense-equivalent)")
        del trainer
    speedup = results["dense (baseline)"] / results["sparse decoder"]
    print(f"sparse_steps_per_s={1 / results['sparse decoder']:.3f} dense_steps_per_s={1 / results['dense (baseline)']:.3f} speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
