"""Training a (Dedicated Feature) Crosscoder: the `train` stage.

The recipe follows the DFC paper and its public code (docs: DESIGN.md §2):

    f      = BatchTopK_k(ReLU(W_enc x + b_enc)), ranked by f_i · Σ_m ‖d_i^m‖
    loss   = mean_{N,m} ‖x_m − x̂_m‖₂  +  1.0 · AuxK         (unsquared, as the paper's code)
    k      annealed linearly from k_start (1000, capped at dict_size) to k
    AuxK   dead features (no activation for `dead_window_tokens`), top k_aux by activation ×
           decoder norm, fit both models' residual; one term normalised by its variance
    Adam   lr with linear warm-up, grad-norm clip 1.0, bf16 autocast on CUDA (`precision`)
    init   decoder rows at norm 0.4 (module), decoder bias = geometric median of a batch
    infer  threshold = bias-corrected EMA (β = 0.999) of the smallest kept score per batch

Schedules scale with short runs: the paper trains 100k steps with 1k warm-up steps (1%),
anneals k over 5k steps (5%) and calls a feature dead after 10M tokens (~5% of its 205M);
we keep those fractions and cap at the paper's absolute values.

Data comes from an *activation source* through `batches.ShuffledBatches` (shuffling, data
lanes of disjoint shards, exact resume from the lanes' positions).

Checkpoints (`out_dir/checkpoints/step-XXXXXXX/`): the model (`Crosscoder.save`), Adam
moments and trainer tensors (`trainer.safetensors`) and `state.json`; the last two are
kept. `out_dir/final/` holds the trained crosscoder, `out_dir/metrics.jsonl` the log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xdiff_cli.dfc.batches import (  # noqa: F401 - re-exported: the data stream's names live here too
    DATA_LANES,
    DataPosition,
    InMemorySource,
    MemoryShard,
    ShuffledBatches,
    lane_count,
)
from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig, SparseActs
from xdiff_cli.dfc.sparse_step import residual_variance
from xdiff_cli.errors import XdiffError
from xdiff_cli.run.settings import PRECISION_CHOICES

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 2048
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    warmup_steps: int | None = None  # None: min(1000, 1% of steps)
    k_start: int | None = None  # None: min(1000, dict_size)
    k_anneal_steps: int | None = None  # None: min(5000, 5% of steps)
    # ~30x the paper's 1/32: in short runs AuxK must revive dead exclusive features within the
    # run (benchmarks/discovery.py, ctx pair: held-out dead A/B 63%/49% at 0.03, 35%/37% at 0.3;
    # real pair, 1,000 steps: B-exclusive 39% dead at 0.3, 20% at 1.0, FVE unchanged).
    aux_coef: float = 1.0
    k_aux: int | None = None  # None: min(512, mean width / 2)
    # "l2": mean over tokens and models of the unsquared error norm ‖x_m − x̂_m‖₂ (the paper's
    # code; keeps exclusive blocks alive); "mse": Σ_m mean_N ‖x_m − x̂_m‖² (xdiff 0.1).
    recon_loss: str = "l2"
    # "joint": one AuxK term over both models' residual, normalised by its variance, dead
    # latents chosen by activation × decoder norm (the paper's code); "per_model": one squared
    # term per model, chosen by activation.
    aux_form: str = "joint"
    dead_window_tokens: int | None = None  # None: min(10M, 5% of the tokens seen in training)
    # "centred": each model's residual minus its mean, scaled so the median norm of that is
    # √((d_a+d_b)/2) (measured on the training split at the start); "store": the harvest's
    # scalar only (xdiff 0.1). Centring matters when one model's residual is mostly a
    # constant offset: on Gemma-3-270M 95% of the squared norm is the mean, so the scalar rule
    # left it 9× less variance than SmolLM2's and its exclusive block never won a top-k slot.
    normalisation: str = "centred"
    threshold_beta: float = 0.999
    grad_clip: float = 1.0
    # True: the optimised step (xdiff_cli/dfc/sparse_step.py: sparse encoder backward, pre-filtered
    # top-k, sparse decoder); False: the plain dense step it is tested and benchmarked against.
    sparse_decode: bool = True
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    buffer_tokens: int = 262_144  # the shuffle buffers' target size, all lanes together (a lane holds >= 1 shard)
    # Data lanes (ShuffledBatches): None picks the most of 8 (or a multiple of the world size)
    # that the training split allows; a checkpoint keeps its run's count.
    data_lanes: int | None = None
    # "auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16": autocast on any device (on CPU it
    # runs, mostly slower than fp32); "fp32": no autocast. Parameters and Adam stay fp32.
    precision: str = "auto"

    def validate(self) -> TrainConfig:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise XdiffError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise XdiffError(f"--lr must be positive, got {self.lr}")
        if self.recon_loss not in ("l2", "mse"):
            raise XdiffError(f"unknown reconstruction loss {self.recon_loss!r}", "use l2 or mse")
        if self.aux_form not in ("joint", "per_model"):
            raise XdiffError(f"unknown AuxK form {self.aux_form!r}", "use joint or per_model")
        if self.normalisation not in ("centred", "store"):
            raise XdiffError(f"unknown normalisation {self.normalisation!r}", "use centred or store")
        if self.precision not in PRECISION_CHOICES:
            raise XdiffError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        return self

    def autocast_bf16(self, device: torch.device) -> bool:
        """Whether the forward runs under bf16 autocast on `device`."""
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    # Resolved schedule values -----------------------------------------------------------
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, max(1, self.steps // 100))

    def anneal(self) -> int:
        return self.k_anneal_steps if self.k_anneal_steps is not None else min(5000, max(1, self.steps // 20))

    def dead_window(self) -> int:
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        return min(10_000_000, max(self.batch_size, self.steps * self.batch_size // 20))


def resolve_device(device: str) -> torch.device:
    from xdiff_cli.run.hardware import resolve_device as resolve

    return torch.device(resolve(device))


def k_at(step: int, cc: CrosscoderConfig, tc: TrainConfig) -> float:
    """k for this step: linear from k_start down to k over the annealing steps."""
    k_start = tc.k_start if tc.k_start is not None else min(1000, cc.dict_size)
    k_start = max(k_start, cc.k)
    n = tc.anneal()
    if step >= n:
        return float(cc.k)
    return k_start + (cc.k - k_start) * step / n


def lr_at(step: int, tc: TrainConfig) -> float:
    return tc.lr * min(1.0, (step + 1) / tc.warmup())


# ---------------------------------------------------------------------------------------
# Pieces of the method
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def geometric_median(x_ND: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    x = x_ND.double()
    median = x.mean(0)
    for _ in range(iters):
        weights_N = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights_N[:, None] * x).sum(0) / weights_N.sum()
        moved = (new - median).norm()
        median = new
        if moved < eps * (1 + median.norm()):
            break
    return median.to(x_ND.dtype)


NORMALISATION_SAMPLE_TOKENS = 65_536


@torch.no_grad()
def normalisation_stats(source, sample_tokens: int = NORMALISATION_SAMPLE_TOKENS):  # noqa: ANN001, ANN201
    """Per-model mean and scale for the "centred" normalisation, from the first shards of
    `source` in index order (deterministic: a resumed run, and every torchrun rank, gets
    the same numbers). Returns (mean_A, mean_B, scale_a, scale_b).

    scale_m = √((d_a+d_b)/2) / median ‖raw_m − mean_m‖: the DESIGN's median-norm rule applied to
    centred vectors, so both models bring the same variance into the loss."""
    from xdiff_cli.data.harvest import normalisation_scale

    parts_a, parts_b, rows = [], [], 0
    for index in range(source.num_shards):
        shard = source.load_shard(index)
        parts_a.append(shard.acts_a[: sample_tokens - rows].double())
        parts_b.append(shard.acts_b[: sample_tokens - rows].double())
        rows += parts_a[-1].shape[0]
        if rows >= sample_tokens:
            break
    out = []
    for raw in (torch.cat(parts_a), torch.cat(parts_b)):
        mean = raw.mean(0)
        out.append((mean.float(), normalisation_scale((raw - mean).norm(dim=1), source.d_a, source.d_b)))
    (mean_a, scale_a), (mean_b, scale_b) = out
    return mean_a, mean_b, scale_a, scale_b


@torch.no_grad()
def init_decoder_bias(model: Crosscoder, x_NA: torch.Tensor, x_NB: torch.Tensor) -> None:
    model.b_dec_A.copy_(geometric_median(x_NA.float()))
    model.b_dec_B.copy_(geometric_median(x_NB.float()))


def aux_k_losses(
    model: Crosscoder,
    acts_NF: torch.Tensor,
    resid_NA: torch.Tensor,
    resid_NB: torch.Tensor,
    dead_F: torch.Tensor,
    k_aux: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AuxK per model: the top-`k_aux` dead features (by pre-activation) reconstruct the
    main reconstruction's residual through the decoder alone (no bias).

    Each model's term goes only through that model's decoder, whose forbidden rows are zero,
    so a feature exclusive to the other model gets exactly zero gradient from it."""
    import torch.nn.functional as F

    k_aux = min(k_aux, int(dead_F.sum()))
    if k_aux == 0:
        zero = acts_NF.sum() * 0.0
        return zero, zero
    dead_acts_NF = torch.where(dead_F[None, :], acts_NF, torch.zeros_like(acts_NF))
    value_NK, feature_NK = dead_acts_NF.topk(k_aux, dim=-1, sorted=False)
    losses = []
    for W_FD, resid_ND in ((model.W_dec_FA, resid_NA), (model.W_dec_FB, resid_NB)):
        approx_ND = F.embedding_bag(feature_NK, W_FD, mode="sum", per_sample_weights=value_NK.to(W_FD.dtype))
        losses.append((resid_ND.detach() - approx_ND).pow(2).sum(-1).mean())
    return losses[0], losses[1]


def aux_k_joint(
    model: Crosscoder,
    acts_NF: torch.Tensor,
    resid_NA: torch.Tensor,
    resid_NB: torch.Tensor,
    dead_F: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """AuxK as in the paper's code: the top-`k_aux` dead features, ranked by activation ×
    Σ_m ‖d_i^m‖ (the BatchTopK score), reconstruct *both* models' residual through the
    decoders alone; the squared error is divided by the residual's total variance, so the
    term is ~1 whatever the activations' scale.

    No leak across the partition: a B-exclusive feature's A-decoder row is zero (and masked),
    so it reaches the loss only through its B reconstruction, and its activation reads x_B only."""
    import torch.nn.functional as F

    k_aux = min(k_aux, int(dead_F.sum()))
    if k_aux == 0:
        return acts_NF.sum() * 0.0
    norm_a_F, norm_b_F = model.decoder_norms()
    score_NF = acts_NF.detach() * (norm_a_F + norm_b_F).detach()
    score_NF = torch.where(dead_F[None, :], score_NF, torch.full_like(score_NF, -1.0))
    feature_NK = score_NF.topk(k_aux, dim=-1, sorted=False).indices
    value_NK = acts_NF.gather(1, feature_NK)
    sq_err, total_var = acts_NF.new_zeros(()), acts_NF.new_zeros(())
    for W_FD, resid_ND in ((model.W_dec_FA, resid_NA), (model.W_dec_FB, resid_NB)):
        resid_ND = resid_ND.detach().float()
        approx_ND = F.embedding_bag(feature_NK, W_FD, mode="sum", per_sample_weights=value_NK.to(W_FD.dtype))
        sq_err = sq_err + (resid_ND - approx_ND.float()).pow(2).sum()
        total_var = total_var + residual_variance(model, resid_ND)
    return sq_err / total_var.clamp_min(1e-12)


@dataclass
class StepOutput:
    loss: torch.Tensor
    aux_loss: torch.Tensor
    sq_err_a: torch.Tensor  # Σ‖x−x̂‖² over the batch
    sq_err_b: torch.Tensor
    var_a: torch.Tensor  # Σ‖x−mean‖² over the batch
    var_b: torch.Tensor
    n_active: torch.Tensor  # total kept activations (> 0) in the batch
    fired_F: torch.Tensor  # bool, features that fired in this batch
    min_kept: torch.Tensor


def training_forward(
    model: Crosscoder,
    x_NA: torch.Tensor,
    x_NB: torch.Tensor,
    k: float,
    dead_F: torch.Tensor,
    tc: TrainConfig,
    sync_free: bool | None = None,
) -> StepOutput:
    """One forward pass with BatchTopK and the full loss.

    `tc.sparse_decode` (the default) takes the optimised route (xdiff_cli/dfc/sparse_step.py:
    sparse encoder backward, pre-filtered top-k, AuxK over the dead columns only, sparse
    decoder); False takes the plain dense route, the reference the optimised one must equal.
    `sync_free` (default: on CUDA) picks the optimised route's fixed-size variant."""
    k_aux = tc.k_aux if tc.k_aux is not None else min(512, (model.cfg.d_a + model.cfg.d_b) // 4)
    fast = None
    # Under torchrun (`distributed.attach`) the batch top-k, threshold and AuxK variance are
    # made global through hooks on the model, which the optimised route uses too.
    if tc.sparse_decode and tc.aux_form == "joint":
        from xdiff_cli.dfc.sparse_step import sparse_forward

        if sync_free is None:
            sync_free = x_NA.device.type == "cuda"
        fast = sparse_forward(model, x_NA, x_NB, k, dead_F, k_aux, sync_free=sync_free)
        xhat_NA, xhat_NB, fired_F, n_active, min_kept = (
            fast.xhat_NA, fast.xhat_NB, fast.fired_F, fast.n_active, fast.min_kept
        )
    elif tc.sparse_decode:
        acts_NF = model.pre_activations(x_NA, x_NB).float()
        sparse, min_kept = model.batch_topk_sparse(acts_NF, k)
        xhat_NA, xhat_NB = model.decode_sparse(sparse)
        fired_F = _fired(sparse)
        n_active = (sparse.value_K > 0).sum()
    else:
        acts_NF = model.pre_activations(x_NA, x_NB).float()
        f_NF, min_kept = model.batch_topk(acts_NF, k)
        xhat_NA, xhat_NB = model.decode(f_NF)
        fired_F = (f_NF > 0).any(0)
        n_active = (f_NF > 0).sum()
    xhat_NA, xhat_NB = xhat_NA.float(), xhat_NB.float()
    resid_NA, resid_NB = x_NA - xhat_NA, x_NB - xhat_NB
    sq_err_a, sq_err_b = resid_NA.pow(2).sum(), resid_NB.pow(2).sum()
    N = x_NA.shape[0]
    if tc.recon_loss == "l2":
        # eps keeps the gradient finite for a token reconstructed exactly.
        norm_err_a = (resid_NA.pow(2).sum(-1) + 1e-12).sqrt()
        norm_err_b = (resid_NB.pow(2).sum(-1) + 1e-12).sqrt()
        recon = (norm_err_a.mean() + norm_err_b.mean()) / 2
    else:
        recon = (sq_err_a + sq_err_b) / N
    if fast is not None:
        from xdiff_cli.dfc.sparse_step import aux_joint_from_picks

        aux = aux_joint_from_picks(model, fast, resid_NA, resid_NB)
    elif tc.aux_form == "joint":
        aux = aux_k_joint(model, acts_NF, resid_NA, resid_NB, dead_F, k_aux)
    else:
        aux_a, aux_b = aux_k_losses(model, acts_NF, resid_NA, resid_NB, dead_F, k_aux)
        aux = aux_a + aux_b
    return StepOutput(
        loss=recon + tc.aux_coef * aux,
        aux_loss=aux.detach(),
        sq_err_a=sq_err_a.detach(),
        sq_err_b=sq_err_b.detach(),
        var_a=(x_NA - x_NA.mean(0)).pow(2).sum(),
        var_b=(x_NB - x_NB.mean(0)).pow(2).sum(),
        n_active=n_active,
        fired_F=fired_F,
        min_kept=min_kept.detach(),
    )


def _fired(sparse: SparseActs) -> torch.Tensor:
    counts_F = torch.bincount(sparse.feature_K[sparse.value_K > 0], minlength=sparse.dict_size)
    return counts_F > 0


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path
    steps: int
    fve_a: float
    fve_b: float
    l0: float
    dead_fraction: float
    resumed_from: int | None = None
    dead_blocks: dict[str, float] = dataclasses.field(default_factory=dict)  # dead_a/dead_b/dead_shared


class Trainer:
    """Model, optimizer, data stream and the running state that a checkpoint must hold."""

    def __init__(self, source, cc: CrosscoderConfig, tc: TrainConfig, device: torch.device, means=None, world: int = 1) -> None:  # noqa: ANN001
        self.cc, self.tc, self.device, self.source = cc, tc, device, source
        torch.manual_seed(tc.seed)
        self.model = Crosscoder(cc).to(device)
        if means is not None:  # (mean_A, mean_B) of the centred normalisation
            self.model.set_normalisation(*means)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=(0.9, 0.999))
        self.batches = ShuffledBatches(
            source, tc.batch_size, tc.seed, device, tc.buffer_tokens,
            normalise=self.model.normalise if means is not None else None,  # None: the source's scales
            lanes=lane_count(source, tc.batch_size, world, tc.data_lanes),
        )
        self.step = 0
        self.tokens_since_fired_F = torch.zeros(cc.dict_size, dtype=torch.long, device=device)
        self.threshold_ema = torch.zeros((), dtype=torch.float64, device=device)
        self.threshold_count = 0  # batches in the EMA (it restarts when k annealing ends)
        self.dist = None  # a `distributed.Dist` when this is one rank of several (`distributed.attach`)

    # --- one step ------------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.tc.dead_window()

    def train_step(self) -> StepOutput:
        tc, model = self.tc, self.model
        x_NA, x_NB = self.batches.next()
        if self.step == 0:  # under torchrun: from the whole global batch, as one process would
            if self.dist is not None:
                from xdiff_cli.dfc.distributed import gather_batch

                init_decoder_bias(model, *gather_batch(x_NA, x_NB, self.dist))
            else:
                init_decoder_bias(model, x_NA, x_NB)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, tc)
        k = k_at(self.step, self.cc, tc)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.autocast_bf16(self.device)):
            out = training_forward(model, x_NA, x_NB, k, self.dead_mask(), tc)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.dist is not None:
            from xdiff_cli.dfc.distributed import after_backward

            after_backward(self, out, x_NA, x_NB)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        self.optimizer.step()
        self._update_running_state(out)
        self.step += 1
        return out

    @torch.no_grad()
    def _update_running_state(self, out: StepOutput) -> None:
        self.tokens_since_fired_F += self.tc.batch_size
        self.tokens_since_fired_F.masked_fill_(out.fired_F, 0)  # no boolean indexing: no host sync
        # The threshold must describe the final k, so the EMA restarts once annealing ends.
        if self.step == self.tc.anneal():
            self.threshold_ema.zero_()
            self.threshold_count = 0
        beta = self.tc.threshold_beta
        self.threshold_ema.mul_(beta).add_((1 - beta) * out.min_kept.double())
        self.threshold_count += 1
        corrected = self.threshold_ema / (1 - beta**self.threshold_count)
        self.model.threshold.copy_(corrected.to(self.model.threshold.dtype))

    # --- checkpoints ---------------------------------------------------------------------
    def all_positions(self) -> dict[int, DataPosition]:
        """Every data lane's position; under torchrun gathered from all ranks (a collective)."""
        if self.dist is None:
            return self.batches.positions
        from xdiff_cli.dfc.distributed import gather_positions

        return gather_positions(self.batches.positions, self.dist)

    def save_checkpoint(self, directory: Path, positions: dict[int, DataPosition] | None = None) -> None:
        from safetensors.torch import save_file

        from xdiff_cli.atomic import atomic_path, write_json

        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save(tmp)
        tensors = {
            "tokens_since_fired_F": self.tokens_since_fired_F.cpu(),
            "threshold_ema": self.threshold_ema.cpu().reshape(1),
        }
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in self.optimizer.state.items():
            name = names[id(p)]
            tensors[f"adam.exp_avg.{name}"] = st["exp_avg"].detach().cpu().contiguous()
            tensors[f"adam.exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().cpu().contiguous()
            tensors[f"adam.step.{name}"] = torch.as_tensor(st["step"]).float().cpu().reshape(1)
        with atomic_path(tmp / "trainer.safetensors") as part:  # records the checksum too
            save_file(tensors, str(part))
        state = {
            "step": self.step,
            "threshold_count": self.threshold_count,
            "data_lanes": self.batches.lanes,
            "data_positions": [dataclasses.asdict(p) for _, p in sorted((positions or self.all_positions()).items())],
            "crosscoder_config": dataclasses.asdict(self.cc),
            "train_config": dataclasses.asdict(self.tc),
        }
        write_json(tmp / "state.json", state)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((directory / "state.json").read_text())
        saved_cc = CrosscoderConfig(**state["crosscoder_config"])
        saved_tc = state["train_config"]
        if saved_cc != self.cc or saved_tc["batch_size"] != self.tc.batch_size or saved_tc["seed"] != self.tc.seed:
            raise XdiffError(
                f"the checkpoint in {directory} was trained with different settings",
                "delete the run's crosscoder/ folder to retrain, or train in a new run",
            )
        loaded = Crosscoder.load(directory, device=self.device)
        self.model.load_state_dict(loaded.state_dict())
        tensors = load_file(str(directory / "trainer.safetensors"), device=str(self.device))
        self.tokens_since_fired_F.copy_(tensors["tokens_since_fired_F"])
        self.threshold_ema.copy_(tensors["threshold_ema"][0])
        opt_state = {}
        for i, (name, _) in enumerate(self.model.named_parameters()):
            if f"adam.exp_avg.{name}" in tensors:
                opt_state[i] = {
                    "step": tensors[f"adam.step.{name}"][0].cpu(),
                    "exp_avg": tensors[f"adam.exp_avg.{name}"],
                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"],
                }
        sd = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": sd["param_groups"]})
        self.step = state["step"]
        self.threshold_count = state["threshold_count"]
        self._seek_data(state)

    def _seek_data(self, state: dict) -> None:
        """Continue the checkpoint's data stream, in its lanes (whatever this run would pick)."""
        if "data_positions" in state:
            lanes, positions = state["data_lanes"], [DataPosition(**p) for p in state["data_positions"]]
        else:  # written before lanes: one lane, the same stream
            lanes, positions = 1, [DataPosition(**state["data_position"])]
        if lanes != self.batches.lanes:
            self.batches = self.batches.relaid(lanes)
        self.batches.seek(dict(enumerate(positions)))


def checkpoint_problem(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be resumed from (damaged files), or None."""
    from xdiff_cli.atomic import recorded_mismatch
    from xdiff_cli.integrity import crosscoder_problem, safetensors_problem

    problem = crosscoder_problem(directory) or safetensors_problem(directory / "trainer.safetensors")
    if problem:
        return problem
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "state.json is unreadable"
    needed = ("step", "threshold_count", "crosscoder_config", "train_config")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        return "state.json lacks fields"
    if "data_positions" not in state and "data_position" not in state:
        return "state.json lacks fields"
    reason = recorded_mismatch(directory / "state.json")
    return f"state.json: {reason}" if reason else None


def _resume(trainer: Trainer, out_dir: Path, make_trainer) -> Trainer:  # noqa: ANN001 - () -> Trainer
    """Load the newest sound checkpoint; damaged ones are named, removed and skipped.

    Returns the trainer to continue with (a fresh one when a damaged checkpoint was
    half-loaded, or when none is usable and training restarts from step 0)."""
    from xdiff_cli.console import err_console

    checkpoints = checkpoint_dirs(out_dir)
    for position, directory in enumerate(reversed(checkpoints)):
        problem = checkpoint_problem(directory)
        if problem is None:
            try:
                trainer.load_checkpoint(directory)
                if position:
                    err_console.print(f"[yellow]note:[/] resuming from the earlier checkpoint {directory.name}")
                return trainer
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # e.g. tensor shapes
                problem = f"it does not load ({exc.__class__.__name__})"
                trainer = make_trainer()
        err_console.print(f"[yellow]note:[/] checkpoint {directory.name} is damaged ({problem}); skipping it")
        shutil.rmtree(directory, ignore_errors=True)
    if checkpoints:
        err_console.print("[yellow]note:[/] no usable checkpoint left; training restarts from step 0")
    return trainer


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class _MetricWindow:
    """Sums over the steps since the last log line (kept on device: no per-step sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self.loss, self.aux, self.err_a, self.err_b, self.var_a, self.var_b, self.active = (z() for _ in range(7))
        self.tokens = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)

    def add(self, out: StepOutput, step: int, n_tokens: int) -> None:
        bad = ~torch.isfinite(out.loss.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)
        self.loss += out.loss.detach().double()
        self.aux += out.aux_loss.double()
        self.err_a += out.sq_err_a.double()
        self.err_b += out.sq_err_b.double()
        self.var_a += out.var_a.double()
        self.var_b += out.var_b.double()
        self.active += out.n_active.double()
        self.tokens += n_tokens


def _check_finite(window: _MetricWindow, out_dir: Path) -> None:
    bad = int(window.first_bad_step)
    if bad >= 0:
        last = checkpoint_dirs(out_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
        raise XdiffError(
            f"training diverged at step {bad + 1} (loss is not finite); {where}",
            "lower --lr (or check the activation store for inf/NaN), then rerun to resume",
        )


def train(
    source,
    cc_config: CrosscoderConfig,
    train_config: TrainConfig,
    out_dir: Path,
    progress: bool = True,
) -> TrainResult:
    """Train a crosscoder on `source`, resuming from the newest checkpoint in `out_dir`."""
    from xdiff_cli.atomic import write_json

    tc = train_config.validate()
    if (source.d_a, source.d_b) != (cc_config.d_a, cc_config.d_b):
        raise XdiffError(
            f"store widths ({source.d_a}, {source.d_b}) differ from the crosscoder's ({cc_config.d_a}, {cc_config.d_b})"
        )
    from xdiff_cli.dfc import distributed

    dist = distributed.current()
    main = dist is None or dist.is_main  # only the main process writes files
    means = None
    if tc.normalisation == "centred":
        # Rank 0 reads the sample and tells the others (it is deterministic, but W reads of
        # the same shards would cost W downloads of a remote store).
        stats = normalisation_stats(source) if main else None
        mean_a, mean_b, scale_a, scale_b = dist.broadcast_object(stats) if dist else stats
        means = (mean_a, mean_b)
    else:
        scale_a, scale_b = float(source.scale_a), float(source.scale_b)
    cc = dataclasses.replace(cc_config, scale_a=scale_a, scale_b=scale_b).validate()
    if cc.k > cc.dict_size:
        raise XdiffError(f"--k ({cc.k}) cannot exceed the dictionary size ({cc.dict_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from xdiff_cli.atomic import clean_temp_files

    device = resolve_device(distributed.rank_device(tc.device, dist))
    if main:
        clean_temp_files(out_dir)  # what a killed or disk-full run left half-written
    # Rank 0 picks the checkpoint first (removing damaged ones); the other ranks then find
    # only sound ones, so every rank resumes from the same step.
    def make_trainer() -> Trainer:
        return Trainer(source, cc, tc, device, means, world=dist.world if dist else 1)

    trainer = _resume(make_trainer(), out_dir, make_trainer) if main else None
    if dist is not None:
        dist.barrier()
        if not main:
            trainer = _resume(make_trainer(), out_dir, make_trainer)
        distributed.attach(trainer, dist)  # after the resume: its batch slice keeps the resumed position
        progress = progress and main
    if main:
        _note_cache_shortfall(source, tc, dist)
    resumed_from = trainer.step or None
    metrics_path = out_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, trainer.step)
    window = _MetricWindow(device)
    last: dict[str, float] = {}
    started = time.perf_counter()

    with _progress_bar(progress, tc.steps, trainer.step) as bar:
        while trainer.step < tc.steps:
            out = trainer.train_step()
            window.add(out, trainer.step - 1, tc.batch_size)
            step = trainer.step
            at_log = step % tc.log_every == 0 or step == tc.steps
            at_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
            if at_log or at_ckpt:
                world_window = distributed.reduce_window(window, dist) if dist else window
                _check_finite(world_window, out_dir)
            if at_log:
                last = _log_line(trainer, world_window, step, time.perf_counter() - started)
                if main:
                    with open(metrics_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(last) + "\n")
                window.reset()
                bar.update(last)
            if at_ckpt:
                positions = trainer.all_positions()  # every rank takes part under torchrun
                if main:
                    _save_and_prune(trainer, out_dir, positions)
                if dist is not None:
                    dist.barrier()  # nobody runs ahead of a checkpoint it may have to resume from
            bar.advance()

    if not last:  # resumed from the very last checkpoint: its log line is already written
        last = _last_logged(metrics_path)
    final_dir = out_dir / "final"
    if main:
        trainer.model.save(final_dir)
        # The lane count the run used (resolved from the store, or kept from a checkpoint).
        write_json(out_dir / "final" / "train_config.json", dataclasses.asdict(dataclasses.replace(tc, data_lanes=trainer.batches.lanes)))
    if dist is not None:
        dist.barrier()
    return TrainResult(
        out_dir=out_dir,
        final_dir=final_dir,
        steps=trainer.step,
        fve_a=last.get("fve_a", float("nan")),
        fve_b=last.get("fve_b", float("nan")),
        l0=last.get("l0", float("nan")),
        dead_fraction=last.get("dead_fraction", float("nan")),
        resumed_from=resumed_from,
        dead_blocks={key: value for key, value in last.items() if key.startswith("dead_") and key != "dead_fraction"},
    )


def _note_cache_shortfall(source, tc: TrainConfig, dist) -> None:  # noqa: ANN001
    """Say so when a remote store's cache is too small for the epochs ahead (data/remote.py)."""
    if getattr(source, "store", None) is None:
        return
    from xdiff_cli.console import err_console
    from xdiff_cli.data.remote import cache_shortfall_note

    # Ranks on one machine share its cache and read disjoint lanes: this machine's share.
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) / dist.world if dist else 1.0
    note = cache_shortfall_note(source, tc.steps * tc.batch_size / max(1, source.n_tokens), share)
    if note:
        err_console.print(f"[yellow]note:[/] {note}")


def _log_line(trainer: Trainer, window: _MetricWindow, step: int, elapsed: float) -> dict[str, float]:
    n_steps = max(1, window.tokens // trainer.tc.batch_size)
    return {
        "step": step,
        "loss": float(window.loss) / n_steps,
        "aux_loss": float(window.aux) / n_steps,
        "fve_a": 1.0 - float(window.err_a) / max(float(window.var_a), 1e-12),
        "fve_b": 1.0 - float(window.err_b) / max(float(window.var_b), 1e-12),
        "l0": float(window.active) / max(window.tokens, 1),
        "dead_fraction": float(trainer.dead_mask().float().mean()),
        **dead_by_block(trainer.model, trainer.dead_mask()),
        "k": k_at(step - 1, trainer.cc, trainer.tc),
        "lr": lr_at(step - 1, trainer.tc),
        "threshold": float(trainer.model.threshold),
        "elapsed_s": round(elapsed, 3),
    }


def dead_by_block(model: Crosscoder, dead_F: torch.Tensor) -> dict[str, float]:
    """`dead_a`, `dead_b` (DFC only) and `dead_shared`: the dead fraction of each block."""
    out = {}
    for partition in ("a", "b", "shared"):
        block = model.cfg.block(partition)
        if len(block):
            out[f"dead_{partition}"] = float(dead_F[block.start : block.stop].float().mean())
    return out


def _logged_lines(path: Path) -> list[dict[str, float]]:
    """The complete log lines; a line cut short by a kill or a full disk is left out."""
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    return lines


def _last_logged(path: Path) -> dict[str, float]:
    lines = _logged_lines(path)
    return lines[-1] if lines else {}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be rewritten)."""
    if not path.exists():
        return
    from xdiff_cli.atomic import write_text

    keep = [line for line in _logged_lines(path) if line["step"] <= step]
    write_text(path, "".join(json.dumps(line) + "\n" for line in keep))


def _save_and_prune(trainer: Trainer, out_dir: Path, positions: dict[int, DataPosition]) -> None:
    from safetensors import SafetensorError

    from xdiff_cli.atomic import disk_full_error, is_disk_full

    target = out_dir / "checkpoints" / f"step-{trainer.step:07d}"
    try:
        trainer.save_checkpoint(target, positions)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(target.with_name(f".{target.name}.tmp"), ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(target) from exc
        raise
    for old in checkpoint_dirs(out_dir)[: -trainer.tc.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


class _progress_bar:
    """`console.stage_progress` with the training fields, or a no-op when disabled."""

    FIELDS = "loss {task.fields[loss]:.4g} fve {task.fields[fve_a]:.3f}/{task.fields[fve_b]:.3f} L0 {task.fields[l0]:.0f} dead {task.fields[dead]:.1%}"

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self) -> _progress_bar:
        if self.enabled:
            from xdiff_cli.console import stage_progress

            self.progress = stage_progress("step", show_fields=self.FIELDS)
            self.progress.__enter__()
            self.task = self.progress.add_task(
                "train", total=self.total, completed=self.start, loss=float("nan"), fve_a=0.0, fve_b=0.0, l0=0.0, dead=0.0
            )
        return self

    def update(self, line: dict[str, float]) -> None:
        if self.enabled:
            self.progress.update(
                self.task,
                loss=line["loss"],
                fve_a=line["fve_a"],
                fve_b=line["fve_b"],
                l0=line["l0"],
                dead=line["dead_fraction"],
            )

    def advance(self) -> None:
        if self.enabled:
            self.progress.advance(self.task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)


# ---------------------------------------------------------------------------------------
# The pipeline stage
# ---------------------------------------------------------------------------------------


def configs_from_settings(settings, d_a: int, d_b: int) -> tuple[CrosscoderConfig, TrainConfig]:  # noqa: ANN001
    """CrosscoderConfig and TrainConfig from a run's `RunSettings`."""
    dict_size = settings.dict_size_for(d_a, d_b)
    cc = CrosscoderConfig(
        d_a=d_a, d_b=d_b, dict_size=dict_size, k=settings.k, exclusive_frac=settings.exclusive_frac, arch=settings.arch
    )
    tc = TrainConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed,
        device=settings.device,
        precision=settings.precision,
        checkpoint_every=max(1, min(1000, settings.steps // 10)),
        log_every=max(1, min(50, settings.steps // 20)),
    )
    return cc, tc


def train_run(run, progress: bool = True) -> TrainResult:  # noqa: ANN001 - xdiff_cli.run.runs.Run
    """The `train` stage of a run: reads `run.store_dir`, writes `run.crosscoder_dir`.

    Returns at once when `final/` exists; resumes from the newest checkpoint otherwise.
    Records final metrics in run.json; marking the stage done is the stage runner's job."""
    out_dir = Path(run.crosscoder_dir)
    final_dir = out_dir / "final"
    from xdiff_cli.integrity import crosscoder_problem

    problem = crosscoder_problem(final_dir) if final_dir.exists() else "missing"
    from xdiff_cli.dfc.distributed import current

    main = current() is None or current().is_main
    if problem not in (None, "missing", "model.safetensors is missing") and main:
        from xdiff_cli.console import err_console

        err_console.print(f"[yellow]note:[/] the trained crosscoder in {final_dir} is damaged ({problem}); "
                          "finishing training again from the last checkpoint")
        shutil.rmtree(final_dir, ignore_errors=True)
    if problem is None:
        m = run.metrics
        return TrainResult(
            out_dir,
            final_dir,
            steps=run.settings.steps,
            fve_a=m.get("fve_a", float("nan")),
            fve_b=m.get("fve_b", float("nan")),
            l0=m.get("l0", float("nan")),
            dead_fraction=m.get("dead_fraction", float("nan")),
            dead_blocks={key: m[key] for key in ("dead_a", "dead_b", "dead_shared") if key in m},
        )
    if not run.settings.store and not Path(run.store_dir).exists():
        raise XdiffError(f"run {run.id} has no activation store yet", "run `xdiff harvest` first")
    source = run.open_store().split("train")
    cc, tc = configs_from_settings(run.settings, source.d_a, source.d_b)
    result = train(source, cc, tc, out_dir, progress=progress)
    if not main:  # rank 0 records the metrics
        return result
    run.drop_metrics("eval_")  # held-out numbers of an older crosscoder's analysis no longer apply
    run.set_metrics(
        fve_a=result.fve_a, fve_b=result.fve_b, l0=result.l0, dead_fraction=result.dead_fraction,
        **result.dead_blocks,
    )
    return result


def train_stage(run, ctx) -> None:  # noqa: ANN001 - runs.Run, stages.StageContext
    """The train stage for the stage runner (and, under torchrun, `stages.run_rank_stage`).

    Under torchrun rank 0 comes here from the stage runner, with the run's settings updated,
    a stale crosscoder removed and the inputs checked; the other ranks wait for it here, then
    read the run as rank 0 left it."""
    dist = getattr(ctx, "dist", None)
    if dist is not None:
        dist.barrier()
        if not dist.is_main:
            run = run.reload()
    train_run(run, progress=ctx.progress)
