"""Issue 20, training speed: the optimised step (xdiff_cli/dfc/sparse_step.py) equals the plain
dense step — loss, every gradient, AuxK picks, partition invariants — on small random data,
with and without dead features, on both of its routes (CPU pre-filter / sync-free GPU form)."""

from __future__ import annotations

import pytest
import torch

from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.dfc.sparse_step import encoder_preacts, select_aux, select_batch_topk
from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer, training_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, D_A, D_B, FEATURES = 64, 12, 20, 96


def _model(seed: int = 0) -> Crosscoder:
    torch.manual_seed(seed)
    model = Crosscoder(CrosscoderConfig(d_a=D_A, d_b=D_B, dict_size=FEATURES, k=4, exclusive_frac=0.1))
    with torch.no_grad():  # a trained-looking encoder: biases spread the pre-activations
        model.b_enc_F.copy_(torch.randn(FEATURES) * 0.3)
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D_A, generator=g), torch.randn(N, D_B, generator=g)


def _dead(n_dead: int) -> torch.Tensor:
    dead = torch.zeros(FEATURES, dtype=torch.bool)
    dead[torch.randperm(FEATURES, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    return dead


def _loss_and_grads(model: Crosscoder, dead: torch.Tensor, sparse: bool, sync_free: bool | None = None):  # noqa: ANN202
    x_a, x_b = _batch()
    model.zero_grad(set_to_none=True)
    tc = TrainConfig(sparse_decode=sparse, k_aux=8)
    out = training_forward(model, x_a, x_b, 4, dead, tc, sync_free=sync_free)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out, grads


@pytest.fixture(params=["sparse-decode", "dense-decode"])
def decode_route(request, monkeypatch):  # noqa: ANN001, ANN201
    """Both decoder routes: embedding_bag (big dictionaries) and the dense matmul (small)."""
    import xdiff_cli.dfc.sparse_step as sparse_step

    monkeypatch.setattr(
        sparse_step, "DENSE_DECODE_MAX_RATIO", 0 if request.param == "sparse-decode" else 10**6
    )
    return request.param


@pytest.mark.parametrize("n_dead", [0, 3, 40], ids=["no-dead", "fewer-dead-than-k_aux", "many-dead"])
@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu-route", "sync-free-route"])
def test_optimised_step_matches_dense_step_loss_and_every_gradient(
    n_dead: int, sync_free: bool, decode_route: str
) -> None:
    model = _model()
    dead = _dead(n_dead)
    ref, ref_grads = _loss_and_grads(model, dead, sparse=False)
    model.threshold.fill_(-1.0 if sync_free else 0.05)  # CPU route: exercise the pre-filter
    fast, fast_grads = _loss_and_grads(model, dead, sparse=True, sync_free=sync_free)
    assert float(fast.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    assert float(fast.aux_loss) == pytest.approx(float(ref.aux_loss), rel=1e-5, abs=1e-7)
    assert (float(ref.aux_loss) > 0) == (n_dead > 0)
    assert float(fast.min_kept) == pytest.approx(float(ref.min_kept), rel=1e-5)
    assert torch.equal(fast.fired_F, ref.fired_F)
    assert int(fast.n_active) == int(ref.n_active)
    for name, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # The sparse encoder gradient keeps the partition: forbidden encoder entries get exactly 0.
    b, a = model.cfg.block("b"), model.cfg.block("a")
    assert torch.count_nonzero(fast_grads["W_enc_AF"][:, b.start : b.stop]) == 0
    assert torch.count_nonzero(fast_grads["W_enc_BF"][:, a.start : a.stop]) == 0


def test_prefiltered_topk_equals_full_topk_and_falls_back_when_too_few_survive() -> None:
    model = _model()
    pre = encoder_preacts(model, *_batch(), sync_free=False)
    norm = sum(model.decoder_norms()).detach()
    n_keep = 4 * N
    full_flat, full_scores = select_batch_topk(pre, norm, n_keep, threshold=None)
    kept_score = float(full_scores.min())
    for threshold in (
        kept_score * 1.2,
        kept_score * 3.0,
        kept_score * 100,
    ):  # pass, pass (cut ≈ edge), fall back
        flat, scores = select_batch_topk(pre, norm, n_keep, threshold=threshold)
        assert torch.equal(flat, full_flat), threshold
        torch.testing.assert_close(scores, full_scores)
    assert torch.equal(full_flat, full_flat.sort().values)  # grouped by token for embedding_bag


def test_auxk_picks_on_dead_columns_match_dense_ranking_on_both_routes() -> None:
    model = _model()
    pre = encoder_preacts(model, *_batch(), sync_free=False)
    norm = sum(model.decoder_norms()).detach()
    dead = _dead(30)
    dense_scores = torch.where(dead[None, :], pre.clamp_min(0) * norm, torch.full_like(pre, -1.0))
    expected = dense_scores.topk(8, dim=-1).indices.sort(-1).values
    cpu_feature, cpu_weight = select_aux(pre, norm, dead, 8, sync_free=False)
    gpu_feature, gpu_weight = select_aux(pre, norm, dead, 8, sync_free=True)
    assert torch.equal(cpu_feature.sort(-1).values, expected)
    assert torch.equal(gpu_feature.sort(-1).values, expected)
    assert bool((cpu_weight == 1).all()) and bool((gpu_weight == 1).all())
    assert select_aux(pre, norm, torch.zeros_like(dead), 8, sync_free=False) is None
    # Fewer dead than k_aux: the fixed-size route fills with live features at weight 0.
    few = _dead(3)
    feature, weight = select_aux(pre, norm, few, 8, sync_free=True)
    assert bool((weight == few[feature].float()).all()) and int(weight.sum(-1).min()) == 3


def test_optimised_training_equals_dense_training_and_keeps_forbidden_weights_zero(decode_route: str) -> None:
    g = torch.Generator().manual_seed(3)
    source = InMemorySource(
        torch.randn(1024, D_A, generator=g), torch.randn(1024, D_B, generator=g), shard_size=256
    )
    cc = CrosscoderConfig(d_a=D_A, d_b=D_B, dict_size=FEATURES, k=4, exclusive_frac=0.1)
    losses = {}
    for sparse in (False, True):
        # A short dead window so AuxK is active for most of the run.
        tc = TrainConfig(
            steps=30, batch_size=64, lr=3e-3, sparse_decode=sparse, dead_window_tokens=128, buffer_tokens=256
        )
        trainer = Trainer(source, cc, tc, torch.device("cpu"))
        losses[sparse] = [float(trainer.train_step().loss.detach()) for _ in range(tc.steps)]
        assert bool(trainer.dead_mask().any())
        for name, w in trainer.model.forbidden_weights().items():
            assert torch.count_nonzero(w) == 0, name
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
