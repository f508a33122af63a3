"""The toy world (DESIGN §2.3) and a scaled-down toy benchmark: DFC vs standard crosscoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.dfc.toy import ToyConfig, ToyWorld, score_recovery, toy_source
from xdiff_cli.dfc.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_toy_world_has_disjoint_exclusive_sets_and_rescaled_b_concepts() -> None:
    world = ToyWorld(ToyConfig(n_concepts=400, d=32, seed=1))
    assert len(world.only_a) == len(world.only_b) == 10 and len(world.shared) == 380
    assert not set(world.only_a) & set(world.only_b)
    assert np.allclose(np.linalg.norm(world.concepts_a, axis=1), 1.0)
    assert np.median(np.linalg.norm(world.concepts_b, axis=1)) == pytest.approx(1.0)
    assert 1.0 < world.mean_active() < 10.0


def test_exclusive_concepts_never_reach_the_other_model() -> None:
    cfg = ToyConfig(n_concepts=64, d=64, noise=0.0, seed=2)
    world = ToyWorld(cfg)
    x_a, x_b = world.sample(4000)
    # With 64 concepts in 64 dims the concept matrix is invertible: recover the magnitudes.
    mags_a = np.linalg.solve(world.concepts_a.T, x_a.double().numpy().T).T
    mags_b = np.linalg.lstsq(world.concepts_b.T, x_b.double().numpy().T, rcond=None)[0].T
    assert np.abs(mags_a[:, world.only_b]).max() < 1e-4
    assert np.abs(mags_b[:, world.only_a]).max() < 1e-4
    assert mags_a[:, world.only_a].max() > 0.5 and mags_b[:, world.only_b].max() > 0.5
    assert mags_a.min() > -1e-4 and mags_a.max() < 1 + 1e-4  # magnitudes are U(0, 1)


def test_scoring_counts_a_planted_decoder_as_recovered_only_in_the_right_block() -> None:
    world = ToyWorld(ToyConfig(n_concepts=200, d=32, exclusive_frac=0.05, seed=3))
    model = Crosscoder(CrosscoderConfig(d_a=32, d_b=32, dict_size=40, k=4, exclusive_frac=0.05))  # 2 per block
    with torch.no_grad():
        model.W_dec_FA.zero_()
        model.W_dec_FB.zero_()
        model.W_dec_FA[0] = torch.from_numpy(world.concepts_a[world.only_a[0]])  # right block
        model.W_dec_FB[2] = torch.from_numpy(world.concepts_b[world.only_b[0]])  # right block
        model.W_dec_FA[1] = torch.from_numpy(world.concepts_a[world.shared[0]])  # false positive
        s = world.shared[1]
        model.W_dec_FA[10] = torch.from_numpy(world.concepts_a[s])  # a shared feature, both sides
        model.W_dec_FB[10] = torch.from_numpy(world.concepts_b[s])
        model.W_dec_FA[11] = torch.from_numpy(world.concepts_a[world.only_a[1]])  # exclusive concept, shared block
    rec = score_recovery(model, world)
    assert rec.excl_recall == pytest.approx(2 / 20)
    assert rec.excl_recall_anywhere == pytest.approx(3 / 20)
    assert rec.shared_recall == pytest.approx(1 / 180)
    assert rec.false_pos == 1


def _train_toy(arch: str, world: ToyWorld, source, steps: int) -> Crosscoder:  # noqa: ANN001
    cc = CrosscoderConfig(d_a=world.cfg.d, d_b=world.cfg.d, dict_size=128, k=4, arch=arch, exclusive_frac=0.1)
    tc = TrainConfig(steps=steps, batch_size=256, lr=3e-3, seed=0, device="cpu")
    trainer = Trainer(source, cc, tc, torch.device("cpu"))
    for _ in range(steps):
        trainer.train_step()
    return trainer.model


def test_dfc_recovers_more_exclusive_concepts_than_a_standard_crosscoder() -> None:
    # Scaled down from the paper (2,048 concepts in d=256): 256 concepts in d=128, 5% (13)
    # exclusive to each model, a dictionary of 128 — half the concepts, the regime where the
    # paper finds the gap — with 10% (13 features) per DFC exclusive block. The standard
    # crosscoder spends its few features on shared concepts (measured: DFC 0.46, XC 0.12).
    world = ToyWorld(ToyConfig(n_concepts=256, d=128, exclusive_frac=0.05, seed=0))
    source = toy_source(world, 60_000)
    dfc = score_recovery(_train_toy("dfc", world, source, 1000), world)
    xc = score_recovery(_train_toy("crosscoder", world, source, 1000), world)
    assert dfc.excl_recall >= xc.excl_recall + 0.15, (dfc, xc)
    assert dfc.excl_recall >= 0.3, dfc
    # The paper's price: the DFC places some shared concepts in exclusive blocks.
    assert dfc.false_pos >= xc.false_pos
