"""`--precision`: bf16 autocast for the crosscoder's forward, fp32 weights and Adam state."""

from __future__ import annotations

import pytest
import torch

from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer, train
from xdiff_cli.errors import XdiffError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CC = CrosscoderConfig(d_a=10, d_b=14, dict_size=48, k=4, exclusive_frac=0.1)


def _source() -> InMemorySource:
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(2000, 24, generator=g)) * (torch.rand(2000, 24, generator=g) < 0.25)
    return InMemorySource(z @ torch.randn(24, 10, generator=g), z @ torch.randn(24, 14, generator=g), shard_size=256)


def _tc(precision: str) -> TrainConfig:
    return TrainConfig(steps=30, batch_size=100, lr=3e-3, device="cpu", checkpoint_every=30, log_every=10,
                       warmup_steps=3, k_anneal_steps=6, dead_window_tokens=400, buffer_tokens=700, precision=precision)


@pytest.mark.parametrize("sparse", [True, False])
def test_bf16_trains_in_bf16_autocast_and_keeps_fp32_weights_and_adam_state(sparse) -> None:
    autocast_seen, results = [], {}
    for precision in ("fp32", "bf16"):
        tc = _tc(precision)
        tc.sparse_decode = sparse
        trainer = Trainer(_source(), CC, tc, torch.device("cpu"))
        original = trainer.model.decoder_norms  # called by both routes inside the forward

        def recording(*args, _original=original, _precision=precision, **kwargs):
            autocast_seen.append((_precision, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return _original(*args, **kwargs)

        object.__setattr__(trainer.model, "decoder_norms", recording)
        for _ in range(tc.steps):
            out = trainer.train_step()
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        state = [s for group in trainer.optimizer.state.values() for s in (group["exp_avg"], group["exp_avg_sq"])]
        assert state and all(s.dtype == torch.float32 for s in state)
        for name, weights in trainer.model.forbidden_weights().items():
            assert torch.count_nonzero(weights) == 0, name
        results[precision] = (trainer.model.state_dict(), float(out.loss.detach()))
    assert {(on, dtype) for p, on, dtype in autocast_seen if p == "bf16"} == {(True, torch.bfloat16)}
    assert {on for p, on, _ in autocast_seen if p == "fp32"} == {False}
    fp32, bf16 = results["fp32"][0], results["bf16"][0]
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # autocast did change the arithmetic
    assert results["bf16"][1] == pytest.approx(results["fp32"][1], rel=0.1)  # but not the training


def test_precision_default_is_fp32_on_cpu_and_bf16_on_cuda() -> None:
    tc = TrainConfig()
    assert tc.precision == "auto"
    assert not tc.autocast_bf16(torch.device("cpu")) and tc.autocast_bf16(torch.device("cuda"))
    assert TrainConfig(precision="bf16").autocast_bf16(torch.device("cpu"))
    assert not TrainConfig(precision="fp32").autocast_bf16(torch.device("cuda"))


def test_unknown_precision_is_a_one_line_error(tmp_path) -> None:
    with pytest.raises(XdiffError, match="--precision must be one of auto, bf16, fp32, got 'fp16'"):
        train(_source(), CC, TrainConfig(precision="fp16", device="cpu"), tmp_path, progress=False)
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    result = CliRunner().invoke(app, ["run", "tiny:a", "tiny:b", "--precision", "fp16", "--dry-run"])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("error: --precision must be one of")


def test_bf16_training_saves_a_loadable_fp32_crosscoder(tmp_path) -> None:
    result = train(_source(), CC, _tc("bf16"), tmp_path, progress=False)
    model = Crosscoder.load(result.final_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and 0 < result.fve_a <= 1
