"""Examples of one feature from below its top: what it does when it fires weakly.

Top examples show a feature at its strongest; the weaker firings say whether it is the same
concept or something broader (Neuronpedia shows these "lower quantile" examples). Analysis
keeps only the top examples, so these are computed lazily, for one feature when asked: one
pass over the held-out split computing just that feature's activation (threshold inference,
as analysis does), a seeded random pick of a few firings in each activation band, then the
same context windows and per-token activations as the top examples.

Bands are fractions of s_max: [0.5, 0.75), [0.25, 0.5), (0, 0.25).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from xdiff_cli.findings.feature_index import Example

BANDS = ((0.5, 0.75), (0.25, 0.5), (0.0, 0.25))


@dataclass
class QuantileBand:
    low: float  # fraction of s_max
    high: float
    n_fires: int  # firings in this band over the held-out split
    examples: list[Example] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.low:.2f}–{self.high:.2f} × s_max"


def quantile_examples(
    crosscoder: Any, split: Any, documents: Any, feature: int, s_max: float, per_band: int = 3, seed: int = 0,
    bands: tuple[tuple[float, float], ...] = BANDS,
) -> list[QuantileBand]:
    """`per_band` random firings of `feature` in each band of its activation (fraction of `s_max`)."""
    import torch

    from xdiff_cli.findings.analysis import AnalysisConfig, _Documents, _example_rows, normalised_rows

    device = torch.device("cpu")
    crosscoder = crosscoder.to(device).eval()
    found: list[list[tuple[float, int]]] = [[] for _ in bands]  # (activation, packed position)
    with torch.no_grad():
        score = float(sum(norm[feature] for norm in crosscoder.decoder_norms()))
        threshold = float(crosscoder.threshold)
        for shard_index in range(split.num_shards):
            shard = split.load_shard(shard_index)
            n = shard.acts_a.shape[0]
            x_a, x_b = normalised_rows(shard, crosscoder, slice(0, n), device)
            pre_N = (x_a @ crosscoder.W_enc_AF[:, feature] + x_b @ crosscoder.W_enc_BF[:, feature]
                     + crosscoder.b_enc_F[feature]).relu()
            acts_N = pre_N * (pre_N * score > threshold)
            for row in (acts_N > 0).nonzero().flatten().tolist():
                value = float(acts_N[row])
                ratio = value / s_max if s_max > 0 else 0.0
                for i, (low, high) in enumerate(bands):
                    if low < ratio < high or (ratio == low and low > 0):
                        found[i].append((value, (shard_index << 32) | row))
                        break
    rng = random.Random(seed)
    picked = [rng.sample(hits, min(per_band, len(hits))) for hits in found]
    # Reuse analysis's window cutting: a one-feature "pool" holding the picked firings.
    chosen = sorted((p for band in picked for p in band), key=lambda vp: -vp[0])
    out = [QuantileBand(low, high, len(hits)) for (low, high), hits in zip(bands, found, strict=True)]
    if not chosen:
        return out
    n_features = crosscoder.cfg.dict_size
    n_fires = torch.zeros(n_features, dtype=torch.long)
    n_fires[feature] = 1
    values = torch.zeros(n_features, len(chosen))
    positions = torch.zeros(n_features, len(chosen), dtype=torch.long)
    values[feature] = torch.tensor([v for v, _ in chosen])
    positions[feature] = torch.tensor([p for _, p in chosen])
    pass1 = SimpleNamespace(n_fires=n_fires, pool_values=values, pool_pos=positions)
    cfg = AnalysisConfig(top_k=len(chosen), device="cpu")
    rows = _example_rows(crosscoder, split, _Documents(documents), pass1, cfg, lambda _: None)
    for row in rows:
        example = Example(text=row["text"], start=row["start"], end=row["end"], activation=row["activation"],
                          token_acts=[tuple(t) for t in row["token_acts"]], view=row["view"], doc_id=row["doc_id"])
        ratio = example.activation / s_max if s_max > 0 else 0.0
        for band in out:
            if band.low < ratio < band.high or (ratio == band.low and band.low > 0):
                band.examples.append(example)
                break
    for band in out:
        band.examples.sort(key=lambda e: (e.view, -e.activation))
    return out


def quantile_examples_for_run(run: Any, feature: int, s_max: float, per_band: int = 3) -> list[QuantileBand]:
    """`quantile_examples` over a run's trained crosscoder and held-out activations."""
    from xdiff_cli.dfc.crosscoder import Crosscoder
    from xdiff_cli.errors import XdiffError

    if not run.settings.store and not run.store_dir.is_dir():
        raise XdiffError("this run has no activation store", "lower-quantile examples need the harvested activations")
    crosscoder = Crosscoder.load(run.crosscoder_dir / "final")
    store = run.open_store()
    return quantile_examples(crosscoder, store.split("eval"), store, feature, s_max, per_band=per_band)
