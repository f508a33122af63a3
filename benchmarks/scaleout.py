"""Scale-out: harvest tokens/s and training steps/s with 1 process vs 2 ranks (torchrun, gloo).

    python benchmarks/scaleout.py                  # runs both worlds, prints a table and ratios

The script launches itself: once as a plain process (the baseline, measured in the same
invocation) and once under `torchrun --nproc-per-node 2`. Each world times, after model
loading and after a barrier:
- harvest: the tiny Llama/Qwen3 pair over the same documents (each rank its part, rank 0
  then merges; the time includes the merge);
- training: the real trainer on random activations (d_a=d_b=256, 4,096 features, k=32,
  global batch 1,024, 8 shards in 8 data lanes), every rank its lanes' half of the batch; the communication share is the time
  spent in the collectives (gradient all-reduce, global top-k gather, fired-mask reduce)
  over the step time.
Each rank runs 1 torch thread (torchrun's default); the 1-process baseline is shown with 1
and with 2 threads, since on a 2-core machine that is the honest comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(out: Path, workdir: Path, threads: int, steps: int) -> None:
    import torch

    from xdiff_cli.data.harvest import harvest
    from xdiff_cli.data.parts import Part, merge_parts
    from xdiff_cli.dfc import distributed
    from xdiff_cli.dfc.crosscoder import CrosscoderConfig
    from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer
    from xdiff_cli.models.loading import load_model

    torch.set_num_threads(threads)
    dist = distributed.init_from_env(cuda=False)
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    models = json.loads((workdir / "models.json").read_text())
    a, b = load_model(models["llama"], device="cpu"), load_model(models["qwen3"], device="cpu")
    store = workdir / f"store-w{world}-t{threads}"
    corpus = str(workdir / "corpus.jsonl")
    if dist:
        dist.barrier()
    start = time.perf_counter()
    kwargs = dict(tokens=10**6, batch_size=8, context_length=128, shard_tokens=2048, progress=False)
    if dist:
        harvest(a, b, corpus, store / "parts" / Part(rank, world).dirname, part=Part(rank, world), **kwargs)
        dist.barrier()
        if rank == 0:
            merged = merge_parts(store, eval_fraction=0.1)
        dist.barrier()
    else:
        merged = harvest(a, b, corpus, store, **kwargs)
    harvest_s = time.perf_counter() - start

    g = torch.Generator().manual_seed(0)
    d, batch = 256, 1024
    source = InMemorySource(torch.randn(batch * 8, d, generator=g), torch.randn(batch * 8, d, generator=g), shard_size=batch)
    read: set[int] = set()
    load_shard = source.load_shard
    source.load_shard = lambda i: read.add(i) or load_shard(i)  # which shards this rank reads
    cc = CrosscoderConfig(d_a=d, d_b=d, dict_size=4096, k=32)
    tc = TrainConfig(steps=steps + 3, batch_size=batch, device="cpu", warmup_steps=1, k_anneal_steps=1)
    trainer = Trainer(source, cc, tc, torch.device("cpu"))
    if dist:
        distributed.attach(trainer, dist)
    for _ in range(3):
        trainer.train_step()
    if dist:
        dist.barrier()
        dist.comm_seconds = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if dist:
        dist.barrier()
    train_s = time.perf_counter() - start
    if rank == 0:
        result = {
            "world": world, "threads": threads, "harvest_tokens": merged.n_tokens, "harvest_s": harvest_s,
            "steps": steps, "train_s": train_s, "comm_s": dist.comm_seconds if dist else 0.0,
            "shards_read": len(read), "shards": source.num_shards,
        }
        out.write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--docs", type=int, default=300)
    p.add_argument("--worker", nargs=3, metavar=("OUT", "WORKDIR", "THREADS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(Path(args.worker[0]), Path(args.worker[1]), int(args.worker[2]), args.steps)
        return
    from xdiff_cli.models.tiny import build_tiny_models, write_corpus_jsonl

    workdir = Path(tempfile.mkdtemp(prefix="xdiff-scaleout-"))
    models = build_tiny_models(workdir / "models")
    (workdir / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    write_corpus_jsonl(workdir / "corpus.jsonl", n_docs=args.docs, n_chats=args.docs // 5)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve())]
    results = []
    for world, threads in ((1, 1), (1, 2), (2, 1)):
        out = workdir / f"result-{world}-{threads}.json"
        tail = ["--steps", str(args.steps), "--worker", str(out), str(workdir), str(threads)]
        if world == 1:
            cmd = [sys.executable, *me, *tail]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *me, *tail]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results.append(json.loads(out.read_text()))
    base = results[0]
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2-core machine)")
    print("| world | threads/rank | harvest tokens/s | × | train steps/s | × | comm share of a step | shards rank 0 read |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        tps = r["harvest_tokens"] / r["harvest_s"]
        sps = r["steps"] / r["train_s"]
        b_tps = base["harvest_tokens"] / base["harvest_s"]
        b_sps = base["steps"] / base["train_s"]
        comm = f"{r['comm_s'] / r['train_s']:.0%}" if r["world"] > 1 else "–"
        read = f"{r['shards_read']} of {r['shards']}"
        print(f"| {r['world']} | {r['threads']} | {tps:,.0f} | {tps / b_tps:.2f} | {sps:.2f} | {sps / b_sps:.2f} | {comm} | {read} |")


if __name__ == "__main__":
    main()
