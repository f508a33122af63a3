"""Running under torchrun (or accelerate launch, or any launcher that sets RANK/WORLD_SIZE).

Input: the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Output:
a `Dist` handle — rank, world size, local rank — with the few collectives xdiff needs, or
None when the process runs alone. Backend: nccl when the ranks train on CUDA (rank r on
cuda:LOCAL_RANK), gloo otherwise and for the harvest, which needs only a barrier and a
broadcast (its models still run on cuda:LOCAL_RANK).

Training (`attach`): the data stream is cut into lanes (`batches.ShuffledBatches`), each
owning every L-th shard of the training split; rank r reads only lanes
[r·L/W, (r+1)·L/W), so ranks read disjoint shards, and its rows are exactly rows
[r·B/W, (r+1)·B/W) of the batch one process reading all L lanes would cut. The world sees
one process's batch per step. Parameters start identical (same seed) and stay so:

- BatchTopK keeps the k·B highest scores of the *global* batch: each rank all-gathers its
  local top-k·B scores, finds the global cut, and keeps its own scores above it (in the
  optimised step of `sparse_step.py` too, through `global_topk_select`);
- gradients are averaged with one all-reduce (each rank's loss is a mean over its rows, and
  the rows are split evenly, so the average is the global batch's gradient), then clipped
  and stepped identically on every rank; the FVE's batch statistics ride along in it;
- the decoder-bias initialisation gathers the whole first global batch (once), the
  inference threshold EMA uses the global smallest kept score, and the dead-feature counters
  the global "fired" mask (a max-reduce), so the running state is one process's;
- the joint AuxK divides by the global batch's residual variance (one all-reduce of its sums).

What is not bit-equal: floating-point sums happen in another order (a few ulps per step;
benchmarks/scaleout_equality.py measures the drift). Checkpoints are written by rank 0 only
(atomically, as in a single process) and record every lane's position (gathered from the
ranks), not the world size, so a run resumes under any number of ranks that divides its
lane count (8 by default: 1, 2, 4 or 8 ranks), or in one process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from xdiff_cli.errors import XdiffError

# Ranks wait at the harvest barrier for the slowest one: allow a long harvest.
TIMEOUT = timedelta(hours=int(os.environ.get("XDIFF_DIST_TIMEOUT_HOURS", "24")))

_current: Dist | None = None


def launched() -> bool:
    """True when a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    backend: str
    comm_seconds: float = 0.0  # time spent in training collectives (for the benchmark)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_from_env(*, cuda: bool | None = None) -> Dist | None:
    """Join the launcher's process group (once); None when not launched as several ranks."""
    global _current
    if _current is not None or not launched():
        return _current
    import torch
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise XdiffError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers", "launch with torchrun") from exc
    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=TIMEOUT)
    _current = Dist(rank, world, local_rank, backend)
    return _current


def current() -> Dist | None:
    return _current


def shutdown() -> None:
    global _current
    if _current is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _current = None


def rank_device(device: str, d: Dist | None) -> str:
    """The device this rank uses: `cuda:LOCAL_RANK` under a launcher on a GPU machine."""
    if d is None or device == "cpu" or d.backend != "nccl":
        return "cpu" if d is not None and d.backend == "gloo" and device == "auto" else device
    return f"cuda:{d.local_rank}"


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


class _Timed:
    def __init__(self, d: Dist) -> None:
        self.d = d

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.d.comm_seconds += time.perf_counter() - self.start


def rank_lanes(lanes: int, d: Dist) -> range:
    """The data lanes rank `d.rank` reads: a contiguous 1/W of them, so its rows are the
    rows [rank·B/W, (rank+1)·B/W) of the batch one process would cut."""
    if lanes % d.world:
        raise XdiffError(
            f"this run's training data is read in {lanes} lane{'s' if lanes > 1 else ''}, which {d.world} ranks cannot share evenly",
            f"train with a number of ranks that divides {lanes}" if lanes > 1 else "finish it in one process",
        )
    per_rank = lanes // d.world
    return range(d.rank * per_rank, (d.rank + 1) * per_rank)


def gather_batch(x_NA: Any, x_NB: Any, d: Dist) -> tuple[Any, Any]:
    """The whole global batch on every rank (the decoder-bias initialisation needs it, once)."""
    import torch
    import torch.distributed as dist

    whole = []
    for x in (x_NA, x_NB):
        parts = [torch.empty_like(x) for _ in range(d.world)]
        dist.all_gather(parts, x.contiguous())
        whole.append(torch.cat(parts))
    return whole[0], whole[1]


def gather_positions(positions: dict[int, Any], d: Dist) -> dict[int, Any]:
    """Every rank's lane positions, merged (for rank 0's checkpoint)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, positions)
    return {lane: pos for part in parts for lane, pos in part.items()}


def global_batch_topk(model: Any, d: Dist) -> None:
    """Make `model.batch_topk_sparse`/`batch_topk` select against the global batch's cut."""
    import torch
    import torch.distributed as dist

    local_sparse, local_dense = model.batch_topk_sparse, model.batch_topk

    def world_top(scores: torch.Tensor, n_rows: int, k: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's candidates for the world's k·n_rows·W best `scores` (flat, no grad):
        (values, flat indices, kept mask). Scores tied at the cut are all kept; zero scores
        are never kept (they decode to 0)."""
        n_global = max(1, min(int(round(k * n_rows * d.world)), scores.numel() * d.world))
        top, flat = scores.topk(min(n_global, scores.numel()), sorted=False)
        with _Timed(d):  # the communication share counts the collective only
            gathered = [torch.empty_like(top) for _ in range(d.world)]
            dist.all_gather(gathered, top)
        cut = torch.cat(gathered).topk(n_global, sorted=False).values.min()
        return top, flat, (top >= cut) if cut > 0 else (top > 0)

    def local_k(acts_NF: torch.Tensor, k: float) -> float:
        """The k (per local token) that keeps exactly this rank's share of the global top-k·N."""
        with torch.no_grad():
            _, _, keep = world_top(model.ranking_scores(acts_NF.detach()).float().flatten(), acts_NF.shape[0], k)
        return max(int(keep.sum()), 1) / acts_NF.shape[0]

    def min_kept_global(min_kept: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _Timed(d):
            value = torch.where(min_kept > 0, min_kept.float(), torch.full_like(min_kept.float(), float("inf")))
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
            return torch.where(torch.isinf(value), torch.zeros_like(value), value).to(min_kept.dtype)

    def global_topk_select(pre_NF: torch.Tensor, norm_F: torch.Tensor, k: float, grouped: bool):  # noqa: ANN202
        """`sparse_step.select_batch_topk` against the global cut: this rank's entries among
        the k·N·W best scores ReLU(pre)·norm of the world (flat indices, scores)."""
        with torch.no_grad():
            top, flat, keep = world_top((pre_NF.clamp_min(0) * norm_F).flatten(), pre_NF.shape[0], k)
            if not bool(keep.any()):
                keep[top.argmax()] = True
            flat_K, score_K = flat[keep], top[keep]
            if grouped:
                flat_K, order = flat_K.sort()
                score_K = score_K[order]
        return flat_K, score_K

    def batch_topk_sparse(acts_NF: torch.Tensor, k: float):  # noqa: ANN202
        sparse, min_kept = local_sparse(acts_NF, local_k(acts_NF, k))
        return sparse, min_kept_global(min_kept)

    def batch_topk(acts_NF: torch.Tensor, k: float):  # noqa: ANN202
        f_NF, min_kept = local_dense(acts_NF, local_k(acts_NF, k))
        return f_NF, min_kept_global(min_kept)

    # Instance attributes shadow the methods for this model only (Crosscoder.save/load ignore them).
    object.__setattr__(model, "batch_topk_sparse", batch_topk_sparse)
    object.__setattr__(model, "batch_topk", batch_topk)
    object.__setattr__(model, "global_topk_select", global_topk_select)  # the optimised step (sparse_step.py)
    object.__setattr__(model, "global_min_kept", min_kept_global)


def global_residual_variance(model: Any, d: Dist) -> None:
    """Make the joint AuxK divide by the *global* batch's residual variance (`sparse_step.residual_variance`).

    Each rank's term is W·sq_err_rank / var_global, so the averaged gradient and the averaged
    logged term are the single-process ones."""
    import torch
    import torch.distributed as dist

    def variance(resid_ND: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), _Timed(d):
            r = resid_ND.detach().double()
            stats = torch.cat([r.new_tensor([r.shape[0]]), r.pow(2).sum().reshape(1), r.sum(0)])
            dist.all_reduce(stats)
            total = stats[1] - stats[2:].pow(2).sum() / stats[0]
        return (total / d.world).to(resid_ND.dtype)

    object.__setattr__(model, "global_residual_variance", variance)


def attach(trainer: Any, d: Dist) -> None:
    """Turn a `training.Trainer` into one rank of a data-parallel world (see the module doc)."""
    import torch
    import torch.distributed as dist

    trainer.batches = trainer.batches.for_lanes(rank_lanes(trainer.batches.lanes, d))
    global_batch_topk(trainer.model, d)
    global_residual_variance(trainer.model, d)
    # Same seed → same init everywhere; broadcast anyway so no rank can drift from rank 0.
    with torch.no_grad():
        for tensor in list(trainer.model.parameters()) + list(trainer.model.buffers()):
            dist.broadcast(tensor.data, src=0)
    trainer.dist = d


def after_backward(trainer: Any, out: Any, x_NA: Any, x_NB: Any) -> None:
    """Average the gradients over ranks and OR the per-rank "fired" masks; sum the batch
    statistics the FVE needs into the gradients' all-reduce (two collectives in all)."""
    import torch
    import torch.distributed as dist

    d: Dist = trainer.dist
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    with _Timed(d):
        stats = torch.cat([_variance_parts(x_NA), _variance_parts(x_NB)])
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [stats])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad) / d.world)
            offset += n
        fired = out.fired_F.to(torch.uint8)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        out.fired_F = fired.bool()
    # The FVE's denominator is the global batch's variance; `reduce_window` sums the ranks' shares.
    n_global = x_NA.shape[0] * d.world
    sums = flat[offset:]
    split = x_NA.shape[1] + 2
    out.var_a = _combined_variance(sums[:split], n_global) / d.world
    out.var_b = _combined_variance(sums[split:], n_global) / d.world


def _variance_parts(x_ND: Any) -> Any:
    """[Σ‖x − mean‖², n·‖mean‖², Σx] of a rank's rows; summed over ranks they give the
    global Σ‖x − global mean‖² (`_combined_variance`) without the cancellation of Σ‖x‖²."""
    import torch

    x = x_ND.detach().float()
    mean = x.mean(0)
    return torch.cat([(x - mean).pow(2).sum().reshape(1), (x.shape[0] * mean.pow(2).sum()).reshape(1), x.sum(0)])


def _combined_variance(summed: Any, n: int) -> Any:
    within, between, total = summed[0], summed[1], summed[2:]
    return within + between - total.pow(2).sum() / n


def reduce_window(window: Any, d: Dist) -> Any:
    """A copy of a `training._MetricWindow` summed over ranks (losses averaged)."""
    import copy

    import torch
    import torch.distributed as dist

    out = copy.copy(window)
    sums = torch.stack([window.loss, window.aux, window.err_a, window.err_b, window.var_a, window.var_b, window.active])
    dist.all_reduce(sums)
    out.loss, out.aux = sums[0] / d.world, sums[1] / d.world
    out.err_a, out.err_b, out.var_a, out.var_b, out.active = sums[2:]
    bad = window.first_bad_step.clone()
    bad = torch.where(bad < 0, torch.full_like(bad, 2**62), bad)
    dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    out.first_bad_step = torch.where(bad == 2**62, torch.full_like(bad, -1), bad)
    return out
