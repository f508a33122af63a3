"""Analysis: per-feature statistics, breadth-capped top examples, artifacts and ranking.

Most tests run `analyze` on a fabricated eval split whose activations are one-hot "concept"
dimensions, and a crosscoder whose weights read those dimensions by hand (see
`analysis_fixtures.py`) — so every number the analysis reports is known in advance.
"""

from __future__ import annotations

import pytest
import torch
from analysis_fixtures import ANIMALS, COLORS, D_A, D_B, SPLIT_WORD, FakeStore, hand_built_crosscoder

from xdiff_cli.findings.analysis import AnalysisConfig, analyze, capped_topk, frequency_band
from xdiff_cli.findings.feature_index import FeatureIndex


@pytest.fixture(scope="module")
def fake_store() -> FakeStore:
    return FakeStore()


@pytest.fixture(scope="module")
def index(fake_store: FakeStore, tmp_path_factory: pytest.TempPathFactory) -> FeatureIndex:
    path = tmp_path_factory.mktemp("analysis") / "analysis.sqlite"
    cfg = AnalysisConfig(top_k=8, batch_tokens=37)  # odd batch size: pools merge across batches and shards
    analyze(hand_built_crosscoder(), fake_store, fake_store, path, config=cfg, meta={"note": "fake"})
    return FeatureIndex.open(path)


def test_frequency_and_max_activation_match_the_planted_data(index: FeatureIndex, fake_store: FakeStore):
    words = fake_store.words()
    animal_mags = [m for w, m in words if w in ANIMALS]
    b_excl = index.feature(1)
    assert b_excl.partition == "b"
    assert b_excl.n_fires == len(animal_mags)
    assert b_excl.frequency == pytest.approx(len(animal_mags) / len(words))
    # bf16 storage rounds raw activations; normalised value = raw * scale.
    assert b_excl.max_activation == pytest.approx(max(animal_mags), rel=1e-2)
    assert b_excl.mean_activation == pytest.approx(sum(animal_mags) / len(animal_mags), rel=1e-2)
    assert sum(b_excl.histogram["counts"]) == b_excl.n_fires
    assert len(b_excl.histogram["edges"]) == len(b_excl.histogram["counts"]) + 1


def test_b_exclusive_examples_are_animal_tokens_strongest_first_with_breadth(index: FeatureIndex):
    feature = index.feature(1)
    examples = feature.examples_for("b")
    assert len(examples) == 8 and not feature.examples_for("a")
    fired = [e.text[e.start : e.end] for e in examples]
    assert all(word in ANIMALS for word in fired)
    acts = [e.activation for e in examples]
    assert acts == sorted(acts, reverse=True)
    # Per-type cap: no word more than 3 times, so at least 3 different animals shown.
    assert max(fired.count(w) for w in set(fired)) <= 3
    assert len(set(fired)) >= 3
    assert feature.n_distinct_tokens == len(ANIMALS)
    assert not feature.token_artifact and feature.candidate


def test_token_acts_highlight_the_firing_token_and_nothing_else(index: FeatureIndex):
    for example in index.feature(1).examples_for("b"):
        spans = {(s, e): a for s, e, a in example.token_acts}
        assert spans[(example.start, example.end)] == pytest.approx(example.activation, rel=1e-2)
        for (s, e), a in spans.items():
            word = example.text[s:e]
            assert (a > 0) == (word in ANIMALS), (word, a)


def test_example_window_is_document_text_cut_around_the_token(index: FeatureIndex, fake_store: FakeStore):
    for example in index.feature(2).examples:
        doc = fake_store.texts[example.doc_id]
        assert example.text in doc
        assert 0 <= example.start < example.end <= len(example.text)
        # At most 12 aligned tokens of left context, 4 of right context.
        assert len(example.token_acts) <= 12 + 1 + 4


def test_shared_features_have_examples_from_both_models_points_of_view(index: FeatureIndex):
    feature = index.feature(2)
    a, b = feature.examples_for("a"), feature.examples_for("b")
    assert len(a) == len(b) == 8
    assert [e.activation for e in a] == [e.activation for e in b]
    assert all(e.text[e.start : e.end] in COLORS for e in a + b)


def test_split_word_feature_is_labelled_a_tokenization_artifact_and_ranked_below(index: FeatureIndex):
    artifact = index.feature(0)
    assert artifact.partition == "a"
    assert artifact.token_artifact and artifact.top_token == SPLIT_WORD
    assert artifact.top_token_share == pytest.approx(1.0)
    assert "tokenization artifact" in artifact.label and SPLIT_WORD in artifact.label
    # In B's view the artifact token is the split piece "89"; in A's the whole word.
    example = artifact.examples_for("a")[0]
    assert example.text[example.start : example.end] == SPLIT_WORD
    assert artifact.rank > index.feature(1).rank
    assert artifact.rank > index.feature(5).rank


def test_one_word_shared_feature_is_not_an_artifact_nor_a_candidate(index: FeatureIndex):
    the = index.feature(3)
    assert the.partition == "shared" and the.rel_norm == pytest.approx(0.5)
    assert not the.candidate and not the.token_artifact  # "the" is tokenised alike
    assert the.top_token == "the" and the.n_distinct_tokens == 1
    # Never more than 3 examples of one word type, even when it is the only one.
    assert len(the.examples_for("a")) == 3


def test_shared_feature_with_lopsided_decoder_is_a_candidate(index: FeatureIndex):
    lopsided = index.feature(5)
    assert lopsided.partition == "shared"
    assert lopsided.rel_norm == pytest.approx(1 / 1.05)
    assert lopsided.candidate
    assert not index.feature(2).candidate  # balanced colour feature


def test_dead_features_have_zero_stats_no_examples_and_rank_last(index: FeatureIndex):
    dead = index.feature(4)
    assert dead.n_fires == 0 and dead.frequency == 0 and dead.max_activation == 0
    assert dead.examples == [] and dead.histogram == {"edges": [], "counts": []}
    alive_ranks = [f.rank for f in index.features() if f.alive]
    assert dead.rank > max(alive_ranks)
    assert index.meta["summary"]["n_alive"] == 5


def test_ranking_puts_the_broad_b_exclusive_feature_first(index: FeatureIndex):
    ranked = index.features(limit=3)
    assert ranked[0].id == 1
    assert [f.rank for f in index.features()] == list(range(1, 21))


def test_decoder_cosine_is_null_when_widths_differ(index: FeatureIndex):
    assert all(f.dec_cos is None for f in index.features())


def test_decoder_cosine_is_reported_when_widths_match(tmp_path):
    store = FakeStore(n_docs=6)
    # Pad A's activations up to B's width by analysing a crosscoder with d_b = d_a.
    for shard in store.shards:
        shard.acts_b = torch.cat([shard.acts_b, torch.zeros(len(shard.doc_id), D_A - D_B)], 1)
    cc = hand_built_crosscoder(D_A, D_A)
    path = analyze(cc, store, store, tmp_path / "a.sqlite", top_k=4)
    index = FeatureIndex.open(path)
    assert index.feature(2).dec_cos == pytest.approx(1.0)  # same direction in both decoders
    assert index.feature(1).dec_cos is None  # exclusive: one decoder is zero
    assert index.meta["summary"]["eval_fve_a"] <= 1.0


def test_meta_records_summary_and_caller_meta(index: FeatureIndex, fake_store: FakeStore):
    meta = index.meta
    assert meta["note"] == "fake" and meta["complete"] is True
    assert meta["summary"]["n_tokens"] == fake_store.n_tokens
    assert meta["crosscoder"]["dict_size"] == 20


def test_capped_topk_keeps_at_most_cap_per_type_in_activation_order():
    values = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.0]])
    types = torch.tensor([[1, 1, 1, 1, 2, 3, 4]])
    pos = torch.arange(7)[None]
    top_v, top_p, top_t = capped_topk(values, pos, types, keep=5, cap=2)
    assert top_v.tolist() == [[9.0, 8.0, 5.0, 4.0, -1.0]]
    assert top_p.tolist() == [[0, 1, 4, 5, -1]]


def test_frequency_band_rewards_the_middle_decades():
    assert frequency_band(1e-3) == 1.0
    assert frequency_band(0.0) == 0.0
    assert frequency_band(1e-6) == pytest.approx(0.0)
    assert 0 < frequency_band(1e-5) < 1
    assert frequency_band(0.5) < frequency_band(0.05)


def test_empty_eval_split_is_a_user_error(tmp_path):
    from xdiff_cli.errors import XdiffError

    store = FakeStore(n_docs=2)
    store.shards = []
    with pytest.raises(XdiffError, match="no held-out tokens"):
        analyze(hand_built_crosscoder(), store, store, tmp_path / "x.sqlite")
    assert not (tmp_path / "x.sqlite").exists()
