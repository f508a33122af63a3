"""Analysis throughput vs the encode it cannot avoid.

On one synthetic eval split (random activations, random crosscoder with a calibrated
threshold), this times:
- encode:   threshold encoding of every token pair, nothing else (the floor);
- analyse:  the whole stage (statistics, capped example pools, word types, example windows,
            SQLite write).

Goal: the streaming pass stays within a small factor of the encode; cutting example windows
is a fixed cost per (feature, example) — about 20 x F text windows — so the ratio
analyse/encode falls as --tokens grows (real runs analyse millions of held-out pairs).
Run: `python benchmarks/analysis.py [--tokens N] [--dict F] [--width D] [--device cpu|cuda]`.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from xdiff_cli.data.store import Shard
from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.findings.analysis import AnalysisConfig, analyze


class SyntheticSplit:
    """Documents of 100 five-character words; one shard per 10k pairs."""

    scale_a = scale_b = 1.0

    def __init__(self, n_tokens: int, width: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        words = [f"w{i:03d}" for i in range(2000)]
        self.texts, self.shards = [], []
        per_doc, per_shard = 100, 10_000
        for lo in range(0, n_tokens, per_shard):
            n = min(per_shard, n_tokens - lo)
            doc_ids, starts, ends = [], [], []
            for j in range(n):
                if (lo + j) % per_doc == 0:
                    self.texts.append(" ".join(rng.choice(words) for _ in range(per_doc)))
                k = (lo + j) % per_doc
                doc_ids.append(len(self.texts) - 1)
                starts.append(k * 5)
                ends.append(k * 5 + 4)
            self.shards.append(Shard(
                torch.randn(n, width), torch.randn(n, width), torch.tensor(doc_ids),
                torch.tensor(starts), torch.tensor(starts), torch.tensor(ends),
            ))
        self.n_tokens = n_tokens

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def load_shard(self, i: int) -> Shard:
        return self.shards[i]

    def document_text(self, doc_id: int) -> str:
        return self.texts[doc_id]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--dict", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    split = SyntheticSplit(args.tokens, args.width)
    cc = Crosscoder(CrosscoderConfig(d_a=args.width, d_b=args.width, dict_size=args.dict, k=args.k)).to(args.device)
    with torch.no_grad():  # a threshold that keeps about k features per token
        x = split.shards[0]
        scores = cc.ranking_scores(cc.pre_activations(x.acts_a[:1024].to(args.device), x.acts_b[:1024].to(args.device)))
        cc.threshold.fill_(float(scores.flatten().kthvalue(scores.numel() - args.k * 1024).values))
    cfg = AnalysisConfig(top_k=20, device=args.device)
    batch = (64 * 2**20) // args.dict
    start = time.perf_counter()
    with torch.no_grad():
        for shard in split.shards:
            for lo in range(0, len(shard.doc_id), batch):
                cc.encode(shard.acts_a[lo : lo + batch].to(args.device), shard.acts_b[lo : lo + batch].to(args.device))
    encode_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        analyze(cc, split, split, Path(tmp) / "a.sqlite", config=cfg)
        analyse_s = time.perf_counter() - start
    print(f"tokens {args.tokens:,}  dict {args.dict:,}  width {args.width}  k {args.k}  device {args.device}")
    print(f"encode only : {encode_s:6.2f} s  {args.tokens / encode_s:10,.0f} tok/s")
    print(f"analyse     : {analyse_s:6.2f} s  {args.tokens / analyse_s:10,.0f} tok/s")
    print(f"ratio analyse/encode: {analyse_s / encode_s:.2f}")


if __name__ == "__main__":
    main()
