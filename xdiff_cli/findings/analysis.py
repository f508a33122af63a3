"""Analysis stage: turn a trained crosscoder into per-feature findings a person can read.

One streaming pass over the held-out ("eval") split of the activation store encodes every
aligned token pair (threshold inference) and accumulates, per feature:

    n_fires, sum, max (s_max)        frequency, mean and max activation
    log-spaced histogram             activation distribution (cropped to the used range)
    (feature, word type) mass        breadth, top word type, tokenization-artifact check
    a capped top-activation pool     top examples that show breadth (<= `per_type_cap`
                                     examples per word type, `pool_factor`·K kept)

A second, short pass loads only the shards holding chosen examples, cuts a context window
of the document text around each, and recomputes the feature's activation at every aligned
token inside the window (for highlighting). Results go to `analysis.sqlite` through
`FeatureIndexWriter` (temporary file renamed into place).

Shape suffixes: N = token pairs in a batch, F = features, A/B = model widths, C = pool
candidates per feature, W = tokens in an example window.

Default ranking (see RANKING_HELP, shown by `xdiff features --help`): candidates first,
tokenization artifacts and dead features last, broad and consistent features first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from xdiff_cli.errors import XdiffError
from xdiff_cli.findings.ranking import ARTIFACT_SHARE, EXCLUSIVE_R_HIGH, EXCLUSIVE_R_LOW, RANKING_HELP  # noqa: E402,F401

JUNK_SHARE = 0.5  # share of firing mass on junk tokens/positions that makes a feature an artifact
JUNK_POSITIONS = 2  # a document's first aligned tokens (attention sinks) count as junk
_TYPE_BITS = 32  # (feature, word type) pairs are packed into one int64 key


@dataclass
class AnalysisConfig:
    top_k: int = 20  # examples kept per feature (per view)
    pool_factor: int = 4  # candidates kept per feature while streaming = pool_factor * top_k
    per_type_cap: int = 3  # at most this many examples whose firing token is the same word type
    window_tokens_before: int = 12  # aligned tokens of context before the firing token
    window_tokens_after: int = 4
    window_chars_before: int = 200  # ... but never more than this many characters
    hist_bins_per_octave: int = 8  # bins 9% wide: a feature's range above its threshold is often one octave
    hist_min_exp: int = -12  # histogram covers activations in [2^min_exp, 2^max_exp)
    hist_max_exp: int = 12
    batch_tokens: int | None = None  # default: keeps the dense [N, F] activations near 256 MiB
    device: str = "cpu"

    @property
    def pool_size(self) -> int:
        return self.top_k * self.pool_factor


class Shard(Protocol):
    acts_a: torch.Tensor
    acts_b: torch.Tensor
    doc_id: torch.Tensor
    start_a: torch.Tensor
    start_b: torch.Tensor
    end: torch.Tensor


class EvalSplit(Protocol):
    """What analysis needs from `ActivationStore.split("eval")`."""

    n_tokens: int
    num_shards: int
    scale_a: float
    scale_b: float

    def load_shard(self, index: int) -> Shard: ...


class DocumentSource(Protocol):
    def document_text(self, doc_id: int) -> str: ...


# --- word types ---------------------------------------------------------------------------


class WordTypes:
    """Interns the text of firing tokens ("word types": stripped, lower-cased) as integers."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []

    def intern(self, text: str) -> int:
        key = text.strip().lower()
        found = self.ids.get(key)
        if found is None:
            found = self.ids[key] = len(self.names)
            self.names.append(key)
        return found


class _Documents:
    """Document texts with a small cache (shards visit one document many times)."""

    def __init__(self, source: DocumentSource) -> None:
        self.source = source
        self.cache: dict[int, str] = {}

    def text(self, doc_id: int) -> str:
        text = self.cache.get(doc_id)
        if text is None:
            if len(self.cache) > 4096:
                self.cache.clear()
            text = self.cache[doc_id] = self.source.document_text(doc_id)
        return text


def is_junk_type(word: str) -> bool:
    """Punctuation, whitespace, digits-free symbol runs and special/template tokens."""
    import unicodedata

    if not word or (word.startswith("<") and word.endswith(">")):
        return True
    return all(unicodedata.category(ch)[0] in "PSZC" for ch in word)


def positions_in_doc(doc_id_N: torch.Tensor) -> torch.Tensor:
    """Index of each row within its run of equal doc ids (rows of a document are contiguous)."""
    n = doc_id_N.numel()
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = doc_id_N[1:] != doc_id_N[:-1]
    index = torch.arange(n)
    run_start = torch.where(change, index, torch.zeros_like(index)).cummax(0).values
    return index - run_start


def shard_word_types(shard: Shard, docs: _Documents, types: WordTypes) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-type ids of A's and B's token at every pair of a shard."""
    doc_ids, starts_a, starts_b, ends = (t.tolist() for t in (shard.doc_id, shard.start_a, shard.start_b, shard.end))
    type_a, type_b = [], []
    for doc, sa, sb, e in zip(doc_ids, starts_a, starts_b, ends, strict=True):
        text = docs.text(doc)
        type_a.append(types.intern(text[sa:e]))
        type_b.append(type_a[-1] if sa == sb else types.intern(text[sb:e]))
    return torch.tensor(type_a, dtype=torch.int64), torch.tensor(type_b, dtype=torch.int64)


# --- streaming accumulators ---------------------------------------------------------------


def capped_topk(
    values_FC: torch.Tensor, pos_FC: torch.Tensor, types_FC: torch.Tensor, keep: int, cap: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (feature): the `keep` strongest candidates, at most `cap` of any one word type.

    Empty or rejected slots come back with value -1 and position -1."""
    values_FC, order = values_FC.sort(dim=1, descending=True)
    pos_FC, types_FC = pos_FC.gather(1, order), types_FC.gather(1, order)
    # Occurrence number of each candidate within its word type, in activation order: a
    # stable sort by type keeps activation order inside each type's run.
    types_sorted, by_type = types_FC.sort(dim=1, stable=True)
    index = torch.arange(types_FC.shape[1], device=types_FC.device).expand_as(types_FC)
    run_start = torch.ones_like(types_sorted, dtype=torch.bool)
    run_start[:, 1:] = types_sorted[:, 1:] != types_sorted[:, :-1]
    first_of_run = torch.where(run_start, index, torch.zeros_like(index)).cummax(dim=1).values
    occurrence = torch.empty_like(index).scatter_(1, by_type, index - first_of_run)
    allowed = (occurrence < cap) & (values_FC > 0)
    score_FC = torch.where(allowed, values_FC, torch.full_like(values_FC, -1.0))
    top_values, top_index = score_FC.topk(min(keep, score_FC.shape[1]), dim=1)
    top_pos = torch.where(top_values > 0, pos_FC.gather(1, top_index), torch.full_like(top_index, -1))
    return top_values, top_pos, types_FC.gather(1, top_index)


class _SparseMass:
    """Activation mass per (feature, word type), and the part of it on split words.

    Kept as packed int64 keys + values and coalesced (unique + scatter_add) whenever the
    buffer grows, so memory follows the number of distinct pairs, not of firings."""

    def __init__(self, device: torch.device, coalesce_at: int = 4_000_000) -> None:
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.mass = torch.zeros(0, device=device)
        self.split_mass = torch.zeros(0, device=device)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0
        self.coalesce_at = coalesce_at

    def add(self, keys: torch.Tensor, mass: torch.Tensor, split_mass: torch.Tensor) -> None:
        self.pending.append((keys, mass, split_mass))
        self.n_pending += keys.numel()
        if self.n_pending >= self.coalesce_at:
            self.coalesce()

    def coalesce(self) -> None:
        if not self.pending:
            return
        keys = torch.cat([self.keys, *(p[0] for p in self.pending)])
        mass = torch.cat([self.mass, *(p[1] for p in self.pending)])
        split = torch.cat([self.split_mass, *(p[2] for p in self.pending)])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.mass = torch.zeros(self.keys.numel(), device=mass.device).index_add_(0, inverse, mass)
        self.split_mass = torch.zeros(self.keys.numel(), device=mass.device).index_add_(0, inverse, split)
        self.pending, self.n_pending = [], 0


@dataclass
class _WordStats:
    """Per-feature summary of how firing mass spreads over word types."""

    n_distinct: torch.Tensor  # [F] distinct word types it fired on
    top_type: torch.Tensor  # [F] word type with the most mass (-1 if dead)
    top_share: torch.Tensor  # [F] share of mass on that type
    top_split_share: torch.Tensor  # [F] share of the top type's mass on words A and B split differently
    effective_types: torch.Tensor  # [F] exp(entropy of the mass distribution over types)

    def to_cpu(self) -> _WordStats:
        return _WordStats(*(getattr(self, f.name).cpu() for f in fields(self)))


def _word_stats(sparse: _SparseMass, n_features: int) -> _WordStats:
    sparse.coalesce()
    device = sparse.mass.device
    feat = sparse.keys >> _TYPE_BITS
    word = sparse.keys & ((1 << _TYPE_BITS) - 1)
    total_F = torch.zeros(n_features, device=device).index_add_(0, feat, sparse.mass)
    n_distinct = torch.zeros(n_features, dtype=torch.int64, device=device).index_add_(
        0, feat, torch.ones_like(feat)
    )
    p = sparse.mass / total_F[feat].clamp_min(1e-30)
    entropy_F = torch.zeros(n_features, device=device).index_add_(0, feat, -p * torch.log(p.clamp_min(1e-30)))
    # The top word type of each feature: order by mass, then stably by feature; the first
    # entry of each feature's run is its heaviest type.
    by_mass = sparse.mass.argsort(descending=True)
    by_feat = feat[by_mass].argsort(stable=True)
    order = by_mass[by_feat]
    feat_sorted = feat[order]
    first = torch.ones_like(feat_sorted, dtype=torch.bool)
    first[1:] = feat_sorted[1:] != feat_sorted[:-1]
    heads = order[first]
    top_type = torch.full((n_features,), -1, dtype=torch.int64, device=device)
    top_share = torch.zeros(n_features, device=device)
    top_split = torch.zeros(n_features, device=device)
    head_feat = feat[heads]
    top_type[head_feat] = word[heads]
    top_share[head_feat] = sparse.mass[heads] / total_F[head_feat].clamp_min(1e-30)
    top_split[head_feat] = sparse.split_mass[heads] / sparse.mass[heads].clamp_min(1e-30)
    return _WordStats(n_distinct, top_type, top_share, top_split, torch.exp(entropy_F))


@dataclass
class _Pass1:
    n_tokens: int
    n_fires: torch.Tensor
    act_sum: torch.Tensor
    act_max: torch.Tensor
    junk_mass: torch.Tensor  # [F] activation mass on junk tokens (punctuation, specials, first positions)
    hist_counts: torch.Tensor  # [F, n_bins]
    pool_values: torch.Tensor  # [F, C]
    pool_pos: torch.Tensor  # [F, C] shard << 32 | row
    words: _WordStats
    fve_a: float
    fve_b: float
    mean_l0: float


def _hist_edges(cfg: AnalysisConfig) -> list[float]:
    n_bins = (cfg.hist_max_exp - cfg.hist_min_exp) * cfg.hist_bins_per_octave
    return [2.0 ** (cfg.hist_min_exp + i / cfg.hist_bins_per_octave) for i in range(n_bins + 1)]


def _batch_size(cfg: AnalysisConfig, n_features: int) -> int:
    if cfg.batch_tokens:
        return cfg.batch_tokens
    return max(64, min(8192, (64 * 2**20) // max(1, n_features)))


def normalised_rows(shard: Shard, crosscoder, rows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The shard's raw rows in `crosscoder`'s input space (its own means and scales)."""
    return crosscoder.normalise(shard.acts_a[rows].to(device), shard.acts_b[rows].to(device))


@torch.no_grad()
def _stream_statistics(
    crosscoder, split: EvalSplit, docs: _Documents, types: WordTypes, cfg: AnalysisConfig, advance: Callable[[int], None]
) -> _Pass1:
    device = torch.device(cfg.device)
    F = crosscoder.cfg.dict_size
    C = cfg.pool_size
    edges = torch.tensor(_hist_edges(cfg), device=device)
    n_bins = edges.numel() - 1
    n_fires = torch.zeros(F, dtype=torch.int64, device=device)
    act_sum = torch.zeros(F, dtype=torch.float64, device=device)
    act_max = torch.zeros(F, device=device)
    hist = torch.zeros(F * n_bins, dtype=torch.int64, device=device)
    pool_values = torch.full((F, C), -1.0, device=device)
    pool_pos = torch.full((F, C), -1, dtype=torch.int64, device=device)
    pool_types = torch.full((F, C), -1, dtype=torch.int64, device=device)
    is_b_F = torch.tensor([p == "b" for p in crosscoder.partition_labels()], device=device)
    junk_mass = torch.zeros(F, dtype=torch.float64, device=device)
    junk_flags: list[bool] = []  # is_junk_type of each interned word type
    sparse = _SparseMass(device)
    recon = {"a": [0.0, 0.0, None], "b": [0.0, 0.0, None]}  # sse, sum of squares, sum of x
    n_tokens, n_active = 0, 0
    batch = _batch_size(cfg, F)
    read_ahead = getattr(split, "prefetch", None)  # a remote store fetches the next shard meanwhile
    for shard_index in range(split.num_shards):
        if read_ahead is not None:
            read_ahead(shard_index + 1)
        shard = split.load_shard(shard_index)
        type_a_N, type_b_N = (t.to(device) for t in shard_word_types(shard, docs, types))
        split_N = (shard.start_a != shard.start_b).to(device=device, dtype=torch.float32)
        junk_flags.extend(is_junk_type(name) for name in types.names[len(junk_flags) :])
        junk_type = torch.tensor(junk_flags, dtype=torch.bool)
        first_N = positions_in_doc(shard.doc_id) < JUNK_POSITIONS
        junk_a_N = (junk_type[type_a_N.cpu()] | first_N).to(device)
        junk_b_N = (junk_type[type_b_N.cpu()] | first_N).to(device)
        n_rows = int(shard.doc_id.numel())
        for lo in range(0, n_rows, batch):
            rows = slice(lo, min(n_rows, lo + batch))
            x_a, x_b = normalised_rows(shard, crosscoder, rows, device)
            f_NF = crosscoder.encode(x_a, x_b)
            _accumulate_reconstruction(recon, crosscoder, f_NF, x_a, x_b)
            fired = f_NF > 0
            n_fires += fired.sum(0)
            act_sum += f_NF.sum(0, dtype=torch.float64)
            act_max = torch.maximum(act_max, f_NF.max(0).values)
            n_active += int(fired.sum())
            row_i, feat_i = fired.nonzero(as_tuple=True)
            values = f_NF[row_i, feat_i]
            bins = (torch.bucketize(values, edges, right=True) - 1).clamp(0, n_bins - 1)
            hist.index_add_(0, feat_i * n_bins + bins, torch.ones_like(bins))
            # Word type of the feature's own model: B's token for B-exclusive, else A's.
            global_rows = row_i + lo
            own_type = torch.where(is_b_F[feat_i], type_b_N[global_rows], type_a_N[global_rows])
            sparse.add((feat_i << _TYPE_BITS) | own_type, values, values * split_N[global_rows])
            own_junk = torch.where(is_b_F[feat_i], junk_b_N[global_rows], junk_a_N[global_rows])
            junk_mass.index_add_(0, feat_i, (values * own_junk).double())
            # Pool: this batch's strongest candidates per feature, merged with a per-type cap.
            depth = min(2 * C, f_NF.shape[0])
            top_v, top_r = f_NF.topk(depth, dim=0)  # [depth, F]
            top_r = top_r + lo
            top_t = torch.where(is_b_F[None, :], type_b_N[top_r], type_a_N[top_r])
            pool_values, pool_pos, pool_types = capped_topk(
                torch.cat([pool_values, top_v.T], 1),
                torch.cat([pool_pos, ((shard_index << 32) | top_r).T], 1),
                torch.cat([pool_types, top_t.T], 1),
                keep=C,
                cap=cfg.per_type_cap,
            )
            n_tokens += f_NF.shape[0]
            advance(f_NF.shape[0])
    fve = {side: _fve(*recon[side], n_tokens) for side in ("a", "b")}
    return _Pass1(
        n_tokens=n_tokens,
        n_fires=n_fires.cpu(),
        act_sum=act_sum.cpu(),
        act_max=act_max.cpu(),
        junk_mass=junk_mass.cpu(),
        hist_counts=hist.view(F, n_bins).cpu(),
        pool_values=pool_values.cpu(),
        pool_pos=pool_pos.cpu(),
        words=_word_stats(sparse, F).to_cpu(),
        fve_a=fve["a"],
        fve_b=fve["b"],
        mean_l0=n_active / max(1, n_tokens),
    )


def _accumulate_reconstruction(recon: dict, crosscoder, f_NF, x_a, x_b) -> None:  # noqa: ANN001
    xhat_a, xhat_b = crosscoder.decode(f_NF)
    for side, x, xhat in (("a", x_a, xhat_a), ("b", x_b, xhat_b)):
        entry = recon[side]
        entry[0] += float((x - xhat).pow(2).sum())
        entry[1] += float(x.pow(2).sum())
        col_sum = x.sum(0, dtype=torch.float64)
        entry[2] = col_sum if entry[2] is None else entry[2] + col_sum


def _fve(sse: float, sum_sq: float, col_sum, n: int) -> float:  # noqa: ANN001
    """Fraction of variance explained: 1 - SSE / Σ‖x - mean‖²."""
    if n == 0 or col_sum is None:
        return float("nan")
    total_var = sum_sq - float(col_sum.pow(2).sum()) / n
    return 1.0 - sse / total_var if total_var > 0 else float("nan")


# --- examples -----------------------------------------------------------------------------


@dataclass
class _Wanted:
    feature: int
    rank: int
    row: int
    activation: float


def _doc_bounds(doc_id_N: torch.Tensor) -> tuple[list[int], list[int]]:
    """For each row, the first and one-past-last row of its document within the shard."""
    n = doc_id_N.numel()
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = doc_id_N[1:] != doc_id_N[:-1]
    starts = change.nonzero().flatten()
    run_of_row = torch.cumsum(change.long(), 0) - 1
    ends = torch.cat([starts[1:], torch.tensor([n])])
    return starts[run_of_row].tolist(), ends[run_of_row].tolist()


@torch.no_grad()
def _window_activations(crosscoder, split: EvalSplit, shard: Shard, wanted: list[_Wanted], windows, device):  # noqa: ANN001
    """Activation of each wanted feature at every row of its example window (rounded, as lists)."""
    scores_F = sum(crosscoder.decoder_norms())
    threshold = float(crosscoder.threshold)
    out: list[list[float]] = []
    chunk = 2048
    for lo in range(0, len(wanted), chunk):
        part = wanted[lo : lo + chunk]
        first_n = torch.tensor([first for first, _ in windows[lo : lo + chunk]])
        last_n = torch.tensor([hi - 1 for _, hi in windows[lo : lo + chunk]])
        width = int((last_n - first_n).max()) + 1
        rows_NW = torch.minimum(first_n[:, None] + torch.arange(width)[None, :], last_n[:, None])
        feats = torch.tensor([w.feature for w in part], device=device)
        x_a, x_b = normalised_rows(shard, crosscoder, rows_NW, device)  # [n, W, A], [n, W, B]
        pre = (
            torch.einsum("nwa,an->nw", x_a, crosscoder.W_enc_AF[:, feats])
            + torch.einsum("nwb,bn->nw", x_b, crosscoder.W_enc_BF[:, feats])
            + crosscoder.b_enc_F[feats][:, None]
        ).relu()
        acts = pre * (pre * scores_F[feats][:, None] > threshold)
        lengths = (last_n - first_n + 1).tolist()
        out.extend(row[:n] for row, n in zip((acts * 1e4).round().div(1e4).tolist(), lengths, strict=True))
    return out


def _example_rows(
    crosscoder, split: EvalSplit, docs: _Documents, pass1: _Pass1, cfg: AnalysisConfig, advance: Callable[[int], None]
) -> list[dict[str, Any]]:
    """Cut a context window for every chosen example and return FeatureIndex example rows."""
    partitions = crosscoder.partition_labels()
    by_shard: dict[int, list[_Wanted]] = {}
    values, positions = pass1.pool_values, pass1.pool_pos
    for feature in (pass1.n_fires > 0).nonzero().flatten().tolist():
        kept = [(v, p) for v, p in zip(values[feature].tolist(), positions[feature].tolist(), strict=True) if v > 0]
        for rank, (value, pos) in enumerate(kept[: cfg.top_k]):
            by_shard.setdefault(pos >> 32, []).append(_Wanted(feature, rank, pos & 0xFFFFFFFF, value))
    device = torch.device(cfg.device)
    rows: list[dict[str, Any]] = []
    for shard_index in sorted(by_shard):
        shard = split.load_shard(shard_index)
        wanted = by_shard[shard_index]
        doc_first, doc_end = _doc_bounds(shard.doc_id)
        starts_a, starts_b, ends = shard.start_a.tolist(), shard.start_b.tolist(), shard.end.tolist()
        doc_ids = shard.doc_id.tolist()
        windows = []
        for w in wanted:
            first = max(doc_first[w.row], w.row - cfg.window_tokens_before)
            hi = min(doc_end[w.row], w.row + cfg.window_tokens_after + 1)
            # Never more than window_chars_before characters of left context.
            earliest = min(starts_a[w.row], starts_b[w.row]) - cfg.window_chars_before
            while first < w.row and min(starts_a[first], starts_b[first]) < earliest:
                first += 1
            windows.append((first, hi))
        acts = _window_activations(crosscoder, split, shard, wanted, windows, device)
        for w, (first, hi), window_acts in zip(wanted, windows, acts, strict=True):
            text = docs.text(doc_ids[w.row])
            views = ("a", "b") if partitions[w.feature] == "shared" else (partitions[w.feature],)
            lo_char = min(starts_a[first], starts_b[first])
            hi_char = ends[hi - 1]
            window_ends = [e - lo_char for e in ends[first:hi]]
            for view in views:
                starts = starts_a if view == "a" else starts_b
                token_acts = [
                    [s - lo_char, e, a]
                    for s, e, a in zip(starts[first:hi], window_ends, window_acts, strict=True)
                ]
                rows.append(
                    {
                        "feature_id": w.feature,
                        "view": view,
                        "rank": w.rank,
                        "text": text[lo_char:hi_char],
                        "start": starts[w.row] - lo_char,
                        "end": ends[w.row] - lo_char,
                        "activation": w.activation,
                        "token_acts": token_acts,
                        "doc_id": doc_ids[w.row],
                    }
                )
        advance(1)
    return rows


# --- ranking ------------------------------------------------------------------------------


def frequency_band(frequency: float, low: float = 1e-4, high: float = 0.1) -> float:
    """1 inside [low, high], falling linearly in log10 to 0 two decades outside it."""
    if frequency <= 0:
        return 0.0
    logf = math.log10(frequency)
    if logf < math.log10(low):
        return max(0.0, 1 - (math.log10(low) - logf) / 2)
    if logf > math.log10(high):
        return max(0.0, 1 - (logf - math.log10(high)) / 1)
    return 1.0


def feature_score(
    *, alive: bool, candidate: bool, artifact: bool, effective_types: float, top_share: float,
    consistency: float, frequency: float, top_k: int,
) -> float:
    """The default ranking score; tiers of 10 (see RANKING_HELP), quality in [0, 10) within."""
    if not alive:
        return 0.0
    tier = 3 if candidate and not artifact else 2 if candidate else 1
    breadth = min(1.0, math.log(max(1.0, effective_types)) / math.log(max(2, top_k)))
    quality = 4.0 * breadth + 2.0 * (1.0 - top_share) + 2.0 * consistency + 1.9 * frequency_band(frequency)
    return 10.0 * tier + quality


def is_candidate(partition: str, rel_norm: float) -> bool:
    return partition != "shared" or rel_norm < EXCLUSIVE_R_LOW or rel_norm > EXCLUSIVE_R_HIGH


def _feature_rows(crosscoder, pass1: _Pass1, types: WordTypes, cfg: AnalysisConfig, edges: list[float]):  # noqa: ANN001
    norm_a, norm_b = (t.detach().float().cpu() for t in crosscoder.decoder_norms())
    total = norm_a + norm_b
    rel = torch.where(total > 0, norm_a / total.clamp_min(1e-30), torch.full_like(total, 0.5))
    if crosscoder.cfg.d_a == crosscoder.cfg.d_b:
        dec_a, dec_b = crosscoder.W_dec_FA.detach().float().cpu(), crosscoder.W_dec_FB.detach().float().cpu()
        cos = (dec_a * dec_b).sum(-1) / (norm_a * norm_b).clamp_min(1e-30)
        cos_defined = (norm_a > 0) & (norm_b > 0)
    partitions = crosscoder.partition_labels()
    n = max(1, pass1.n_tokens)
    w = pass1.words
    rows = []
    for i in range(crosscoder.cfg.dict_size):
        n_fires = int(pass1.n_fires[i])
        alive = n_fires > 0
        top_type = int(w.top_type[i])
        top_token = types.names[top_type] if top_type >= 0 else None
        top_share = float(w.top_share[i])
        artifact = alive and top_share > ARTIFACT_SHARE and float(w.top_split_share[i]) > 0.5
        junk_share = float(pass1.junk_mass[i]) / max(float(pass1.act_sum[i]), 1e-30) if alive else 0.0
        junk = alive and junk_share > JUNK_SHARE
        pool = pass1.pool_values[i, : cfg.top_k]
        pool = pool[pool > 0]
        max_act = float(pass1.act_max[i])
        consistency = float(pool.mean()) / max_act if alive and pool.numel() else 0.0
        candidate = is_candidate(partitions[i], float(rel[i]))
        counts = pass1.hist_counts[i].tolist()
        used = [j for j, c in enumerate(counts) if c]
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        rows.append(
            {
                "id": i,
                "partition": partitions[i],
                "frequency": n_fires / n,
                "n_fires": n_fires,
                "mean_activation": float(pass1.act_sum[i]) / n_fires if alive else 0.0,
                "max_activation": max_act,
                "dec_norm_a": float(norm_a[i]),
                "dec_norm_b": float(norm_b[i]),
                "rel_norm": float(rel[i]),
                "dec_cos": float(cos[i]) if crosscoder.cfg.d_a == crosscoder.cfg.d_b and cos_defined[i] else None,
                "n_distinct_tokens": int(w.n_distinct[i]),
                "top_token": top_token,
                "top_token_share": top_share,
                "token_artifact": int(artifact),
                "candidate": int(candidate),
                "score": feature_score(
                    alive=alive, candidate=candidate, artifact=artifact or junk,
                    effective_types=float(w.effective_types[i]),
                    top_share=top_share, consistency=consistency, frequency=n_fires / n, top_k=cfg.top_k,
                ),
                "histogram": {"edges": edges[lo : hi + 1] if used else [], "counts": counts[lo:hi]},
                "label": f"tokenization artifact: {top_token!r}" if artifact
                else f"artifact: {junk_share:.0%} on punctuation/special tokens/first positions (top {top_token!r})"
                if junk else None,
            }
        )
    order = sorted(range(len(rows)), key=lambda j: (-rows[j]["score"], -rows[j]["max_activation"], j))
    for rank, j in enumerate(order, start=1):
        rows[j]["rank"] = rank
    return rows


# --- entry points -------------------------------------------------------------------------


def analyze(
    crosscoder,  # noqa: ANN001 - Crosscoder
    eval_split: EvalSplit,
    store: DocumentSource,
    out_path: Path,
    top_k: int = 20,
    *,
    config: AnalysisConfig | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    """Analyse `crosscoder` on `eval_split`; write the FeatureIndex to `out_path` atomically."""
    from xdiff_cli.findings.feature_index import FeatureIndexWriter

    cfg = config or AnalysisConfig(top_k=top_k)
    if eval_split.num_shards == 0 or eval_split.n_tokens == 0:
        raise XdiffError("the activation store has no held-out tokens to analyse", "rerun `xdiff harvest`")
    crosscoder = crosscoder.to(cfg.device).eval()
    docs, types = _Documents(store), WordTypes()
    started = time.monotonic()
    with _Progress(progress, eval_split) as bars:
        pass1 = _stream_statistics(crosscoder, eval_split, docs, types, cfg, bars.tokens)
        edges = _hist_edges(cfg)
        feature_rows = _feature_rows(crosscoder, pass1, types, cfg, edges)
        shards_needed = {p >> 32 for p in pass1.pool_pos[pass1.pool_values > 0].tolist()}
        bars.start_examples(len(shards_needed))
        example_rows = _example_rows(crosscoder, eval_split, docs, pass1, cfg, bars.examples)
    n_alive = int((pass1.n_fires > 0).sum())
    summary = {
        "n_tokens": pass1.n_tokens,
        "n_features": crosscoder.cfg.dict_size,
        "n_alive": n_alive,
        "dead_fraction": 1 - n_alive / crosscoder.cfg.dict_size,
        "eval_fve_a": pass1.fve_a,
        "eval_fve_b": pass1.fve_b,
        "mean_l0": pass1.mean_l0,
        "n_candidates": sum(r["candidate"] for r in feature_rows),
        "n_token_artifacts": sum(r["token_artifact"] for r in feature_rows),
        "n_junk_artifacts": sum(bool(r["label"]) and r["label"].startswith("artifact:") for r in feature_rows),
        **dead_by_block(crosscoder, pass1.n_fires == 0),
        "seconds": round(time.monotonic() - started, 2),
    }
    with FeatureIndexWriter(out_path) as writer:
        writer.set_meta(
            **(meta or {}),
            summary=summary,
            crosscoder=asdict(crosscoder.cfg),
            analysis=asdict(cfg),
            ranking=RANKING_HELP,
            complete=True,
        )
        writer.add_features(feature_rows)
        writer.add_examples(example_rows)
    return Path(out_path)


def dead_by_block(crosscoder, dead_F: torch.Tensor) -> dict[str, float]:  # noqa: ANN001
    """`dead_a`, `dead_b` (DFC only), `dead_shared`: the share of each block that never fired."""
    from xdiff_cli.dfc.training import dead_by_block as by_block

    return by_block(crosscoder, dead_F)


class _Progress:
    """Two rich bars (token pass, example windows), or nothing when progress is off."""

    def __init__(self, enabled: bool, split: EvalSplit) -> None:
        self.enabled, self.split = enabled, split
        self.bar = None
        self.example_task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from xdiff_cli.console import stage_progress

            self.bar = stage_progress("tok")
            self.bar.start()
            self.token_task = self.bar.add_task("analyse: encode held-out tokens", total=self.split.n_tokens)
        return self

    def tokens(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.token_task, n)

    def start_examples(self, n_shards: int) -> None:
        if self.bar is not None:
            self.example_task = self.bar.add_task("analyse: cut example windows (shards)", total=n_shards)

    def examples(self, n: int) -> None:
        if self.bar is not None and self.example_task is not None:
            self.bar.advance(self.example_task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def analysis_is_valid(path: Path) -> bool:
    """A complete index exists at `path` (written by this xdiff schema)."""
    from xdiff_cli.integrity import analysis_problem

    return Path(path).is_file() and analysis_problem(path) is None


def pick_device(requested: str = "auto") -> str:
    from xdiff_cli.run.hardware import resolve_device

    return resolve_device(requested or "auto")


def analyze_run(run, progress: bool = True, force: bool = False) -> Path:  # noqa: ANN001 - runs.Run
    """The analyse stage of a run: `run.analysis_path`, computed once (idempotent)."""
    from xdiff_cli.atomic import clean_temp_files
    from xdiff_cli.dfc.crosscoder import Crosscoder
    from xdiff_cli.integrity import crosscoder_problem, store_problem

    path = run.analysis_path
    clean_temp_files(path.parent, recursive=False)  # a killed analysis' .analysis.sqlite.*.tmp(-journal)
    if not force and analysis_is_valid(path):
        return path
    final = run.crosscoder_dir / "final"
    damaged = []  # missing ones get their own "train/harvest first" errors below
    if (final / "model.safetensors").exists():
        damaged.append(("trained crosscoder", crosscoder_problem(final)))
    if run.settings.store or (run.store_dir / "manifest.json").exists():
        damaged.append(("activation store", store_problem(run.store_location)))
    for what, problem in damaged:
        if problem:
            raise XdiffError(f"the {what} of run {run.id} is damaged ({problem})",
                             "rerun `xdiff run` for this run: it redoes damaged stages")
    settings = run.settings
    device = pick_device(settings.device)
    crosscoder = Crosscoder.load(run.crosscoder_dir / "final", device=device)
    store = run.open_store()
    meta = {
        "run_id": run.id,
        "models": {side: model.to_json() for side, model in run.models.items()},
        "settings": run.settings.to_dict(),
        "train_metrics": dict(run.metrics),
    }
    config = AnalysisConfig(top_k=settings.top_examples, device=device)
    analyze(crosscoder, store.split("eval"), store, path, config=config, meta=meta, progress=progress)
    from xdiff_cli.findings.feature_index import FeatureIndex

    index = FeatureIndex.open(path)
    try:
        summary = index.meta["summary"]
    finally:
        index.close()
    run.set_metrics(
        eval_fve_a=summary["eval_fve_a"], eval_fve_b=summary["eval_fve_b"],
        eval_dead_fraction=summary["dead_fraction"], eval_l0=summary["mean_l0"],
        **{f"eval_{key}": summary[key] for key in ("dead_a", "dead_b", "dead_shared") if key in summary},
    )
    return path


def analyze_stage(run, ctx) -> None:  # noqa: ANN001 - runs.Run, stages.StageContext
    """The analyse stage for the stage runner (`--force` is a restart: `stages.restart_from`)."""
    analyze_run(run, progress=ctx.progress)
