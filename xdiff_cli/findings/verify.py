"""Verify stage: evidence that a candidate difference is really absent from the other model.

Input: a trained crosscoder, the activation store's train and eval splits, and the run's
`analysis.sqlite` (which features fire on held-out text). Output: one evidence row per
feature in the `verify_evidence` table of that same file, a `verify` meta entry, and the
default ranking (`features.rank`) redone so that verified differences come first.

1. Transfer probe (every live feature, any block). A ridge regression predicts the
   feature's activation from each model's normalised residual: from the *other* model
   (does it encode the feature?) and from the feature's *own* model (the ceiling). Closed
   form for all features at once: one streaming pass over (part of) the train split
   accumulates XᵀX and XᵀF per model, one Cholesky solve per model, then one pass over the
   eval split scores held-out R² and the AUC of "fires vs not" (histogram-binned).
   For a shared feature the "own" model is whichever predicts it better; if the other
   cannot, it is a difference found in the shared block.
2. Null control (`null_thresholds`): the same probe on a crosscoder trained A vs A sets
   the thresholds, and counts how many "exclusive" features the method makes with no
   real difference.
3. Causal specificity (`steer_check`): steer the feature in its own model, and its
   decoder direction mapped through the least-squares linear map between the residual
   streams (fitted in the same pass) in the other model; mean KL of next-token
   distributions on a fixed prompt set, in each.

Verdicts: `exclusive` (own model predicts it, the other does not), `analogous` (the other
model predicts it too), `dead` (never fires on held-out text), `weak` (too rare, or too
poorly predicted even by its own model, to judge). Shared features that are not candidate
differences and whose probe agrees get no verdict (null): nothing was claimed about them.

Shape suffixes: N tokens in a batch, F probed (live) features, D a model's width (+1 for
the intercept column), K histogram bins.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from xdiff_cli.errors import XdiffError
from xdiff_cli.findings.analysis import normalised_rows
from xdiff_cli.findings.feature_index import (
    VERDICTS,
    Evidence,
    update_steer_checks,
    write_evidence,
)


@dataclass
class VerifyConfig:
    ridge: float = 0.1  # ridge λ, relative to the mean diagonal of the centred XᵀX
    folds: int = 4  # word-type folds: each token is predicted by a fit on the other folds' words
    max_train_tokens: int | None = None  # train tokens for the fit; default: as many as the eval split
    batch_tokens: int = 4096
    auc_bins: int = 256  # predictions binned per feature over [-0.5, 1.5] × its train max
    min_fires: int = 10  # fewer held-out firings than this: weak
    min_ceiling_auc: float = 0.75  # its own model's held-out AUC below this: weak (cannot judge)
    transfer_ratio: float = 0.5  # exclusive when the other model reaches < this share of its own AUC above chance ...
    max_other_auc: float = 0.9  # ... and the other model's AUC is below this
    device: str = "cpu"


@dataclass
class Thresholds:
    """The decision thresholds and where they came from (defaults, or a null run)."""

    transfer_ratio: float
    max_other_auc: float
    source: str = "defaults"
    null_run: dict[str, Any] | None = None

    @classmethod
    def defaults(cls, cfg: VerifyConfig) -> Thresholds:
        return cls(cfg.transfer_ratio, cfg.max_other_auc)


class Split(Protocol):
    """What verify needs from `ActivationStore.split(...)`."""

    n_tokens: int
    num_shards: int
    scale_a: float
    scale_b: float

    def load_shard(self, index: int) -> Any: ...


# --- the transfer probe -------------------------------------------------------------------


@dataclass
class RidgeFit:
    """Per model: weights W [D, F], intercept b [F], the centring mean m [D]."""

    W_DF: torch.Tensor
    b_F: torch.Tensor
    mean_D: torch.Tensor

    def predict(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND - self.mean_D) @ self.W_DF + self.b_F


class GramAccumulator:
    """Streams Σx, Σy, XᵀX, XᵀY (shifted by the first batch's mean, float64) for a ridge fit."""

    def __init__(self) -> None:
        self.n = 0
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None

    def start(self, shift_x: torch.Tensor, shift_y: torch.Tensor) -> GramAccumulator:
        """Zero sums around a given shift (accumulators sharing a shift can be summed)."""
        self.shift_x, self.shift_y = shift_x.double(), shift_y.double()
        D, F, device = shift_x.numel(), shift_y.numel(), shift_x.device
        self.sx = torch.zeros(D, dtype=torch.float64, device=device)
        self.sy = torch.zeros(F, dtype=torch.float64, device=device)
        self.xx = torch.zeros(D, D, dtype=torch.float64, device=device)
        self.xy = torch.zeros(D, F, dtype=torch.float64, device=device)
        return self

    @classmethod
    def total(cls, parts: list[GramAccumulator]) -> GramAccumulator:
        """The accumulator of all `parts`' tokens (they must share one shift)."""
        out = cls().start(parts[0].shift_x, parts[0].shift_y)
        for part in parts:
            out.n += part.n
            out.sx += part.sx
            out.sy += part.sy
            out.xx += part.xx
            out.xy += part.xy
        return out

    def add(self, x_ND: torch.Tensor, y_NF: torch.Tensor) -> None:
        x_ND, y_NF = x_ND.double(), y_NF.double()
        if self.shift_x is None:
            self.start(x_ND.mean(0), y_NF.mean(0))
        xc, yc = x_ND - self.shift_x, y_NF - self.shift_y
        self.n += x_ND.shape[0]
        self.sx += xc.sum(0)
        self.sy += yc.sum(0)
        self.xx += xc.T @ xc
        self.xy += xc.T @ yc

    def solve(self, ridge: float) -> RidgeFit:
        """Centred ridge regression: (C_xx + λI) W = C_xy, λ = ridge × mean diag(C_xx)."""
        if self.n < 2 or self.shift_x is None:
            raise XdiffError("too few train tokens to fit the transfer probe", "harvest more tokens")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * torch.outer(mx, mx)
        cxy = self.xy - self.n * torch.outer(mx, my)
        lam = ridge * float(cxx.diagonal().mean().clamp_min(1e-12))
        eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
        chol, info = torch.linalg.cholesky_ex(cxx + lam * eye)
        if int(info) != 0:  # numerically singular even with the ridge: a stronger one
            chol = torch.linalg.cholesky(cxx + (lam + 1e-6 * float(cxx.diagonal().abs().max())) * eye)
        W = torch.cholesky_solve(cxy, chol)
        mean_x = self.shift_x + mx
        b = self.shift_y + my
        return RidgeFit(W.float(), b.float(), mean_x.float())


def fit_ridge(x_ND: torch.Tensor, y_NF: torch.Tensor, ridge: float = 1e-3, batch: int = 4096) -> RidgeFit:
    """The closed-form probe on in-memory data (tests, small inputs)."""
    acc = GramAccumulator()
    for lo in range(0, x_ND.shape[0], batch):
        acc.add(x_ND[lo : lo + batch], y_NF[lo : lo + batch])
    return acc.solve(ridge)


class HeldOutScore:
    """Streams held-out R² and a binned AUC of "fires vs not" for every probed feature."""

    def __init__(self, scale_F: torch.Tensor, bins: int) -> None:
        F = scale_F.numel()
        device = scale_F.device
        self.scale_F, self.bins = scale_F.clamp_min(1e-12), bins
        self.sse = torch.zeros(F, dtype=torch.float64, device=device)
        self.sy = torch.zeros(F, dtype=torch.float64, device=device)
        self.syy = torch.zeros(F, dtype=torch.float64, device=device)
        self.n = 0
        self.pos = torch.zeros(F * bins, dtype=torch.int64, device=device)
        self.all = torch.zeros(F * bins, dtype=torch.int64, device=device)

    def add(self, pred_NF: torch.Tensor, y_NF: torch.Tensor) -> None:
        self.n += y_NF.shape[0]
        self.sse += (pred_NF - y_NF).double().square().sum(0)
        self.sy += y_NF.double().sum(0)
        self.syy += y_NF.double().square().sum(0)
        u = (pred_NF / self.scale_F + 0.5) / 2.0  # [-0.5, 1.5] × scale → [0, 1]
        bin_NF = (u * self.bins).long().clamp_(0, self.bins - 1)
        flat = bin_NF + torch.arange(y_NF.shape[1], device=y_NF.device) * self.bins
        self.all += torch.bincount(flat.flatten(), minlength=self.all.numel())
        self.pos += torch.bincount(flat[y_NF > 0], minlength=self.pos.numel())

    def r2(self) -> torch.Tensor:
        n = max(1, self.n)
        sst = self.syy - self.sy.square() / n
        return torch.where(sst > 0, 1 - self.sse / sst.clamp_min(1e-30), torch.full_like(sst, float("nan"))).float()

    def auc(self) -> torch.Tensor:
        """P(score of a firing token > score of a silent one), ties counted half; NaN if one class is empty."""
        pos = self.pos.view(-1, self.bins).double()
        neg = self.all.view(-1, self.bins).double() - pos
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        neg_below = neg.cumsum(1) - neg
        wins = (pos * (neg_below + 0.5 * neg)).sum(1)
        ok = (n_pos > 0) & (n_neg > 0)
        return torch.where(ok, wins / (n_pos * n_neg).clamp_min(1), torch.full_like(wins, float("nan"))).float()

    def n_fires(self) -> torch.Tensor:
        return self.pos.view(-1, self.bins).sum(1)




def _spread_shards(n_shards: int, n_tokens: int, wanted: int) -> list[int]:
    """Evenly spaced shard indices holding about `wanted` of the split's `n_tokens`."""
    if n_shards == 0:
        return []
    count = n_shards if wanted >= n_tokens else max(1, math.ceil(n_shards * wanted / max(1, n_tokens)))
    return sorted({round(i * (n_shards - 1) / max(1, count - 1)) for i in range(count)}) if count > 1 else [0]


def fit_tokens(train: Split, wanted: int) -> int:
    """Tokens the fit reads: whole shards, so usually a little more than `wanted`."""
    shards = _spread_shards(train.num_shards, train.n_tokens, wanted)
    sizes = getattr(train, "shard_tokens", None)
    return sum(sizes(i) for i in shards) if sizes else min(wanted, train.n_tokens)


def word_folds(shard: Any, documents: Any | None, shard_index: int, k: int = 2) -> torch.Tensor:
    """Fold (0..k-1) of every pair in a shard: a hash of its word type (the aligned span's text,
    stripped and lower-cased), so all occurrences of one word fall in the same fold.

    Without documents (in-memory splits), a fixed pseudo-random fold per row."""
    n = int(shard.acts_a.shape[0])
    if documents is None:
        gen = torch.Generator().manual_seed(1_000_003 * shard_index + 17)
        return torch.randint(0, k, (n,), generator=gen)
    folds = []
    for doc, sa, sb, e in zip(shard.doc_id.tolist(), shard.start_a.tolist(), shard.start_b.tolist(),
                              shard.end.tolist(), strict=True):
        word = documents.text(doc)[min(sa, sb) : e].strip().lower()
        folds.append(zlib.crc32(word.encode("utf-8")) % k)
    return torch.tensor(folds, dtype=torch.int64)


@dataclass
class ProbeFit:
    """Per model and word-type fold k, the ridge fit that predicts fold k's tokens (fitted on
    the other fold's word types only), and the residual-stream maps (fitted on all)."""

    features: torch.Tensor  # [F] feature ids probed
    fits: dict[str, list[RidgeFit]]  # side -> [fit that predicts fold k, for each fold k]
    scale_F: torch.Tensor  # [F] max activation seen in the train pass (AUC binning unit)
    map_ab: torch.Tensor  # [d_a, d_b]: x_b ≈ x_a @ map_ab (+ const), least squares
    map_ba: torch.Tensor  # [d_b, d_a]
    n_train: int

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"features": self.features, "scale_F": self.scale_F, "map_ab": self.map_ab, "map_ba": self.map_ba}
        for side, fits in self.fits.items():
            for k, fit in enumerate(fits):
                out |= {f"W_{side}{k}": fit.W_DF, f"b_{side}{k}": fit.b_F, f"mean_{side}{k}": fit.mean_D}
        out["n_train"] = torch.tensor([self.n_train])
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ProbeFit:
        n_folds = sum(1 for key in t if key.startswith("W_a"))
        fits = {
            side: [RidgeFit(t[f"W_{side}{k}"], t[f"b_{side}{k}"], t[f"mean_{side}{k}"]) for k in range(n_folds)]
            for side in ("a", "b")
        }
        return cls(t["features"], fits, t["scale_F"], t["map_ab"], t["map_ba"], int(t["n_train"][0]))


@torch.no_grad()
def fit_probes(
    crosscoder: Any, train: Split, features: torch.Tensor, cfg: VerifyConfig,
    advance: Callable[[int], None] = lambda n: None, documents: Any | None = None,
) -> ProbeFit:
    """One streaming pass over (evenly spread shards of) the train split; one solve per model and fold."""
    device = torch.device(cfg.device)
    wanted = cfg.max_train_tokens if cfg.max_train_tokens is not None else train.n_tokens
    shards = _spread_shards(train.num_shards, train.n_tokens, wanted)
    feats = features.to(device)
    K = cfg.folds
    acc: dict[str, list[GramAccumulator]] = {"a": [], "b": []}
    map_ab, map_ba = GramAccumulator(), GramAccumulator()
    scale_F = torch.zeros(feats.numel(), device=device)
    for shard_index in shards:
        shard = train.load_shard(shard_index)
        fold_N = word_folds(shard, documents, shard_index, K).to(device)
        n_rows = int(shard.acts_a.shape[0])
        for lo in range(0, n_rows, cfg.batch_tokens):
            rows = slice(lo, min(n_rows, lo + cfg.batch_tokens))
            x_a, x_b = normalised_rows(shard, crosscoder, rows, device)
            y_NF = crosscoder.encode(x_a, x_b)[:, feats]
            if not acc["a"]:  # every fold shares the first batch's shift, so folds can be summed
                for side, x in (("a", x_a), ("b", x_b)):
                    acc[side] = [GramAccumulator().start(x.mean(0), y_NF.mean(0)) for _ in range(K)]
            scale_F = torch.maximum(scale_F, y_NF.max(0).values)
            fold = fold_N[rows]
            for k in range(K):
                mask = fold == k
                if bool(mask.any()):
                    acc["a"][k].add(x_a[mask], y_NF[mask])
                    acc["b"][k].add(x_b[mask], y_NF[mask])
            map_ab.add(x_a, x_b)
            map_ba.add(x_b, x_a)
            advance(x_a.shape[0])
    if not acc["a"]:
        raise XdiffError("too few train tokens to fit the transfer probe", "harvest more tokens")
    # Fold k's tokens are predicted by a fit on every other fold's word types.
    fits = {
        side: [GramAccumulator.total([a for j, a in enumerate(acc[side]) if j != k]).solve(cfg.ridge) for k in range(K)]
        for side in ("a", "b")
    }
    return ProbeFit(
        feats.cpu(), fits, scale_F.cpu(), map_ab.solve(cfg.ridge).W_DF, map_ba.solve(cfg.ridge).W_DF,
        sum(a.n for a in acc["a"]),
    )


@dataclass
class ProbeScores:
    """Held-out scores per probed feature (aligned with `features`)."""

    features: list[int]
    r2_a: list[float]
    r2_b: list[float]
    auc_a: list[float]
    auc_b: list[float]
    n_fires: list[int]
    n_tokens: int


@torch.no_grad()
def score_probes(
    crosscoder: Any, eval_split: Split, fit: ProbeFit, cfg: VerifyConfig,
    advance: Callable[[int], None] = lambda n: None, documents: Any | None = None,
) -> ProbeScores:
    device = torch.device(cfg.device)
    feats = fit.features.to(device)
    fits = {
        side: [RidgeFit(*(t.to(device) for t in (f.W_DF, f.b_F, f.mean_D))) for f in fit.fits[side]]
        for side in ("a", "b")
    }
    scale = fit.scale_F.to(device)
    scores = {side: HeldOutScore(scale, cfg.auc_bins) for side in ("a", "b")}
    for shard_index in range(eval_split.num_shards):
        shard = eval_split.load_shard(shard_index)
        fold_N = word_folds(shard, documents, 7919 + shard_index, len(fit.fits["a"])).to(device)
        n_rows = int(shard.acts_a.shape[0])
        for lo in range(0, n_rows, cfg.batch_tokens):
            rows = slice(lo, min(n_rows, lo + cfg.batch_tokens))
            x = dict(zip(("a", "b"), normalised_rows(shard, crosscoder, rows, device), strict=True))
            y_NF = crosscoder.encode(x["a"], x["b"])[:, feats]
            fold = fold_N[rows]
            for side in ("a", "b"):
                pred_NF = torch.empty_like(y_NF)
                for k, fit_k in enumerate(fits[side]):
                    mask = fold == k
                    if bool(mask.any()):
                        pred_NF[mask] = fit_k.predict(x[side][mask])
                scores[side].add(pred_NF, y_NF)
            advance(y_NF.shape[0])
    sa, sb = scores["a"], scores["b"]
    return ProbeScores(
        feats.tolist(), sa.r2().tolist(), sb.r2().tolist(), sa.auc().tolist(), sb.auc().tolist(),
        sa.n_fires().tolist(), sa.n,
    )


# --- verdicts -----------------------------------------------------------------------------


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def auc_transfer(own_auc: float | None, other_auc: float | None) -> float:
    """How much of its own model's above-chance AUC the other model reaches, in [0, 1]."""
    if own_auc is None or own_auc <= 0.5:
        return float("nan")
    return min(1.0, max(0.0, ((other_auc if other_auc is not None else 0.5) - 0.5) / (own_auc - 0.5)))


def judge(
    feature_id: int, partition: str, candidate: bool, n_fires_analysis: int, scores: dict[str, Any] | None,
    thresholds: Thresholds, cfg: VerifyConfig,
) -> Evidence:
    """The verdict for one feature from its held-out probe scores (None: it was not probed = dead).

    AUC decides (it survives word-type holdout, where magnitudes and so R² often do not);
    R² is reported beside it."""
    if n_fires_analysis <= 0 or scores is None or scores["n_fires"] == 0:
        return Evidence(feature_id, "dead", "high", "never fires on held-out text", n_fires_eval=0)
    r2 = {"a": _finite(scores["r2_a"]), "b": _finite(scores["r2_b"])}
    auc = {"a": _finite(scores["auc_a"]), "b": _finite(scores["auc_b"])}
    if partition in ("a", "b"):
        own = partition
    else:  # shared: the model that predicts it better is its "own"
        own = "a" if (auc["a"] or 0.0) >= (auc["b"] or 0.0) else "b"
    other = "b" if own == "a" else "a"
    ev = Evidence(
        feature_id, own_side=own, probe_r2=r2[other], probe_auc=auc[other], ceiling_r2=r2[own], ceiling_auc=auc[own],
        r2_a=r2["a"], r2_b=r2["b"], auc_a=auc["a"], auc_b=auc["b"], n_fires_eval=int(scores["n_fires"]),
    )
    own_name, other_name = own.upper(), other.upper()
    judgeable = (auc[own] or 0.0) >= cfg.min_ceiling_auc
    transfer = auc_transfer(auc[own], auc[other])
    absent = judgeable and transfer < thresholds.transfer_ratio and (auc[other] or 0.5) < thresholds.max_other_auc
    evidence = (
        f"held-out AUC {other_name} {_fmt(auc[other])} vs {own_name} {_fmt(auc[own])}; "
        f"R² {_fmt(r2[other])} vs {_fmt(r2[own])}"
    )
    if partition == "shared" and not candidate and not absent:
        ev.reason = f"shared, no claim to check ({evidence})"
        return ev  # nothing was claimed and nothing found: no verdict
    if ev.n_fires_eval < cfg.min_fires:
        ev.verdict, ev.confidence = "weak", "low"
        ev.reason = f"too rare to judge: {ev.n_fires_eval} held-out firings ({evidence})"
        return ev
    if not judgeable:
        ev.verdict, ev.confidence = "weak", "low"
        ev.reason = (
            f"even {own_name} does not predict it on words held out of the fit (AUC {_fmt(auc[own])}; e.g. a "
            f"one-word feature): absence from {other_name} cannot be judged"
        )
        return ev
    margin = (thresholds.transfer_ratio - transfer) / max(thresholds.transfer_ratio, 1e-9)
    if absent:
        ev.verdict = "exclusive"
        ev.found_in_shared = int(partition == "shared")
        ev.confidence = "high" if margin > 0.5 and ev.n_fires_eval >= 50 else "medium" if margin > 0.2 else "low"
        where = "found in the shared block: " if partition == "shared" else ""
        ev.reason = f"{where}{own_name} encodes it, {other_name} does not ({evidence})"
    else:
        ev.verdict = "analogous"
        strong = transfer >= min(1.0, 1.5 * thresholds.transfer_ratio) or (auc[other] or 0) >= thresholds.max_other_auc
        ev.confidence = "high" if strong and ev.n_fires_eval >= 50 else "medium"
        ev.reason = f"{other_name} encodes it too ({evidence})"
    return ev


def null_thresholds(null_evidence: list[Evidence], cfg: VerifyConfig, quantile: float = 0.01) -> Thresholds:
    """Thresholds no looser than the defaults and below (almost) everything a null run shows.

    In an A-vs-A run no feature is a real difference, so the low tail of its AUC transfers
    and other-model AUCs is how low they get with no difference at all; a real difference
    must fall below that tail (its `quantile`)."""
    transfers, aucs = [], []
    for ev in null_evidence:
        if (ev.n_fires_eval or 0) < cfg.min_fires or (ev.ceiling_auc or 0.0) < cfg.min_ceiling_auc:
            continue
        transfers.append(auc_transfer(ev.ceiling_auc, ev.probe_auc))
        aucs.append(ev.probe_auc if ev.probe_auc is not None else 1.0)
    if not transfers:
        return Thresholds.defaults(cfg)
    q_transfer = float(torch.tensor(transfers).quantile(quantile))
    q_auc = float(torch.tensor(aucs).quantile(quantile))
    return Thresholds(
        min(cfg.transfer_ratio, q_transfer), min(cfg.max_other_auc, q_auc), source="null run",
        null_run={"n_features_judged": len(transfers), "transfer_q": round(q_transfer, 4), "auc_q": round(q_auc, 4)},
    )


# --- entry points ---------------------------------------------------------------------------


@dataclass
class FeatureFacts:
    """What verify reads about each feature from the analysis."""

    id: int
    partition: str
    candidate: bool
    n_fires: int


def read_feature_facts(index_path: Path) -> list[FeatureFacts]:
    from xdiff_cli.findings.feature_index import FeatureIndex

    index = FeatureIndex.open(index_path)
    try:
        rows = index._db.execute("SELECT id, partition, candidate, n_fires FROM features ORDER BY id").fetchall()
    finally:
        index.close()
    return [FeatureFacts(int(r[0]), r[1], bool(r[2]), int(r[3])) for r in rows]


@dataclass
class VerifySummary:
    counts: dict[str, dict[str, int]]  # partition -> verdict -> count
    found_in_shared: int
    thresholds: dict[str, Any]
    n_probed: int
    n_train_tokens: int
    n_eval_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    false_positives: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def probe_run_scores(
    crosscoder: Any, train: Split, eval_split: Split, facts: list[FeatureFacts], cfg: VerifyConfig,
    *, fit_path: Path | None = None, progress: bool = False, documents: Any | None = None,
) -> tuple[ProbeFit, ProbeScores, dict[str, float]]:
    """Fit (or reload a saved fit from `fit_path`) and score the probe for every live feature."""
    live = torch.tensor([f.id for f in facts if f.n_fires > 0], dtype=torch.int64)
    seconds: dict[str, float] = {}
    with _Progress(progress) as bars:
        fit = _load_fit(fit_path, live)
        if fit is None:
            started = time.monotonic()
            fit_cfg = _with_default_train(cfg, eval_split)
            bars.start("verify: fit transfer probes (train tokens)", fit_tokens(train, int(fit_cfg.max_train_tokens)))
            fit = fit_probes(crosscoder, train, live, fit_cfg, bars.advance, documents)
            seconds["fit"] = round(time.monotonic() - started, 2)
            if fit_path is not None:
                _save_fit(fit_path, fit)
        started = time.monotonic()
        bars.start("verify: score on held-out tokens", eval_split.n_tokens)
        scores = score_probes(crosscoder, eval_split, fit, cfg, bars.advance, documents)
        seconds["score"] = round(time.monotonic() - started, 2)
    return fit, scores, seconds


def _with_default_train(cfg: VerifyConfig, eval_split: Split) -> VerifyConfig:
    from dataclasses import replace

    if cfg.max_train_tokens is not None:
        return cfg
    # One extra pass of the eval split's size, but never fewer than 32 tokens per dimension
    # of the wider residual (a ridge fit on fewer would mostly measure noise).
    width = 64
    for name in ("d_a", "d_b"):
        try:
            width = max(width, int(getattr(eval_split, name, 0) or 0))
        except (KeyError, TypeError, ValueError):  # a split that does not know its widths
            pass
    return replace(cfg, max_train_tokens=max(eval_split.n_tokens, 32 * width))


def _save_fit(path: Path, fit: ProbeFit) -> None:
    from safetensors.torch import save_file

    from xdiff_cli.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(fit.tensors(), str(tmp))


def _load_fit(path: Path | None, live: torch.Tensor) -> ProbeFit | None:
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        fit = ProbeFit.from_tensors(load_file(str(path)))
    except Exception:  # noqa: BLE001 - a damaged resume point is refitted, not trusted
        return None
    return fit if torch.equal(fit.features, live) else None


def verify(
    crosscoder: Any, train: Split, eval_split: Split, index_path: Path, *, config: VerifyConfig | None = None,
    thresholds: Thresholds | None = None, fit_path: Path | None = None, progress: bool = False,
    extra_meta: dict[str, Any] | None = None, is_null: bool = False, documents: Any | None = None,
) -> VerifySummary:
    """Probe every live feature, judge every feature, write the evidence into `index_path`.

    With `documents` (the store: `document_text(doc_id)`), the probe is cross-fitted over
    word types: each token is predicted by a fit that never saw its word, so a model that
    merely tells the words apart does not pass for one that carries the concept."""
    from xdiff_cli.findings.analysis import _Documents

    cfg = config or VerifyConfig()
    thresholds = thresholds or Thresholds.defaults(cfg)
    if eval_split.num_shards == 0 or eval_split.n_tokens == 0:
        raise XdiffError("the activation store has no held-out tokens to verify on", "rerun `xdiff harvest`")
    if train.num_shards == 0:
        raise XdiffError("the activation store has no train tokens to fit the transfer probe", "rerun `xdiff harvest`")
    facts = read_feature_facts(index_path)
    crosscoder = crosscoder.to(cfg.device).eval()
    docs = _Documents(documents) if documents is not None else None
    fit, scores, seconds = probe_run_scores(
        crosscoder, train, eval_split, facts, cfg, fit_path=fit_path, progress=progress, documents=docs
    )
    by_id = {
        fid: {"r2_a": scores.r2_a[i], "r2_b": scores.r2_b[i], "auc_a": scores.auc_a[i], "auc_b": scores.auc_b[i],
              "n_fires": scores.n_fires[i]}
        for i, fid in enumerate(scores.features)
    }
    evidence = [judge(f.id, f.partition, f.candidate, f.n_fires, by_id.get(f.id), thresholds, cfg) for f in facts]
    summary = summarize(facts, evidence, thresholds, scores, fit.n_train, seconds)
    if is_null:  # A vs A: every live exclusive-block feature and every candidate is a false positive
        summary.false_positives = false_positive_count(facts, evidence)
    meta = {**summary.to_json(), **(extra_meta or {}), "config": asdict(cfg), "complete": True}
    write_evidence(Path(index_path), evidence, meta)
    return summary


def summarize(
    facts: list[FeatureFacts], evidence: list[Evidence], thresholds: Thresholds, scores: ProbeScores, n_train: int,
    seconds: dict[str, float],
) -> VerifySummary:
    counts: dict[str, dict[str, int]] = {p: {v: 0 for v in (*VERDICTS, "none")} for p in ("a", "b", "shared")}
    for f, e in zip(facts, evidence, strict=True):
        counts[f.partition][e.verdict or "none"] += 1
    return VerifySummary(
        counts=counts,
        found_in_shared=sum(e.found_in_shared for e in evidence),
        thresholds=asdict(thresholds),
        n_probed=len(scores.features),
        n_train_tokens=n_train,
        n_eval_tokens=scores.n_tokens,
        seconds=seconds,
    )


def false_positive_count(facts: list[FeatureFacts], evidence: list[Evidence]) -> dict[str, int]:
    """In a null (A vs A) run: what the partition calls a difference, and what verify still does."""
    return {
        "live_exclusive_block": sum(1 for f in facts if f.partition in ("a", "b") and f.n_fires > 0),
        "candidates": sum(1 for f in facts if f.candidate and f.n_fires > 0),
        "verified_exclusive": sum(1 for e in evidence if e.verdict == "exclusive"),
    }


def verify_meta(index_path: Path) -> dict[str, Any] | None:
    """The `verify` meta entry of an analysis (None if not verified)."""
    from xdiff_cli.findings.feature_index import FeatureIndex

    index = FeatureIndex.open(index_path)
    try:
        return index.meta.get("verify")
    finally:
        index.close()


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from xdiff_cli.console import stage_progress

            self.bar = stage_progress("tok")
            self.bar.start()
        return self

    def start(self, title: str, total: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(title, total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- run-level stage: verify_run, null control, steer check -------------------------------


class MirrorSplit:
    """A split seen as model A against itself (the null control): B's side is A's, exactly."""

    def __init__(self, split: Any) -> None:
        self.split = split
        self.n_tokens, self.num_shards = split.n_tokens, split.num_shards
        self.d_a = self.d_b = split.d_a
        self.scale_a = self.scale_b = split.scale_a

    def load_shard(self, index: int) -> Any:
        from xdiff_cli.data.store import Shard

        s = self.split.load_shard(index)
        return Shard(acts_a=s.acts_a, acts_b=s.acts_a, doc_id=s.doc_id, start_a=s.start_a, start_b=s.start_a, end=s.end)


def null_dir(run: Any) -> Path:
    return Path(run.dir) / "verify" / "null"


def null_control(run: Any, cfg: VerifyConfig, *, progress: bool = True) -> tuple[Thresholds, dict[str, Any]]:
    """Train the run's configuration on A vs A (same text, seed + 1), analyse and probe it.

    Every step resumes (training checkpoints, the analysis file, the probe fit); returns
    the thresholds its probe scores set and its false-positive counts."""
    import dataclasses

    from xdiff_cli.dfc.crosscoder import Crosscoder
    from xdiff_cli.dfc.training import configs_from_settings, train
    from xdiff_cli.findings.analysis import AnalysisConfig, analysis_is_valid, analyze
    from xdiff_cli.findings.feature_index import FeatureIndex

    out = null_dir(run)
    store = run.open_store()
    train_split, eval_split = MirrorSplit(store.split("train")), MirrorSplit(store.split("eval"))
    settings = run.settings
    cc, tc = configs_from_settings(settings, train_split.d_a, train_split.d_a)
    tc = dataclasses.replace(tc, seed=settings.seed + 1, device=cfg.device)
    if not (out / "crosscoder" / "final" / "model.safetensors").is_file():
        train(train_split, cc, tc, out / "crosscoder", progress=progress)
    crosscoder = Crosscoder.load(out / "crosscoder" / "final", device=cfg.device)
    index_path = out / "analysis.sqlite"
    if not analysis_is_valid(index_path):
        analyze(crosscoder, eval_split, store, index_path, config=AnalysisConfig(top_k=5, device=cfg.device),
                meta={"run_id": f"{run.id} (null: A vs A)"}, progress=progress)
    meta = verify_meta(index_path)
    if not (meta and meta.get("complete")):
        verify(crosscoder, train_split, eval_split, index_path, config=cfg, fit_path=out / "probe_fit.safetensors",
               progress=progress, is_null=True, documents=store)
    index = FeatureIndex.open(index_path)
    try:
        evidence = list(index.evidence.values())
    finally:
        index.close()
    facts = read_feature_facts(index_path)
    thresholds = null_thresholds(evidence, cfg)
    by_id = {e.id: e for e in evidence}
    rejudged = [
        judge(f.id, f.partition, f.candidate, f.n_fires, _scores_of(by_id.get(f.id)), thresholds, cfg) for f in facts
    ]
    false_positives = false_positive_count(facts, rejudged) | {
        "verified_exclusive_defaults": sum(1 for e in evidence if e.verdict == "exclusive"),
        "n_features": len(facts),
        "dir": str(out),
    }
    thresholds.null_run = (thresholds.null_run or {}) | {"false_positives": false_positives}
    return thresholds, false_positives


def _scores_of(ev: Evidence | None) -> dict[str, Any] | None:
    if ev is None or ev.verdict == "dead":
        return None
    nan = float("nan")
    return {
        "r2_a": nan if ev.r2_a is None else ev.r2_a, "r2_b": nan if ev.r2_b is None else ev.r2_b,
        "auc_a": nan if ev.auc_a is None else ev.auc_a, "auc_b": nan if ev.auc_b is None else ev.auc_b,
        "n_fires": ev.n_fires_eval or 0,
    }


STEER_PROMPTS = (
    "The weather today is",
    "Tell me about your favourite animal.",
    "In 1989 the city council decided to",
    "Here is a short story about a red house near the river:",
    "The most important thing to remember is",
    "Please list three colours and three numbers.",
)


def _prompt_log_probs(loaded: Any, ids: list[int]) -> torch.Tensor:
    import torch as _torch

    with _torch.inference_mode():
        tensor = _torch.tensor([ids], device=loaded.input_device)
        return _torch.log_softmax(loaded.model(input_ids=tensor, use_cache=False).logits[0].float(), dim=-1)


def steer_kl(loaded: Any, layer: int, vector_D: torch.Tensor, prompts: tuple[str, ...] = STEER_PROMPTS) -> float:
    """Mean over prompts (and positions) of KL(steered ‖ plain) of next-token distributions."""
    from xdiff_cli.findings.steering import mean_kl, steer

    kls = []
    for prompt in prompts:
        ids = loaded.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        plain = _prompt_log_probs(loaded, ids)
        with steer(loaded, layer, vector_D):
            steered = _prompt_log_probs(loaded, ids)
        kls.append(mean_kl(steered, plain))
    return sum(kls) / len(kls)


def mapped_direction(fit: ProbeFit, crosscoder: Any, feature: int, own: str) -> torch.Tensor:
    """The feature's own decoder row carried into the other model's (normalised) residual
    space by the least-squares linear map between the two streams."""
    d_own = (crosscoder.W_dec_FA if own == "a" else crosscoder.W_dec_FB)[feature].detach().float().cpu()
    return d_own @ (fit.map_ab if own == "a" else fit.map_ba)


def steer_check_run(run: Any, n: int, *, alpha: float = 4.0, device: str | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[int, tuple[float, float]]:
    """KL in the own and the other model for the top `n` verified candidates; resumes (skips checked ones)."""
    from safetensors.torch import load_file

    from xdiff_cli.findings.feature_index import FeatureIndex
    from xdiff_cli.findings.steering import Steerer

    fit_path = Path(run.dir) / "verify" / "probe_fit.safetensors"
    if not fit_path.is_file():
        raise XdiffError("the transfer probe has not been fitted for this run", "run `xdiff verify` first")
    fit = ProbeFit.from_tensors(load_file(str(fit_path)))
    index = FeatureIndex.open(run.analysis_path)
    try:
        todo = [f for f in index.features(sort="rank") if f.verdict in ("exclusive", "analogous")][:n]
        done = {f.id for f in todo if f.kl_own is not None}
        own_sides = {f.id: index.evidence[f.id].own_side for f in todo}
        s_max = {f.id: f.max_activation for f in todo}
    finally:
        index.close()
    steerer = Steerer(run, device=device)
    cc = steerer.crosscoder
    results: dict[int, tuple[float, float]] = {}
    for f in todo:
        if f.id in done:
            continue
        own = own_sides[f.id]
        other = "b" if own == "a" else "a"
        if progress:
            progress(f"steer check: feature {f.id} in {own.upper()} and, mapped, in {other.upper()}")
        from xdiff_cli.findings.steering import steering_vector

        v_own = steering_vector(cc, f.id, own, s_max[f.id], alpha)
        scale_other = cc.cfg.scale_a if other == "a" else cc.cfg.scale_b
        v_other = alpha * s_max[f.id] * mapped_direction(fit, cc, f.id, own) / scale_other
        kl_own = steer_kl(steerer.load(own), steerer.layer(own), v_own)
        kl_other = steer_kl(steerer.load(other), steerer.layer(other), v_other)
        results[f.id] = (kl_own, kl_other)
        update_steer_checks(run.analysis_path, {f.id: (kl_own, kl_other)})  # per feature: resumable
    steerer.close()
    return results


def is_null_run(run: Any) -> bool:
    """A run of a model against itself (`xdiff run --null A`, or `xdiff run A A`)."""
    settings = run.settings
    return str(settings.model_a).strip().lower() == str(settings.model_b).strip().lower()


def verify_run(
    run: Any, *, progress: bool = True, force: bool = False, null: bool = False, steer_check: int = 0,
    config: VerifyConfig | None = None,
) -> dict[str, Any]:
    """The verify stage of a run: evidence in `run.analysis_path`; idempotent and resumable.

    Returns the `verify` meta entry (summary, thresholds, null-run false positives)."""
    from xdiff_cli.dfc.crosscoder import Crosscoder
    from xdiff_cli.findings.analysis import pick_device

    cfg = config or VerifyConfig(device=pick_device(run.settings.device))
    meta = verify_meta(run.analysis_path)
    fit_path = Path(run.dir) / "verify" / "probe_fit.safetensors"
    null = null and not is_null_run(run)  # a null run is its own control
    fresh = (
        meta is None or not meta.get("complete") or force or not fit_path.is_file()
        or (null and meta.get("false_positives") is None)
    )
    if fresh:
        thresholds, false_positives = None, None
        if null:
            thresholds, false_positives = null_control(run, cfg, progress=progress)
        crosscoder = Crosscoder.load(run.crosscoder_dir / "final", device=cfg.device)
        store = run.open_store()
        if force:
            fit_path.unlink(missing_ok=True)
        verify(
            crosscoder, store.split("train"), store.split("eval"), run.analysis_path, config=cfg,
            thresholds=thresholds, fit_path=fit_path, progress=progress,
            extra_meta={"false_positives": false_positives} if false_positives is not None else None,
            is_null=is_null_run(run), documents=store,
        )
        meta = verify_meta(run.analysis_path)
    if steer_check > 0:
        say = None
        if progress:
            from xdiff_cli.console import console

            say = console.print
        steer_check_run(run, steer_check, device=None if cfg.device == "cpu" else cfg.device, progress=say)
        meta = verify_meta(run.analysis_path)
    assert meta is not None
    return meta


def verify_stage(run: Any, ctx: Any) -> None:
    """The `verify` stage of `xdiff run` (the stage runner marks it)."""
    verify_run(run, progress=getattr(ctx, "progress", True))
