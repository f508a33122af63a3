"""The DFC paper's toy setting (§2.3, after Sharkey et al.): two "models" that see the same
ground-truth concepts, a few of which only one of them has, and the scoring that asks
whether a crosscoder recovered them.

    concepts   n unit directions c_i in R^d; a share of them exclusive to A, same to B
    model A    x_A = Σ_{i fires, i not B-only} m_i c_i + ε
    model B    x_B = Σ_{i fires, i not A-only} m_i c'_i + ε,   c'_i = M c_i + b rescaled
               (M_ij ~ N(0, 0.25), b_j ~ N(0, 0.01) — second argument = variance — then every
               c'_i scaled by one factor so their median norm is the originals' median, 1)
    firing     correlated Bernoulli: logit_i = base_logit_i + (L z)_i, z ~ N(0, I_rank),
               base probabilities decaying with i (a few common concepts, a long sparse tail)
    magnitude  m_i ~ U(0, 1), the same in both models;  noise ε ~ N(0, σ² I)

A concept is recovered when some decoder vector has cosine > 0.8 with it (A-decoders are
compared with c_i, B-decoders with c'_i). See `score_recovery` for the exact counting rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xdiff_cli.findings.ranking import EXCLUSIVE_R_HIGH, EXCLUSIVE_R_LOW

COSINE_MATCH = 0.8


@dataclass
class ToyConfig:
    n_concepts: int = 2048
    d: int = 256
    exclusive_frac: float = 0.025  # of the concepts, exclusive to *each* model
    corr_rank: int = 10
    corr_scale: float = 0.5  # std of the low-rank logit perturbation
    p_max: float = 0.02  # firing probability of the most common concept
    p_min: float = 0.002  # ... and of the rarest
    noise: float = 0.01
    map_var: float = 0.25
    bias_var: float = 0.01
    seed: int = 0

    @property
    def n_exclusive(self) -> int:
        return int(round(self.n_concepts * self.exclusive_frac))


class ToyWorld:
    """Ground truth of one toy setting; `sample(n)` draws aligned activations of A and B."""

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        n, d = cfg.n_concepts, cfg.d
        C_nd = rng.standard_normal((n, d))
        self.concepts_a = C_nd / np.linalg.norm(C_nd, axis=1, keepdims=True)
        M_dd = rng.normal(0.0, np.sqrt(cfg.map_var), (d, d))
        b_d = rng.normal(0.0, np.sqrt(cfg.bias_var), d)
        C_b = self.concepts_a @ M_dd.T + b_d
        self.concepts_b = C_b / np.median(np.linalg.norm(C_b, axis=1))
        # Which concepts only one model has: a random subset, so frequency and exclusivity
        # are independent.
        order = rng.permutation(n)
        self.only_a = np.sort(order[: cfg.n_exclusive])
        self.only_b = np.sort(order[cfg.n_exclusive : 2 * cfg.n_exclusive])
        self.shared = np.sort(order[2 * cfg.n_exclusive :])
        in_a = np.ones(n, bool)
        in_a[self.only_b] = False
        in_b = np.ones(n, bool)
        in_b[self.only_a] = False
        self.in_a, self.in_b = in_a, in_b
        # Decaying base probabilities (log-linear from p_max to p_min), in random concept order.
        p_n = np.exp(np.linspace(np.log(cfg.p_max), np.log(cfg.p_min), n))[rng.permutation(n)]
        self.base_logit = np.log(p_n / (1 - p_n))
        self.corr_L = rng.normal(0.0, cfg.corr_scale / np.sqrt(cfg.corr_rank), (n, cfg.corr_rank))
        self._sample_rng = np.random.default_rng([cfg.seed, 1])

    def sample(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n_tokens` aligned activation pairs (float32 tensors [n, d] each)."""
        cfg, rng = self.cfg, self._sample_rng
        z_NR = rng.standard_normal((n_tokens, cfg.corr_rank))
        p_NC = 1.0 / (1.0 + np.exp(-(self.base_logit + z_NR @ self.corr_L.T)))
        fires_NC = rng.random(p_NC.shape) < p_NC
        mag_NC = rng.random(p_NC.shape) * fires_NC
        x_a = (mag_NC * self.in_a) @ self.concepts_a + rng.normal(0, cfg.noise, (n_tokens, cfg.d))
        x_b = (mag_NC * self.in_b) @ self.concepts_b + rng.normal(0, cfg.noise, (n_tokens, cfg.d))
        return torch.from_numpy(x_a).float(), torch.from_numpy(x_b).float()

    def mean_active(self, n_tokens: int = 2000) -> float:
        rng = np.random.default_rng(0)
        z = rng.standard_normal((n_tokens, self.cfg.corr_rank))
        p = 1.0 / (1.0 + np.exp(-(self.base_logit + z @ self.corr_L.T)))
        return float(p.sum(1).mean())


@dataclass
class Recovery:
    """Counts for one crosscoder; recalls are fractions of the concepts of that kind."""

    excl_recall: float  # exclusive concepts matched by a feature labelled exclusive to the right model
    excl_recall_anywhere: float  # ... matched by any feature's decoder for that model
    shared_recall: float  # shared concepts matched by one feature in both decoders
    false_pos: int  # shared concepts matched by a feature labelled exclusive
    n_exclusive_features: int


def exclusive_labels(model) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 - Crosscoder
    """Boolean [F] masks: features labelled A-exclusive and B-exclusive.

    The DFC labels by block; the standard crosscoder by relative decoder norm
    R = ‖d^A‖ / (‖d^A‖ + ‖d^B‖): A-exclusive when R > 0.8, B-exclusive when R < 0.2."""
    cfg = model.cfg
    if cfg.arch == "dfc":
        labels = np.array(model.partition_labels())
        return torch.from_numpy(labels == "a"), torch.from_numpy(labels == "b")
    norm_a, norm_b = model.decoder_norms()
    R = norm_a / (norm_a + norm_b).clamp_min(1e-12)
    return (R > EXCLUSIVE_R_HIGH).cpu(), (R < EXCLUSIVE_R_LOW).cpu()


def _cosines(W_FD: torch.Tensor, concepts_CD: np.ndarray) -> torch.Tensor:
    W = W_FD.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    C = torch.from_numpy(concepts_CD).float()
    return C @ W.T  # [concepts, F]


@torch.no_grad()
def score_recovery(model, world: ToyWorld) -> Recovery:  # noqa: ANN001 - Crosscoder
    """Recall of exclusive and shared concepts and false positives, as defined above."""
    label_a, label_b = exclusive_labels(model)
    cos_a = _cosines(model.W_dec_FA, world.concepts_a) > COSINE_MATCH  # [C, F]
    cos_b = _cosines(model.W_dec_FB, world.concepts_b) > COSINE_MATCH
    hit_a_excl = cos_a[:, label_a].any(1).numpy()
    hit_b_excl = cos_b[:, label_b].any(1).numpy()
    excl = np.concatenate([hit_a_excl[world.only_a], hit_b_excl[world.only_b]])
    anywhere = np.concatenate([cos_a.any(1).numpy()[world.only_a], cos_b.any(1).numpy()[world.only_b]])
    shared_hit = (cos_a & cos_b).any(1).numpy()[world.shared]
    false_pos = (hit_a_excl | hit_b_excl)[world.shared]
    return Recovery(
        excl_recall=float(excl.mean()),
        excl_recall_anywhere=float(anywhere.mean()),
        shared_recall=float(shared_hit.mean()),
        false_pos=int(false_pos.sum()),
        n_exclusive_features=int(label_a.sum() + label_b.sum()),
    )


def toy_source(world: ToyWorld, n_tokens: int, shard_size: int = 16_384):
    """An in-memory activation source over `n_tokens` samples of `world`."""
    from xdiff_cli.dfc.training import InMemorySource

    x_a, x_b = world.sample(n_tokens)
    return InMemorySource(x_a, x_b, shard_size=shard_size)
