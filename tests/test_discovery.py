"""Issue 19, discovery: the loss and AuxK forms that keep exclusive blocks alive, the dead
share per block, artifact demotion in the ranking, the contextual planted pair, and a TUI
that opens on live features. Seconds in all: no model is trained here beyond a few steps."""

from __future__ import annotations

import math

import pytest
import torch

from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer, aux_k_joint, training_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dfc(dict_size: int = 80, d_a: int = 12, d_b: int = 20, **kw) -> Crosscoder:  # noqa: ANN003
    torch.manual_seed(0)
    return Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, dict_size=dict_size, k=4, exclusive_frac=0.1, **kw))


# --- loss and AuxK ------------------------------------------------------------------------


def test_l2_reconstruction_is_the_unsquared_error_norm_averaged_over_tokens_and_models() -> None:
    model = _dfc()
    x_a, x_b = torch.randn(32, 12), torch.randn(32, 20)
    none_dead = torch.zeros(80, dtype=torch.bool)
    out = training_forward(model, x_a, x_b, 4, none_dead, TrainConfig(recon_loss="l2"))
    with torch.no_grad():
        xa_hat, xb_hat = model.decode(model.encode(x_a, x_b, k=4))
    expected = ((x_a - xa_hat).norm(dim=-1).mean() + (x_b - xb_hat).norm(dim=-1).mean()) / 2
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    squared = training_forward(model, x_a, x_b, 4, none_dead, TrainConfig(recon_loss="mse"))
    assert float(squared.loss.detach()) == pytest.approx(float(((x_a - xa_hat).pow(2).sum() + (x_b - xb_hat).pow(2).sum()) / 32), rel=1e-5)


def test_joint_auxk_fits_both_residuals_relative_to_their_variance_with_dead_features_only() -> None:
    model = _dfc()
    x_a, x_b = torch.randn(64, 12), torch.randn(64, 20)
    acts = model.pre_activations(x_a, x_b)
    resid_a, resid_b = torch.randn(64, 12), torch.randn(64, 20)
    none = torch.zeros(80, dtype=torch.bool)
    assert float(aux_k_joint(model, acts, resid_a, resid_b, none, k_aux=8)) == 0.0
    dead = torch.zeros(80, dtype=torch.bool)
    dead[[3, 12, 40]] = True
    aux = aux_k_joint(model, acts, resid_a, resid_b, dead, k_aux=8)  # k_aux capped at 3 dead features
    dead_f = acts * dead[None, :]
    approx_a, approx_b = dead_f @ model.W_dec_FA, dead_f @ model.W_dec_FB
    var = (resid_a - resid_a.mean(0)).pow(2).sum() + (resid_b - resid_b.mean(0)).pow(2).sum()
    expected = ((resid_a - approx_a).pow(2).sum() + (resid_b - approx_b).pow(2).sum()) / var
    assert float(aux) == pytest.approx(float(expected), rel=1e-5)
    # Scale-free: ~1 when the dead features explain nothing, whatever the activations' scale.
    assert float(aux_k_joint(model, acts * 0, resid_a * 100, resid_b * 100, dead, 8)) == pytest.approx(
        float(((resid_a * 100).pow(2).sum() + (resid_b * 100).pow(2).sum()) / (var * 1e4)), rel=1e-4
    )


def test_joint_auxk_picks_dead_features_by_activation_times_decoder_norm() -> None:
    model = _dfc()
    with torch.no_grad():
        model.W_dec_FA[20] *= 10  # feature 20: small activation, large decoder
        model.W_dec_FB[20] *= 10
    acts = torch.zeros(1, 80)
    acts[0, 20], acts[0, 30] = 1.0, 3.0
    dead = torch.zeros(80, dtype=torch.bool)
    dead[[20, 30]] = True
    resid_a, resid_b = torch.randn(1, 12), torch.randn(1, 20)
    acts.requires_grad_(True)
    aux_k_joint(model, acts, resid_a, resid_b, dead, k_aux=1).backward()
    assert acts.grad[0, 20] != 0 and acts.grad[0, 30] == 0


def test_joint_auxk_sends_no_gradient_across_the_partition() -> None:
    model = _dfc()
    x_a, x_b = torch.randn(64, 12), torch.randn(64, 20)
    a, b = model.cfg.block("a"), model.cfg.block("b")
    dead = torch.ones(80, dtype=torch.bool)
    resid_a = torch.randn(64, 12)

    def grad_a_block(resid_b: torch.Tensor) -> torch.Tensor:
        acts = model.pre_activations(x_a, x_b)
        aux = aux_k_joint(model, acts, resid_a, resid_b, dead, k_aux=16)
        g_benc, g_enc_a, g_dec_a = torch.autograd.grad(aux, [model.b_enc_F, model.W_enc_AF, model.W_dec_FA])
        return torch.cat([g_benc[a.start : a.stop], g_enc_a[:, a.start : a.stop].flatten(), g_dec_a[: a.stop].flatten()])

    # B's residual only rescales the whole term (through the shared variance normaliser):
    # what A-exclusive features learn from AuxK points the same way whatever B's residual is.
    g1, g2 = grad_a_block(torch.randn(64, 20)), grad_a_block(5 * torch.randn(64, 20) + 1)
    assert torch.count_nonzero(g1) > 0
    assert float(torch.nn.functional.cosine_similarity(g1, g2, dim=0)) == pytest.approx(1.0, abs=1e-5)
    acts = model.pre_activations(x_a, x_b)
    aux = aux_k_joint(model, acts, torch.randn(64, 12), torch.randn(64, 20), dead, k_aux=16)
    grads = torch.autograd.grad(aux, [model.W_enc_AF, model.W_enc_BF, model.W_dec_FA, model.W_dec_FB])
    for name, g in zip(("W_enc_AF[:, b]", "W_enc_BF[:, a]", "W_dec_FA[b]", "W_dec_FB[a]"),
                       (grads[0][:, b.start : b.stop], grads[1][:, a.start : a.stop],
                        grads[2][b.start : b.stop], grads[3][a.start : a.stop]), strict=True):
        assert torch.count_nonzero(g) == 0, name


def _source(n: int = 2048, seed: int = 0) -> InMemorySource:
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, 32, generator=g)) * (torch.rand(n, 32, generator=g) < 0.2)
    return InMemorySource(z @ torch.randn(32, 12, generator=g), z @ torch.randn(32, 20, generator=g), shard_size=512)


@pytest.mark.parametrize("recon_loss, aux_form", [("l2", "joint"), ("mse", "joint"), ("l2", "per_model")])
def test_forbidden_weights_stay_exactly_zero_under_every_loss_form(recon_loss: str, aux_form: str) -> None:
    cc = CrosscoderConfig(d_a=12, d_b=20, dict_size=80, k=4, exclusive_frac=0.1, balance_exclusive_init=True)
    tc = TrainConfig(steps=60, batch_size=128, lr=3e-3, dead_window_tokens=128, device="cpu",
                     recon_loss=recon_loss, aux_form=aux_form)
    trainer = Trainer(_source(), cc, tc, torch.device("cpu"))
    aux_seen = sum(float(trainer.train_step().aux_loss) for _ in range(tc.steps))
    assert aux_seen > 0
    for name, weights in trainer.model.forbidden_weights().items():
        assert torch.count_nonzero(weights) == 0, name
    assert torch.isfinite(trainer.model.W_dec_FA).all()


def test_unknown_loss_forms_are_user_errors() -> None:
    from xdiff_cli.errors import XdiffError

    with pytest.raises(XdiffError, match="reconstruction loss"):
        TrainConfig(recon_loss="l1").validate()
    with pytest.raises(XdiffError, match="AuxK form"):
        TrainConfig(aux_form="both").validate()


def test_balanced_init_gives_exclusive_rows_the_ranking_norm_of_a_shared_row() -> None:
    model = _dfc()  # the default
    norm_a, norm_b = model.decoder_norms()
    total = norm_a + norm_b
    shared_mean = float(total[16:].mean())
    assert shared_mean > 0.4 * 1.3  # split across two models, Σ‖d‖ exceeds the L2 norm 0.4
    assert torch.allclose(total[:16], torch.full((16,), shared_mean), rtol=1e-5)
    for name, weights in model.forbidden_weights().items():
        assert torch.count_nonzero(weights) == 0, name
    # Switched off, the paper's init: every row at L2 norm 0.4.
    plain = _dfc(balance_exclusive_init=False)
    assert torch.allclose(sum(n**2 for n in plain.decoder_norms()).sqrt(), torch.full((80,), 0.4), atol=1e-6)


def test_training_log_and_result_report_the_dead_share_of_each_block(tmp_path) -> None:  # noqa: ANN001
    import json

    from xdiff_cli.dfc.training import train

    cc = CrosscoderConfig(d_a=12, d_b=20, dict_size=80, k=4, exclusive_frac=0.1)
    tc = TrainConfig(steps=6, batch_size=128, lr=1e-3, device="cpu", log_every=3, checkpoint_every=6)
    result = train(_source(), cc, tc, tmp_path / "cc", progress=False)
    line = json.loads((tmp_path / "cc" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"dead_a", "dead_b", "dead_shared"} <= set(line)
    assert result.dead_blocks == {k: line[k] for k in ("dead_a", "dead_b", "dead_shared")}
    # The overall share is the size-weighted mean of the blocks' shares.
    overall = (8 * line["dead_a"] + 8 * line["dead_b"] + 64 * line["dead_shared"]) / 80
    assert math.isclose(overall, line["dead_fraction"], rel_tol=1e-6)


# --- the browser opens on live features ------------------------------------------------------


async def test_browser_opens_on_live_features_when_an_exclusive_block_is_all_dead(monkeypatch) -> None:  # noqa: ANN001
    import tui_fixtures
    from tui_fixtures import N_EXCLUSIVE, make_run, write_analysis

    from xdiff_cli.tui.app import XdiffApp
    from xdiff_cli.tui.widgets.feature_table import FeatureTable

    real_row = tui_fixtures._feature_row

    def a_block_dead(feature_id: int, rng):  # noqa: ANN001, ANN202
        row = real_row(feature_id, rng)
        if feature_id < N_EXCLUSIVE:  # every A-exclusive feature dead (the case)
            row.update(n_fires=0, frequency=0.0, max_activation=0.0, score=0.0)
        return row

    monkeypatch.setattr(tui_fixtures, "_feature_row", a_block_dead)
    run = make_run()
    write_analysis(run.analysis_path)
    app = XdiffApp()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert screen.partition == "b"
        ids = [int(key.value) for key in screen.query_one(FeatureTable).rows]
        assert ids and all(screen.index.feature(i).alive for i in ids[:3])


# --- artifacts are ranked after real candidates -------------------------------------------------


class _PunctuationStore:
    """Documents of words and punctuation; A dim 0 = any punctuation mark (strong), B dim 0 =
    an animal word (weaker). One shard, scales 1."""

    scale_a = scale_b = 1.0
    WORDS = ("cat", "dog", "tree", "house", "river", "the", "a", "saw")
    MARKS = (".", ",", "!", "?", ";", ":")

    def __init__(self) -> None:
        import random

        from xdiff_cli.data.store import Shard

        rng = random.Random(0)
        self.texts, rows = [], []
        for doc in range(30):
            tokens = [rng.choice(self.WORDS + self.MARKS) for _ in range(25)]
            text, spans = "", []
            for tok in tokens:
                start = len(text) + 1 if text else 0
                text = f"{text} {tok}" if text else tok
                spans.append((start, len(text)))
            self.texts.append(text)
            for tok, (s, e) in zip(tokens, spans, strict=True):
                x_a, x_b = torch.zeros(3), torch.zeros(3)
                x_a[2] = x_b[2] = 0.1  # a little shared signal everywhere
                if tok in self.MARKS:
                    x_a[0] = 3.0
                if tok in ("cat", "dog"):
                    x_b[0] = 1.0
                rows.append((doc, x_a, x_b, s, e))
        self.shard = Shard(
            acts_a=torch.stack([r[1] for r in rows]), acts_b=torch.stack([r[2] for r in rows]),
            doc_id=torch.tensor([r[0] for r in rows]), start_a=torch.tensor([r[3] for r in rows]),
            start_b=torch.tensor([r[3] for r in rows]), end=torch.tensor([r[4] for r in rows]),
        )

    num_shards = 1

    @property
    def n_tokens(self) -> int:
        return int(self.shard.doc_id.numel())

    def load_shard(self, index: int):  # noqa: ANN201
        return self.shard

    def document_text(self, doc_id: int) -> str:
        return self.texts[doc_id]


def test_punctuation_features_are_labelled_artifacts_and_ranked_after_real_candidates(tmp_path) -> None:  # noqa: ANN001
    from xdiff_cli.findings.analysis import AnalysisConfig, analyze
    from xdiff_cli.findings.feature_index import FeatureIndex

    cc = Crosscoder(CrosscoderConfig(d_a=3, d_b=3, dict_size=20, k=2, exclusive_frac=0.05))
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        cc.W_enc_AF[0, 0] = cc.W_dec_FA[0, 0] = 1.0  # A-exclusive: punctuation (6 mark types, strong)
        cc.W_enc_BF[0, 1] = cc.W_dec_FB[1, 0] = 1.0  # B-exclusive: two animal words (weaker)
        cc.threshold.fill_(0.0)
    store = _PunctuationStore()
    path = analyze(cc, store, store, tmp_path / "analysis.sqlite", config=AnalysisConfig(top_k=8))
    index = FeatureIndex.open(path)
    try:
        punct, animal = index.feature(0), index.feature(1)
        assert punct.n_distinct_tokens == 6 > animal.n_distinct_tokens  # broader, and stronger...
        assert punct.max_activation > animal.max_activation
        assert punct.label.startswith("artifact:") and animal.label is None
        assert animal.rank < punct.rank  # ...yet ranked after the real candidate
        assert index.meta["summary"]["n_junk_artifacts"] == 1
    finally:
        index.close()


def test_junk_word_types_and_document_positions() -> None:
    from xdiff_cli.findings.analysis import is_junk_type, positions_in_doc

    assert all(is_junk_type(w) for w in ("", ".", "...", ",\"", "<|im_start|>", "—", "🙂"))
    assert not any(is_junk_type(w) for w in ("cat", "1989", "don't", "東京"))
    assert positions_in_doc(torch.tensor([4, 4, 4, 7, 7, 9])).tolist() == [0, 1, 2, 0, 1, 0]
