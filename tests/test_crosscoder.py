"""The crosscoder module: partition invariants, BatchTopK, threshold, sparse decoding, persistence."""

from __future__ import annotations

import pytest
import torch

from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer, aux_k_losses
from xdiff_cli.errors import XdiffError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_source(n: int = 2048, d_a: int = 12, d_b: int = 20, seed: int = 0) -> InMemorySource:
    g = torch.Generator().manual_seed(seed)
    # Low-rank structure plus noise so the crosscoder has something to learn.
    z = torch.relu(torch.randn(n, 32, generator=g)) * (torch.rand(n, 32, generator=g) < 0.2)
    acts_a = z @ torch.randn(32, d_a, generator=g) + 0.05 * torch.randn(n, d_a, generator=g)
    acts_b = z @ torch.randn(32, d_b, generator=g) + 0.05 * torch.randn(n, d_b, generator=g)
    return InMemorySource(acts_a, acts_b, shard_size=512)


def _dfc(dict_size: int = 80, k: int = 4, d_a: int = 12, d_b: int = 20) -> Crosscoder:
    torch.manual_seed(0)
    return Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, dict_size=dict_size, k=k, exclusive_frac=0.1))


def test_forbidden_weights_are_zero_at_init_and_blocks_have_the_configured_sizes() -> None:
    model = _dfc()
    labels = model.partition_labels()
    assert labels.count("a") == labels.count("b") == 8 and labels.count("shared") == 64
    assert labels[:8] == ["a"] * 8 and labels[8:16] == ["b"] * 8
    for name, weights in model.forbidden_weights().items():
        assert torch.count_nonzero(weights) == 0, name
    # Allowed weights are not zero, and shared decoder rows start at norm 0.4 across both models
    # (exclusive rows at the same Σ‖d‖: tests/test_discovery.py).
    norm_a, norm_b = model.decoder_norms()
    assert torch.allclose((norm_a**2 + norm_b**2).sqrt()[16:], torch.full((64,), 0.4), atol=1e-6)
    assert torch.all(norm_a[:8] > 0) and torch.all(norm_b[8:16] > 0)


def test_exclusive_weights_stay_exactly_zero_after_many_steps_with_auxk_active() -> None:
    source = _random_source()
    cc = CrosscoderConfig(d_a=12, d_b=20, dict_size=80, k=4, exclusive_frac=0.1)
    # A dead window of one batch makes most features "dead" at once, so AuxK is active.
    tc = TrainConfig(steps=150, batch_size=128, lr=3e-3, dead_window_tokens=128, device="cpu")
    trainer = Trainer(source, cc, tc, torch.device("cpu"))
    aux_seen = 0.0
    for _ in range(tc.steps):
        out = trainer.train_step()
        aux_seen += float(out.aux_loss)
    assert aux_seen > 0, "AuxK never ran; the test would not cover it"
    for name, weights in trainer.model.forbidden_weights().items():
        assert torch.count_nonzero(weights) == 0, name
    # Adam's moments for forbidden weights stay zero as well (no drift later).
    state = trainer.optimizer.state[trainer.model.W_dec_FB]
    assert torch.count_nonzero(state["exp_avg"][:8]) == 0 and torch.count_nonzero(state["exp_avg_sq"][:8]) == 0
    # ... while the allowed weights did train.
    assert torch.count_nonzero(trainer.model.W_dec_FA[:8]) > 0


def test_auxk_term_of_one_model_sends_no_gradient_into_the_other_models_exclusive_features() -> None:
    model = _dfc()
    x_a, x_b = torch.randn(64, 12), torch.randn(64, 20)
    acts = model.pre_activations(x_a, x_b)
    resid_a, resid_b = torch.randn(64, 12), torch.randn(64, 20)
    dead = torch.ones(80, dtype=torch.bool)  # every feature dead: AuxK may use any of them
    aux_a, aux_b = aux_k_losses(model, acts, resid_a, resid_b, dead, k_aux=16)
    a, b = model.cfg.block("a"), model.cfg.block("b")
    # b_enc and the *allowed* encoder columns carry no gradient mask, so a zero here is
    # structural: model A's AuxK term cannot reach B-exclusive features at all.
    g_benc, g_enc_b = torch.autograd.grad(aux_a, [model.b_enc_F, model.W_enc_BF], retain_graph=True)
    assert torch.count_nonzero(g_benc[b.start : b.stop]) == 0
    assert torch.count_nonzero(g_enc_b[:, b.start : b.stop]) == 0
    assert torch.count_nonzero(g_benc[a.start : a.stop]) > 0
    g_benc, g_enc_a = torch.autograd.grad(aux_b, [model.b_enc_F, model.W_enc_AF], retain_graph=True)
    assert torch.count_nonzero(g_benc[a.start : a.stop]) == 0
    assert torch.count_nonzero(g_enc_a[:, a.start : a.stop]) == 0
    # And the sum of both terms leaves every forbidden weight without gradient.
    grads = torch.autograd.grad(aux_a + aux_b, [model.W_enc_AF, model.W_enc_BF, model.W_dec_FA, model.W_dec_FB])
    g_enc_a, g_enc_b, g_dec_a, g_dec_b = grads
    assert torch.count_nonzero(g_enc_a[:, b.start : b.stop]) == 0
    assert torch.count_nonzero(g_enc_b[:, a.start : a.stop]) == 0
    assert torch.count_nonzero(g_dec_a[b.start : b.stop]) == 0
    assert torch.count_nonzero(g_dec_b[a.start : a.stop]) == 0


def test_batch_topk_keeps_k_active_features_per_token_on_average() -> None:
    model = _dfc(dict_size=200, k=7)
    x_a, x_b = torch.randn(256, 12), torch.randn(256, 20)
    f = model.encode(x_a, x_b, k=7)
    assert int((f > 0).sum()) == 7 * 256
    per_token = (f > 0).sum(1).float()
    assert per_token.std() > 0  # the budget is shared across the batch, not fixed per token


def test_sparse_decode_matches_dense_decode_values_and_gradients() -> None:
    model = _dfc(dict_size=64, k=5)
    x_a, x_b = torch.randn(32, 12), torch.randn(32, 20)
    acts = model.pre_activations(x_a, x_b)
    dense_f, dense_min = model.batch_topk(acts, 5)
    sparse_f, sparse_min = model.batch_topk_sparse(acts, 5)
    assert torch.allclose(sparse_f.to_dense(), dense_f)
    assert torch.allclose(dense_min, sparse_min)
    dense_out = sum(x.pow(2).sum() for x in model.decode(dense_f))
    sparse_out = sum(x.pow(2).sum() for x in model.decode_sparse(sparse_f))
    assert torch.allclose(dense_out, sparse_out, rtol=1e-5)
    params = [model.W_enc_AF, model.W_dec_FA, model.W_dec_FB, model.b_enc_F]
    for g_dense, g_sparse in zip(torch.autograd.grad(dense_out, params, retain_graph=True), torch.autograd.grad(sparse_out, params), strict=True):
        assert torch.allclose(g_dense, g_sparse, atol=1e-5)


def test_inference_uses_the_learned_threshold_and_refuses_without_one() -> None:
    model = _dfc()
    x_a, x_b = torch.randn(16, 12), torch.randn(16, 20)
    with pytest.raises(XdiffError, match="no calibrated threshold"):
        model.encode(x_a, x_b)
    acts = model.pre_activations(x_a, x_b)
    scores = model.ranking_scores(acts)
    model.threshold.fill_(float(scores[scores > 0].median().detach()))
    f = model.encode(x_a, x_b)
    assert torch.equal(f > 0, scores > model.threshold)


def test_threshold_learned_in_training_gives_about_k_active_features_at_inference() -> None:
    source = _random_source(n=4096)
    cc = CrosscoderConfig(d_a=12, d_b=20, dict_size=80, k=4, exclusive_frac=0.1)
    tc = TrainConfig(steps=300, batch_size=256, lr=3e-3, device="cpu")
    trainer = Trainer(source, cc, tc, torch.device("cpu"))
    for _ in range(tc.steps):
        trainer.train_step()
    model = trainer.model
    assert float(model.threshold) > 0
    x_a, x_b = source.acts_a[:2048], source.acts_b[:2048]
    with torch.no_grad():
        l0 = float((model.encode(x_a, x_b) > 0).sum(1).float().mean())
    assert 2.0 < l0 < 8.0, l0


def test_save_load_round_trips_weights_partition_threshold_and_scales(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = CrosscoderConfig(d_a=12, d_b=20, dict_size=80, k=4, exclusive_frac=0.1, scale_a=0.5, scale_b=2.0)
    model = Crosscoder(cfg)
    model.threshold.fill_(0.25)
    model.save(tmp_path / "cc")
    loaded = Crosscoder.load(tmp_path / "cc")
    assert loaded.cfg == cfg
    assert loaded.partition_labels() == model.partition_labels()
    for (name, t), (_, u) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(t, u), name
    for name, weights in loaded.forbidden_weights().items():
        assert torch.count_nonzero(weights) == 0, name


def test_standard_crosscoder_has_no_partition() -> None:
    model = Crosscoder(CrosscoderConfig(d_a=12, d_b=20, dict_size=40, arch="crosscoder"))
    assert model.partition_labels() == ["shared"] * 40
    assert all(w.numel() == 0 for w in model.forbidden_weights().values())
