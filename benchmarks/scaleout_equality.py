"""Does 2-rank training (torchrun, gloo) give the single-process model? With AuxK active.

    python benchmarks/scaleout_equality.py [--steps 60]

Trains the same crosscoder on the same planted activations (d_a=32, d_b=40, 256 features,
k=8, global batch 256, a short dead window so AuxK runs) once in this process and once under
`torchrun --nproc-per-node 2`, then prints both runs' final metrics and the largest weight
difference per tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _train(out: Path, steps: int) -> None:
    import torch

    from xdiff_cli.dfc import distributed
    from xdiff_cli.dfc.crosscoder import CrosscoderConfig
    from xdiff_cli.dfc.training import InMemorySource, TrainConfig, train

    torch.set_num_threads(1)
    distributed.init_from_env(cuda=False)
    g = torch.Generator().manual_seed(0)
    n = 4096
    z = torch.relu(torch.randn(n, 24, generator=g)) * (torch.rand(n, 24, generator=g) < 0.25)
    a = z @ torch.randn(24, 32, generator=g) + 0.05 * torch.randn(n, 32, generator=g)
    b = z @ torch.randn(24, 40, generator=g) + 0.05 * torch.randn(n, 40, generator=g)
    cc = CrosscoderConfig(d_a=32, d_b=40, dict_size=256, k=8, exclusive_frac=0.1)
    tc = TrainConfig(
        steps=steps, batch_size=256, lr=3e-3, device="cpu", checkpoint_every=steps, log_every=10,
        dead_window_tokens=2048, warmup_steps=5, k_anneal_steps=10,
    )
    train(InMemorySource(a, b, shard_size=512), cc, tc, out, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _train(Path(args.worker), args.steps)
        return
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="xdiff-equality-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = str(Path(__file__).resolve())
    _train(work / "one", args.steps)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", me,
         "--steps", str(args.steps), "--worker", str(work / "two")],
        env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for name in ("one", "two"):
        line = json.loads((work / name / "metrics.jsonl").read_text().splitlines()[-1])
        keep = ("step", "fve_a", "fve_b", "aux_loss", "l0", "dead_fraction", "threshold")
        print(f"{'1 process' if name == 'one' else '2 ranks  '}: " + ", ".join(f"{k} {line[k]:.6g}" for k in keep))
    one = load_file(str(work / "one" / "final" / "model.safetensors"))
    two = load_file(str(work / "two" / "final" / "model.safetensors"))
    for key, value in one.items():
        diff = float((value - two[key]).abs().max())
        print(f"  {key}: max |Δ| {diff:.2e} (largest |w| {float(value.abs().max()):.3f})")


if __name__ == "__main__":
    main()
