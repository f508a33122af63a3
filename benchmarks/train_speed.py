"""Training throughput: the optimised step against a plain dense step, same process.

Two trainers with the same seed, data, loss (unsquared L2 + joint AuxK) and optimizer; the
only difference is `TrainConfig.sparse_decode`: False is the plain dense step (dense [N, F]
batch top-k mask, dense decoder matmul, dense AuxK ranking, dense autograd through the
encoder), True the optimised one (xdiff_cli/dfc/sparse_step.py). They run in interleaved rounds
(dense, optimised, dense, ...) and each reports its best round, because the machine is
shared; after the same steps their losses must agree (`loss_rel_diff`).

FLOP/s are *dense-equivalent*: 6·N·F·(d_a+d_b) per step (forward + backward of a dense
encoder and decoder) divided by the step time, so both rows share a numerator; `peak` is
this machine's measured matmul rate ([N, d_a+d_b] × [d_a+d_b, F], best of two per round,
interleaved with the steps like them).

    python benchmarks/train_speed.py                      # d=256+256, F=8192, k=32, batch 1024, then tiny
    python benchmarks/train_speed.py --only main --rounds 7
    python benchmarks/train_speed.py --only tiny --pieces   # + top-k, AuxK pick, encoder grad alone
    python benchmarks/train_speed.py --paper              # d=4096 per model, 131,072 features, k=200, batch 2,048 (GPU)
"""

from __future__ import annotations

import argparse
import time

import torch

from xdiff_cli.dfc.crosscoder import CrosscoderConfig
from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer, resolve_device

SIZES = {  # name: (d_a, d_b, dict_size, k, batch)
    "main": (256, 256, 8192, 32, 1024),
    "tiny": (64, 48, 256, 16, 256),  # presets/tiny.toml with the tiny models' widths
    "paper": (4096, 4096, 131_072, 200, 2048),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(n: int, d: int, f: int, device: torch.device, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one [n, d] × [d, f] matmul (bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, w = torch.randn(n, d, device=device, dtype=dtype), torch.randn(d, f, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        x @ w
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * d * f / best


def run_size(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    d_a, d_b, dict_size, k, batch = SIZES[name]
    n_tokens = batch * 8
    g = torch.Generator().manual_seed(0)
    source = InMemorySource(
        torch.randn(n_tokens, d_a, generator=g), torch.randn(n_tokens, d_b, generator=g), shard_size=batch
    )
    cc = CrosscoderConfig(d_a=d_a, d_b=d_b, dict_size=dict_size, k=k)
    trainers = {}
    for label, sparse in (("dense", False), ("optimised", True)):
        # A dead window of 2 batches: AuxK is on (many features die on random data).
        tc = TrainConfig(
            steps=10**9,
            batch_size=batch,
            device=str(device),
            sparse_decode=sparse,
            k_anneal_steps=1,
            warmup_steps=1,
            buffer_tokens=n_tokens,
            dead_window_tokens=2 * batch,
        )
        trainers[label] = Trainer(source, cc, tc, device)
    best = {label: float("inf") for label in trainers}
    last_loss = {}
    steps_per_round = args.steps if name != "tiny" else args.steps * 20
    for trainer in trainers.values():  # warm-up (same steps for both)
        for _ in range(3):
            trainer.train_step()
    peak = 0.0
    for _ in range(args.rounds):
        peak = max(peak, matmul_peak(batch, d_a + d_b, dict_size, device, repeats=2))
        for label, trainer in trainers.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                out = trainer.train_step()
            _sync(device)
            best[label] = min(best[label], (time.perf_counter() - start) / steps_per_round)
            last_loss[label] = float(out.loss.detach())
    dead = {label: float(t.dead_mask().float().mean()) for label, t in trainers.items()}
    flops = 6 * batch * dict_size * (d_a + d_b)
    steps = 3 + args.rounds * steps_per_round
    print(
        f"[{name}] d_a={d_a} d_b={d_b} features={dict_size} k={k} batch={batch}; {steps} steps each, "
        f"best of {args.rounds} interleaved rounds of {steps_per_round}; dead at end {dead['optimised']:.0%}"
    )
    for label in trainers:
        print(
            f"  {label:10s} {best[label] * 1e3:9.2f} ms/step  {1 / best[label]:8.2f} steps/s  "
            f"{flops / best[label] / 1e9:8.1f} GFLOP/s dense-equivalent  loss {last_loss[label]:.6f}"
        )
    speedup = best["dense"] / best["optimised"]
    rel = abs(last_loss["optimised"] - last_loss["dense"]) / abs(last_loss["dense"])
    print(
        f"  matmul peak {peak / 1e9:.1f} GFLOP/s; optimised at {flops / best['optimised'] / peak:.0%} of peak (dense-equivalent)"
    )
    print(f"  {name}: speedup={speedup:.2f} loss_rel_diff={rel:.1e}")
    return {"speedup": speedup, "loss_rel_diff": rel}


def _best_ms(fn, repeats: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def time_pieces(args: argparse.Namespace) -> None:
    """The step's pieces at the main size, each old form against its replacement (CPU)."""
    from xdiff_cli.dfc.crosscoder import Crosscoder
    from xdiff_cli.dfc.sparse_step import encoder_preacts, select_aux, select_batch_topk

    d_a, d_b, dict_size, k, batch = SIZES["main"]
    torch.manual_seed(0)
    model = Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, dict_size=dict_size, k=k))
    x_a, x_b = torch.randn(batch, d_a), torch.randn(batch, d_b)
    pre = encoder_preacts(model, x_a, x_b, sync_free=False)
    norm = sum(model.decoder_norms()).detach()
    dead = torch.rand(dict_size, generator=torch.Generator().manual_seed(1)) < 0.1  # 10% dead
    n_keep, k_aux = k * batch, (d_a + d_b) // 4
    threshold = float(select_batch_topk(pre, norm, n_keep, None)[1].min())

    def dense_aux() -> None:  # what the dense step does: two [N, F] tensors, then top-k
        score = pre.clamp_min(0) * norm
        torch.where(dead[None, :], score, torch.full_like(score, -1.0)).topk(k_aux, dim=-1, sorted=False)

    grad = torch.zeros(batch, dict_size)
    flat = select_batch_topk(pre, norm, n_keep, None)[0]
    grad.view(-1)[flat] = torch.randn(flat.numel())
    sparse_grad = torch.sparse_coo_tensor(
        torch.stack([flat % dict_size, flat // dict_size]),
        grad.view(-1)[flat],
        (dict_size, batch),
        check_invariants=False,
    )
    pieces = {
        "batch top-k: full / pre-filtered": (
            lambda: select_batch_topk(pre, norm, n_keep, None),
            lambda: select_batch_topk(pre, norm, n_keep, threshold),
        ),
        "AuxK pick, 10% dead: dense / dead columns": (
            dense_aux,
            lambda: select_aux(pre, norm, dead, k_aux, False),
        ),
        "encoder weight grad (A): dense / sparse": (
            lambda: x_a.t() @ grad,
            lambda: torch.sparse.mm(sparse_grad, x_a),
        ),
    }
    print(f"[pieces] main size, best of {args.rounds} (ms)")
    for name, (old, new) in pieces.items():
        t_old, t_new = _best_ms(old, args.rounds), _best_ms(new, args.rounds)
        print(f"  {name:45s} {t_old:8.1f} / {t_new:8.1f}  ({t_old / t_new:.1f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the paper's scale (needs a big GPU)")
    p.add_argument("--only", choices=sorted(SIZES), help="one size instead of main + tiny")
    p.add_argument("--pieces", action="store_true", help="also time the step's pieces, old form vs new")
    p.add_argument("--steps", type=int, default=3, help="steps per round (x20 for tiny)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    where = device.type + (
        f" ({torch.cuda.get_device_name(device)})"
        if device.type == "cuda"
        else f", {torch.get_num_threads()} threads"
    )
    print(f"device: {where}")
    names = ["paper"] if args.paper else [args.only] if args.only else ["main", "tiny"]
    for name in names:
        run_size(name, args, device)
    if args.pieces:
        time_pieces(args)


if __name__ == "__main__":
    main()
