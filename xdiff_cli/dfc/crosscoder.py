"""The (Dedicated Feature) Crosscoder: a sparse autoencoder over two models at once.

    f    = BatchTopK(ReLU(x_a W_enc_a + x_b W_enc_b + b_enc))
    x̂_a = f W_dec_a + b_dec_a ;   x̂_b = f W_dec_b + b_dec_b

Feature ids are laid out in three contiguous blocks (DFC, Jiralerspong & Bricken 2026):

    [0, n_ex)              A-exclusive: reads x_a only, writes x̂_a only
    [n_ex, 2 n_ex)         B-exclusive: reads x_b only, writes x̂_b only
    [2 n_ex, dict_size)    shared:      reads and writes both

With `arch="crosscoder"` n_ex = 0 and every feature is shared (the standard baseline).
Forbidden weights are zero at init and gradient hooks zero their gradients, so with Adam
(no weight decay) their moments stay zero and they stay exactly zero forever.

Shape suffixes: A/B = d_a/d_b model widths, F = dict_size, N = tokens in a batch.
All activations here are *normalised*: (raw − mean) × scale per model (`normalise`). The
scalars `scale_a`/`scale_b` live in the config and the per-dimension means in the buffers
`mean_A`/`mean_B`, so steering can map decoder vectors back to a model's raw residual space.
Crosscoders trained before the means existed load with zero means (scale only), unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xdiff_cli.errors import XdiffError
from xdiff_cli.run.settings import exclusive_size

PARTITIONS = ("a", "b", "shared")


@dataclass
class SparseActs:
    """Batch top-k activations as a bag of (token, feature, value) triples, sorted by token.

    `offsets_N[n]` is where token n's entries start, so the layout is exactly what
    `torch.nn.functional.embedding_bag` wants: the decoder then reads only the k·N active
    rows instead of multiplying the whole dense [N, F] matrix."""

    feature_K: torch.Tensor  # int64 feature id of each kept entry
    value_K: torch.Tensor  # its activation (0 for padding entries that were not positive)
    offsets_N: torch.Tensor  # int64 start of each token's entries
    n_tokens: int
    dict_size: int

    def to_dense(self) -> torch.Tensor:
        token_K = torch.repeat_interleave(
            torch.arange(self.n_tokens, device=self.offsets_N.device),
            torch.diff(self.offsets_N, append=self.offsets_N.new_tensor([self.feature_K.numel()])),
        )
        dense_NF = self.value_K.new_zeros(self.n_tokens, self.dict_size)
        return dense_NF.index_put((token_K, self.feature_K), self.value_K, accumulate=True)


@dataclass
class CrosscoderConfig:
    d_a: int
    d_b: int
    dict_size: int
    k: int = 200
    exclusive_frac: float = 0.05
    arch: str = "dfc"  # "dfc" | "crosscoder"
    dec_init_norm: float = 0.4
    # Exclusive decoder rows start with the Σ_m ‖d_i^m‖ (BatchTopK's ranking norm) of an
    # average shared row instead of the same L2 norm (which ranks them ~1/√2 lower).
    balance_exclusive_init: bool = True
    scale_a: float = 1.0  # (raw activation − mean_A) × scale_a = normalised activation
    scale_b: float = 1.0

    @property
    def n_exclusive(self) -> int:
        """Features in *each* exclusive block."""
        return exclusive_size(self.dict_size, self.exclusive_frac, self.arch)

    @property
    def n_shared(self) -> int:
        return self.dict_size - 2 * self.n_exclusive

    def block(self, partition: str) -> range:
        n = self.n_exclusive
        return {"a": range(0, n), "b": range(n, 2 * n), "shared": range(2 * n, self.dict_size)}[partition]

    def partition_of(self, feature: int) -> str:
        if not 0 <= feature < self.dict_size:
            raise XdiffError(f"feature {feature} is out of range", f"valid ids are 0..{self.dict_size - 1}")
        n = self.n_exclusive
        return "a" if feature < n else "b" if feature < 2 * n else "shared"

    def validate(self) -> CrosscoderConfig:
        if self.arch not in ("dfc", "crosscoder"):
            raise XdiffError(f"unknown crosscoder arch {self.arch!r}", "use dfc or crosscoder")
        if self.n_shared < 0 or self.dict_size <= 0:
            raise XdiffError(f"dict_size {self.dict_size} is too small for exclusive_frac {self.exclusive_frac}")
        return self


class Crosscoder(nn.Module):
    def __init__(self, cfg: CrosscoderConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        F, A, B = cfg.dict_size, cfg.d_a, cfg.d_b
        self.W_enc_AF = nn.Parameter(torch.empty(A, F))
        self.W_enc_BF = nn.Parameter(torch.empty(B, F))
        self.b_enc_F = nn.Parameter(torch.zeros(F))
        self.W_dec_FA = nn.Parameter(torch.empty(F, A))
        self.W_dec_FB = nn.Parameter(torch.empty(F, B))
        self.b_dec_A = nn.Parameter(torch.zeros(A))
        self.b_dec_B = nn.Parameter(torch.zeros(B))
        # Which features may touch which model (the partition), as float masks.
        reads_a = torch.ones(F)
        reads_b = torch.ones(F)
        reads_a[cfg.block("b").start : cfg.block("b").stop] = 0.0
        reads_b[cfg.block("a").start : cfg.block("a").stop] = 0.0
        self.register_buffer("mask_a_F", reads_a)
        self.register_buffer("mask_b_F", reads_b)
        # Inference threshold on the ranking score; < 0 means "not calibrated yet".
        self.register_buffer("threshold", torch.tensor(-1.0))
        # Per-dimension means of each model's raw residual, subtracted before scaling (zero: scale only).
        self.register_buffer("mean_A", torch.zeros(A))
        self.register_buffer("mean_B", torch.zeros(B))
        self.reset_parameters()
        self._install_gradient_masks()

    # --- init ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows at norm `dec_init_norm` (split across the models a feature writes),
        encoder = decoder transpose; forbidden weights exactly zero."""
        cfg = self.cfg
        for W in (self.W_dec_FA, self.W_dec_FB):
            nn.init.normal_(W)
        self.W_dec_FA.mul_(self.mask_a_F[:, None])
        self.W_dec_FB.mul_(self.mask_b_F[:, None])
        norm_F = torch.sqrt(self.W_dec_FA.pow(2).sum(-1) + self.W_dec_FB.pow(2).sum(-1)).clamp_min(1e-8)
        scale_F = cfg.dec_init_norm / norm_F
        self.W_dec_FA.mul_(scale_F[:, None])
        self.W_dec_FB.mul_(scale_F[:, None])
        if cfg.balance_exclusive_init and cfg.n_exclusive and cfg.n_shared:
            norm_a_F, norm_b_F = self.decoder_norms()
            shared = cfg.block("shared")
            target = float((norm_a_F + norm_b_F)[shared.start : shared.stop].mean())
            exclusive = slice(0, 2 * cfg.n_exclusive)
            for W in (self.W_dec_FA, self.W_dec_FB):
                W[exclusive] *= target / cfg.dec_init_norm
        self.W_enc_AF.copy_(self.W_dec_FA.T)
        self.W_enc_BF.copy_(self.W_dec_FB.T)
        self.b_enc_F.zero_()
        self.b_dec_A.zero_()
        self.b_dec_B.zero_()

    def _install_gradient_masks(self) -> None:
        # Gradient hooks are what keep forbidden weights at zero: no loss term (AuxK
        # included) can move them, and Adam's moments for them stay zero.
        self.W_enc_AF.register_hook(lambda g: g * self.mask_a_F[None, :])
        self.W_enc_BF.register_hook(lambda g: g * self.mask_b_F[None, :])
        self.W_dec_FA.register_hook(lambda g: g * self.mask_a_F[:, None])
        self.W_dec_FB.register_hook(lambda g: g * self.mask_b_F[:, None])

    # --- forward ------------------------------------------------------------------------
    def normalise(self, raw_NA: torch.Tensor, raw_NB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw residuals (any float dtype) → this crosscoder's float32 input space."""
        x_NA = (raw_NA.to(torch.float32) - self.mean_A) * self.cfg.scale_a
        x_NB = (raw_NB.to(torch.float32) - self.mean_B) * self.cfg.scale_b
        return x_NA, x_NB

    @torch.no_grad()
    def set_normalisation(self, mean_A: torch.Tensor, mean_B: torch.Tensor) -> None:
        self.mean_A.copy_(mean_A)
        self.mean_B.copy_(mean_B)

    def pre_activations(self, x_NA: torch.Tensor, x_NB: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_NA @ self.W_enc_AF + x_NB @ self.W_enc_BF + self.b_enc_F)

    def decoder_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature L2 norms of the A and B decoder rows."""
        return self.W_dec_FA.norm(dim=-1), self.W_dec_FB.norm(dim=-1)

    def ranking_scores(self, acts_NF: torch.Tensor) -> torch.Tensor:
        """f_i · Σ_m ‖d_i^m‖: the score BatchTopK and the threshold rank features by."""
        norm_a_F, norm_b_F = self.decoder_norms()
        return acts_NF * (norm_a_F + norm_b_F)

    def batch_topk(self, acts_NF: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the k·N highest-scoring activations over the whole batch (k per token on average).

        Returns the sparse activations and the smallest score that was kept."""
        scores_NF = self.ranking_scores(acts_NF)
        n_keep = max(1, min(int(round(k * acts_NF.shape[0])), scores_NF.numel()))
        top_values, top_index = scores_NF.flatten().topk(n_keep, sorted=False)
        mask = torch.zeros_like(scores_NF).flatten()
        mask.scatter_(0, top_index, 1.0)
        mask = mask.view_as(acts_NF) * (acts_NF > 0)
        kept = top_values[top_values > 0]
        min_kept = kept.min() if kept.numel() else torch.zeros((), device=acts_NF.device)
        return acts_NF * mask, min_kept

    def batch_topk_sparse(self, acts_NF: torch.Tensor, k: float) -> tuple[SparseActs, torch.Tensor]:
        """Same selection as `batch_topk`, returned as `SparseActs` for `decode_sparse`."""
        N, F = acts_NF.shape
        scores_NF = self.ranking_scores(acts_NF)
        n_keep = max(1, min(int(round(k * N)), scores_NF.numel()))
        top_scores_K, flat_K = scores_NF.flatten().topk(n_keep, sorted=False)
        # Sorting the flat index groups entries by token, which embedding_bag needs.
        flat_K, order_K = flat_K.sort()
        top_scores_K = top_scores_K[order_K]
        token_K, feature_K = flat_K // F, flat_K % F
        value_K = acts_NF.flatten()[flat_K]  # differentiable gather
        offsets_N = torch.searchsorted(token_K, torch.arange(N, device=acts_NF.device))
        positive = top_scores_K > 0
        inf = torch.full_like(top_scores_K, float("inf"))
        min_kept = torch.where(positive, top_scores_K, inf).min()
        min_kept = torch.where(torch.isinf(min_kept), torch.zeros_like(min_kept), min_kept)
        return SparseActs(feature_K, value_K, offsets_N, N, F), min_kept

    def threshold_activations(self, acts_NF: torch.Tensor) -> torch.Tensor:
        """Inference: a learned global threshold on the ranking score replaces the batch top-k."""
        if float(self.threshold) < 0:
            raise XdiffError("this crosscoder has no calibrated threshold", "train it for at least one step")
        return acts_NF * (self.ranking_scores(acts_NF) > self.threshold)

    def encode(self, x_NA: torch.Tensor, x_NB: torch.Tensor, k: float | None = None) -> torch.Tensor:
        """Sparse feature activations: batch top-k when `k` is given (training), else threshold."""
        acts_NF = self.pre_activations(x_NA, x_NB)
        if k is not None:
            return self.batch_topk(acts_NF, k)[0]
        return self.threshold_activations(acts_NF)

    def decode(self, f_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return f_NF @ self.W_dec_FA + self.b_dec_A, f_NF @ self.W_dec_FB + self.b_dec_B

    def decode_sparse(self, acts: SparseActs) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` for sparse activations: reads only the active decoder rows."""
        import torch.nn.functional as F

        outs = []
        for W_FD, b_D in ((self.W_dec_FA, self.b_dec_A), (self.W_dec_FB, self.b_dec_B)):
            x_ND = F.embedding_bag(
                acts.feature_K, W_FD, acts.offsets_N, mode="sum", per_sample_weights=acts.value_K.to(W_FD.dtype)
            )
            outs.append(x_ND + b_D)
        return outs[0], outs[1]

    def forward(self, x_NA: torch.Tensor, x_NB: torch.Tensor, k: float | None = None):
        f_NF = self.encode(x_NA, x_NB, k)
        return (*self.decode(f_NF), f_NF)

    # --- partition helpers --------------------------------------------------------------
    def partition_labels(self) -> list[str]:
        cfg = self.cfg
        return ["a"] * cfg.n_exclusive + ["b"] * cfg.n_exclusive + ["shared"] * cfg.n_shared

    def forbidden_weights(self) -> dict[str, torch.Tensor]:
        """Views of every weight the partition forbids (all must be exactly zero)."""
        a, b = self.cfg.block("a"), self.cfg.block("b")
        return {
            "W_enc_AF[:, b]": self.W_enc_AF[:, b.start : b.stop],
            "W_enc_BF[:, a]": self.W_enc_BF[:, a.start : a.stop],
            "W_dec_FA[b]": self.W_dec_FA[b.start : b.stop],
            "W_dec_FB[a]": self.W_dec_FB[a.start : a.stop],
        }

    # --- persistence ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """`model.safetensors` + `config.json`, each written atomically."""
        from safetensors.torch import save_file

        from xdiff_cli.atomic import atomic_path, write_json

        directory = Path(directory)
        tensors = {name: t.detach().float().contiguous().cpu() for name, t in self.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "xdiff-crosscoder"})
        write_json(directory / "config.json", dataclasses.asdict(self.cfg))

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> Crosscoder:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            cfg = CrosscoderConfig(**json.loads((directory / "config.json").read_text()))
            state = load_file(str(directory / "model.safetensors"), device=str(device))
        except FileNotFoundError as exc:
            raise XdiffError(f"no trained crosscoder in {directory}", "run `xdiff train` first") from exc
        except (json.JSONDecodeError, TypeError, SafetensorError, OSError) as exc:
            raise XdiffError(f"the crosscoder in {directory} is corrupt ({exc})", "retrain with `xdiff train`") from exc
        model = cls(cfg).to(device)
        for name in ("mean_A", "mean_B"):  # saved before the means existed: scale-only normalisation
            state.setdefault(name, torch.zeros_like(getattr(model, name)))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise XdiffError(f"the crosscoder in {directory} does not match its config", "retrain it") from exc
        return model
