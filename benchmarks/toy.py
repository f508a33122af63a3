"""The DFC paper's toy benchmark: does the DFC recover more exclusive concepts than a
standard crosscoder trained on the same synthetic activations?

Ground truth and scoring are in `xdiff_cli/dfc/toy.py` (DESIGN.md §2, "Toy benchmark"). Both
crosscoders see the same samples in the same order (same seed) and the same settings; only
the architecture differs. Exclusive labels: the DFC's blocks; for the standard crosscoder
the relative decoder norm (R > 0.8 → A, R < 0.2 → B).

    python benchmarks/toy.py            # CPU default (2 cores, < 10 min): a scaled-down world
    python benchmarks/toy.py --full     # the paper's world (2,048 concepts, d=256), on a GPU

The last line is machine-readable:
    dfc_excl_recall=… xc_excl_recall=… dfc_false_pos=… xc_false_pos=…
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch

from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.dfc.toy import Recovery, ToyConfig, ToyWorld, score_recovery, toy_source
from xdiff_cli.dfc.training import TrainConfig, train


@dataclass
class Setting:
    n_concepts: int
    d: int
    dict_size: int
    k: int
    steps: int
    batch_size: int
    n_tokens: int
    lr: float


# CPU default: the paper's shape scaled down (fewer concepts in a smaller space, dictionary
# half the number of concepts — the regime where the paper finds the DFC's advantage).
CPU_DEFAULT = Setting(n_concepts=512, d=128, dict_size=256, k=5, steps=2000, batch_size=512, n_tokens=100_000, lr=3e-3)
# The paper's world; dictionary again half the concepts.
FULL = Setting(n_concepts=2048, d=256, dict_size=1024, k=16, steps=20_000, batch_size=4096, n_tokens=4_000_000, lr=1e-3)


def run_one(arch: str, world: ToyWorld, source, s: Setting, args) -> tuple[Recovery, dict]:  # noqa: ANN001
    cc = CrosscoderConfig(d_a=s.d, d_b=s.d, dict_size=s.dict_size, k=s.k, arch=arch, exclusive_frac=args.exclusive_frac)
    tc = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=args.seed, device=args.device,
                     log_every=max(1, s.steps // 10), checkpoint_every=10**9)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(source, cc, tc, tmp, progress=args.progress)
        model = Crosscoder.load(result.final_dir)
    seconds = time.perf_counter() - start
    return score_recovery(model, world), {"fve_a": result.fve_a, "fve_b": result.fve_b, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper's sizes (GPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dict-size", type=int, default=None)
    p.add_argument("--exclusive-frac", type=float, default=0.05, help="DFC share of features exclusive to each model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = FULL if args.full else CPU_DEFAULT
    if args.steps:
        s.steps = args.steps
    if args.dict_size:
        s.dict_size = args.dict_size
    world = ToyWorld(ToyConfig(n_concepts=s.n_concepts, d=s.d, seed=args.seed))
    source = toy_source(world, s.n_tokens)
    print(
        f"toy world: {s.n_concepts} concepts in d={s.d}, {len(world.only_a)} exclusive to each model, "
        f"{world.mean_active():.1f} active per token; dictionary {s.dict_size}, k={s.k}, "
        f"{s.steps} steps × batch {s.batch_size}"
    )
    rows = {}
    for arch in ("dfc", "crosscoder"):
        rows[arch] = run_one(arch, world, source, s, args)
    header = f"{'':12s} {'excl recall':>11s} {'(anywhere)':>10s} {'shared recall':>13s} {'false pos':>9s} {'excl feats':>10s} {'FVE A/B':>11s} {'time':>7s}"
    print(header)
    for arch, (rec, info) in rows.items():
        print(
            f"{arch:12s} {rec.excl_recall:11.3f} {rec.excl_recall_anywhere:10.3f} {rec.shared_recall:13.3f} "
            f"{rec.false_pos:9d} {rec.n_exclusive_features:10d} {info['fve_a']:5.3f}/{info['fve_b']:5.3f} {info['seconds']:6.0f}s"
        )
    dfc, xc = rows["dfc"][0], rows["crosscoder"][0]
    print(
        f"dfc_excl_recall={dfc.excl_recall:.3f} xc_excl_recall={xc.excl_recall:.3f} "
        f"dfc_false_pos={dfc.false_pos} xc_false_pos={xc.false_pos}"
    )


if __name__ == "__main__":
    main()
