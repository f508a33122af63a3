"""A fabricated eval split + hand-built crosscoder whose analysis results are known in advance.

Activations are one-hot "concept" dimensions; the crosscoder's weights read those dimensions
by hand. Shared by the analysis, `xdiff features` and `xdiff report` tests.
"""

from __future__ import annotations

import random

import torch

from xdiff_cli.data.store import Shard
from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig

ANIMALS = ("cat", "dog", "horse", "tiger", "rabbit", "eagle")
COLORS = ("red", "blue", "green")
FILLER = ("the", "a", "saw", "near", "house", "river", "and", "then")
D_A, D_B = 6, 4
# Concept dimensions: B dim 0 = animal (B only); A dim 1 + B dim 1 = colour (both);
# A dim 2 = the year "1989" (one A token, split in B); A dim 3 = "the".
SPLIT_WORD = "1989"


class FakeStore:
    """An in-memory eval split + document source implementing what analysis reads."""

    scale_a = 2.0
    scale_b = 0.5

    def __init__(self, n_docs: int = 40, docs_per_shard: int = 15, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.texts: list[str] = []
        self.shards: list[Shard] = []
        rows: list[tuple] = []
        for doc_id in range(n_docs):
            words = [rng.choice(FILLER + ANIMALS + COLORS + (SPLIT_WORD,)) for _ in range(rng.randint(8, 20))]
            text, pos = "", []
            for word in words:
                start = len(text) + (1 if text else 0)
                text = f"{text} {word}" if text else word
                pos.append((start, len(text)))
            self.texts.append(text)
            for word, (start, end) in zip(words, pos, strict=True):
                x_a, x_b = torch.zeros(D_A), torch.zeros(D_B)
                magnitude = rng.uniform(0.5, 1.5)
                if word in ANIMALS:
                    x_b[0] = magnitude
                if word in COLORS:
                    x_a[1], x_b[1] = magnitude, magnitude
                if word == SPLIT_WORD:
                    x_a[2] = magnitude
                if word == "the":
                    x_a[3] = magnitude
                # Raw activations are normalised by the store's scale: undo it here.
                start_b = start + 2 if word == SPLIT_WORD else start  # B splits "19"+"89"
                rows.append((doc_id, x_a / self.scale_a, x_b / self.scale_b, start, start_b, end, word, magnitude))
            if (doc_id + 1) % docs_per_shard == 0 or doc_id == n_docs - 1:
                self.shards.append(self._shard(rows))
                self.rows_by_shard = getattr(self, "rows_by_shard", []) + [rows]
                rows = []

    @staticmethod
    def _shard(rows: list[tuple]) -> Shard:
        return Shard(
            acts_a=torch.stack([r[1] for r in rows]).to(torch.bfloat16).float(),
            acts_b=torch.stack([r[2] for r in rows]).to(torch.bfloat16).float(),
            doc_id=torch.tensor([r[0] for r in rows]),
            start_a=torch.tensor([r[3] for r in rows]),
            start_b=torch.tensor([r[4] for r in rows]),
            end=torch.tensor([r[5] for r in rows]),
        )

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(len(s.doc_id) for s in self.shards)

    def load_shard(self, index: int) -> Shard:
        return self.shards[index]

    def document_text(self, doc_id: int) -> str:
        return self.texts[doc_id]

    def words(self) -> list[tuple[str, float]]:
        return [(r[6], r[7]) for rows in self.rows_by_shard for r in rows]


def hand_built_crosscoder(d_a: int = D_A, d_b: int = D_B) -> Crosscoder:
    """dict 20, 1 A-exclusive (0), 1 B-exclusive (1), 18 shared; weights read the concept dims."""
    cc = Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, dict_size=20, k=2, exclusive_frac=0.05,
                                        scale_a=FakeStore.scale_a, scale_b=FakeStore.scale_b))
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        cc.W_enc_BF[0, 1] = 1.0  # B-exclusive: animals
        cc.W_dec_FB[1, 0] = 1.0
        cc.W_enc_AF[2, 0] = 1.0  # A-exclusive: the split word "1989"
        cc.W_dec_FA[0, 2] = 1.0
        cc.W_enc_AF[1, 2] = 0.5  # shared, balanced decoder: colours
        cc.W_enc_BF[1, 2] = 0.5
        cc.W_dec_FA[2, 1] = 1.0
        cc.W_dec_FB[2, 1] = 1.0
        cc.W_enc_AF[3, 3] = 1.0  # shared, balanced: only ever "the"
        cc.W_dec_FA[3, 3] = 1.0
        cc.W_dec_FB[3, 0] = 1.0
        cc.W_enc_AF[1, 5] = 0.25  # shared, but its decoder is almost all A (R > 0.8): colours too
        cc.W_dec_FA[5, 1] = 1.0
        cc.W_dec_FB[5, 1] = 0.05
        # Feature 4 and 6..19: no weights at all, so they never fire (dead).
        cc.threshold.fill_(0.0)
    return cc


def make_analysed_run(name: str = "fake-run", *, analysed: bool = True, models: dict | None = None):
    """A run directory (under $XDIFF_HOME) whose analysis.sqlite comes from the fake store."""
    from xdiff_cli.findings.analysis import AnalysisConfig, analyze
    from xdiff_cli.run.runs import Run
    from xdiff_cli.run.settings import RunSettings

    run = Run.create(RunSettings(model_a="org/model-a", model_b="org/model-b", dict_size=20, k=2), name=name)
    run.set_model("a", (models or {}).get("a", {"spec": "org/model-a", "revision": "abc123", "layer": 2}))
    run.set_model("b", (models or {}).get("b", {"spec": "org/model-b", "revision": "def456", "layer": 3}))
    run.set_metrics(fve_a=0.81, fve_b=0.79)
    for stage in ("pull", "harvest"):  # harvested; trained and analysed only when `analysed`
        run.mark_stage(stage, "done")
    if analysed:
        store = FakeStore()
        analyze(hand_built_crosscoder(), store, store, run.analysis_path, config=AnalysisConfig(top_k=8),
                meta={"models": {side: m.to_json() for side, m in run.models.items()}})
        run.mark_stage("train", "done")
        run.mark_stage("analyze", "done")
    return run
