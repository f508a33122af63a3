"""The trainer: shuffling, resume equivalence, divergence handling, the stage and `xdiff train`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.dfc.training import (
    DataPosition,
    InMemorySource,
    ShuffledBatches,
    TrainConfig,
    Trainer,
    checkpoint_dirs,
    geometric_median,
    k_at,
    normalisation_stats,
    train,
)
from xdiff_cli.errors import XdiffError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _source(n: int = 3000, d_a: int = 10, d_b: int = 14, shard_size: int = 256, seed: int = 0) -> InMemorySource:
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, 24, generator=g)) * (torch.rand(n, 24, generator=g) < 0.25)
    acts_a = z @ torch.randn(24, d_a, generator=g) + 0.05 * torch.randn(n, d_a, generator=g)
    acts_b = z @ torch.randn(24, d_b, generator=g) + 0.05 * torch.randn(n, d_b, generator=g)
    return InMemorySource(acts_a, acts_b, shard_size=shard_size, scale_a=0.5, scale_b=2.0)


CC = CrosscoderConfig(d_a=10, d_b=14, dict_size=48, k=4, exclusive_frac=0.1)


def _tc(**changes) -> TrainConfig:
    base = dict(steps=24, batch_size=100, lr=3e-3, device="cpu", checkpoint_every=8, log_every=4,
                warmup_steps=3, k_anneal_steps=6, dead_window_tokens=400, buffer_tokens=700)
    return TrainConfig(**{**base, **changes})


def test_shuffled_batches_cover_each_row_once_per_epoch_and_apply_the_scales() -> None:
    source = _source(n=1000, shard_size=100)
    batches = ShuffledBatches(source, batch_size=50, seed=3, device=torch.device("cpu"), buffer_tokens=300)
    seen = torch.cat([batches.next()[0] for _ in range(20)])  # 20 × 50 = one epoch, no tails
    expected = source.acts_a * 0.5
    assert seen.shape == expected.shape
    assert torch.equal(seen[seen[:, 0].argsort()], expected[expected[:, 0].argsort()])
    assert not torch.equal(seen, expected)  # ... in shuffled order
    assert batches.lanes == 2  # 50 rows split into 2 lanes of 25 (4 and 8 do not divide 50)
    assert batches.next() is not None and all(p.epoch == 1 for p in batches.positions.values())


def test_shuffled_batches_resume_exactly_from_a_saved_position() -> None:
    source = _source(n=1000, shard_size=90)
    a = ShuffledBatches(source, batch_size=64, seed=1, device=torch.device("cpu"), buffer_tokens=200)
    for _ in range(11):
        a.next()
    positions = {lane: DataPosition(**vars(p)) for lane, p in a.positions.items()}
    expected = [a.next()[1] for _ in range(25)]
    b = ShuffledBatches(source, batch_size=64, seed=1, device=torch.device("cpu"), buffer_tokens=200)
    b.seek(positions)
    assert all(torch.equal(x, b.next()[1]) for x in expected)


class _CountingSource(InMemorySource):
    """Records which shards were read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[int] = set()

    def load_shard(self, i: int):
        self.read.add(i)
        return super().load_shard(i)


def _counting(n: int = 3000, shard_size: int = 100) -> _CountingSource:
    base = _source(n=n, shard_size=shard_size)
    return _CountingSource(base.acts_a, base.acts_b, shard_size=shard_size, scale_a=0.5, scale_b=2.0)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_disjoint_shards_and_together_cut_the_single_process_batches(world) -> None:
    """A rank's lanes read only its own shards; its rows are its slice of one process's batch
    (over three epochs of shuffle buffers, tails and lanes of unequal size)."""
    cpu = torch.device("cpu")
    one = ShuffledBatches(_counting(n=2950), batch_size=64, seed=5, device=cpu, buffer_tokens=400)
    assert one.lanes == 8
    ranks = []
    for rank in range(world):
        per = 8 // world
        ranks.append(ShuffledBatches(_counting(n=2950), 64, 5, cpu, 400, lanes=8, own=range(rank * per, (rank + 1) * per)))
    for _ in range(3 * 2950 // 64):
        whole_a, whole_b = one.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(whole_a, torch.cat([a for a, _ in parts])) and torch.equal(whole_b, torch.cat([b for _, b in parts]))
    reads = [r.source.read for r in ranks]
    assert set().union(*reads) == set(range(30)) and sum(len(r) for r in reads) == 30  # disjoint, all read
    assert all(p.epoch >= 2 for p in one.positions.values())


def test_positions_of_two_ranks_resume_one_process_and_back() -> None:
    cpu = torch.device("cpu")
    one = ShuffledBatches(_source(n=3000, shard_size=100), 64, 2, cpu, 400)
    expected = [one.next()[0] for _ in range(70)]
    halves = [ShuffledBatches(_source(n=3000, shard_size=100), 64, 2, cpu, 400).for_lanes(r) for r in (range(0, 4), range(4, 8))]
    for _ in range(30):
        for half in halves:
            half.next()
    merged = {**halves[0].positions, **halves[1].positions}
    resumed = ShuffledBatches(_source(n=3000, shard_size=100), 64, 2, cpu, 400)
    resumed.seek(merged)
    for x in expected[30:50]:
        assert torch.equal(x, resumed.next()[0])
    # ... and from that one process on to two ranks again
    again = resumed.for_lanes(range(4, 8))
    assert all(torch.equal(x[32:], again.next()[0]) for x in expected[50:])


def test_batches_prepared_ahead_in_a_thread_are_the_same_stream_and_positions() -> None:
    """The GPU path (the next batch gathered while the step runs), run on CPU."""
    cpu = torch.device("cpu")
    plain = ShuffledBatches(_source(n=3000, shard_size=100), 64, 4, cpu, 400, prefetch=False)
    ahead = ShuffledBatches(_source(n=3000, shard_size=100), 64, 4, cpu, 400, prefetch=True)
    for _ in range(60):
        assert torch.equal(plain.next()[0], ahead.next()[0])
        assert ahead.positions == plain.positions  # what was handed out, not what was prepared
    mark = plain.positions
    expected = [plain.next()[1] for _ in range(20)]
    ahead.next()  # one more than `mark`, and one more prepared
    ahead.seek(mark)
    assert all(torch.equal(x, ahead.next()[1]) for x in expected)


def test_lane_count_fits_the_shards_the_batch_and_the_world() -> None:
    from xdiff_cli.dfc.training import lane_count

    assert lane_count(_source(n=3000, shard_size=100), 64) == 8
    assert lane_count(_source(n=3000, shard_size=600), 64) == 4  # 5 shards: at most 4 lanes of whole shards
    assert lane_count(_source(n=3000, shard_size=100), 100) == 4  # 8 does not divide 100
    assert lane_count(_source(n=3000, shard_size=100), 96, world=3) == 24  # lcm(8, 3); 30 shards
    assert lane_count(_source(n=3000, shard_size=100), 64, wanted=1) == 1
    assert lane_count(_source(n=3000, shard_size=1000), 64) == 2  # 3 shards
    assert lane_count(_source(n=300, shard_size=100), 256) == 1  # a lane-batch needs the tokens
    with pytest.raises(XdiffError, match="does not split evenly over 3 ranks"):
        lane_count(_source(n=3000, shard_size=100), 64, world=3)
    with pytest.raises(XdiffError, match="cannot give each of 4 ranks its own shards") as info:
        lane_count(_source(n=3000, shard_size=1000), 64, world=4)
    assert "train with fewer ranks, or harvest more tokens" in str(info.value)


def test_too_small_store_is_a_user_error() -> None:
    with pytest.raises(XdiffError, match="fewer than one batch"):
        ShuffledBatches(_source(n=50), batch_size=64, seed=0, device=torch.device("cpu"))
    with pytest.raises(XdiffError, match="data lane 3 of 4 holds fewer than one lane-batch"):  # 3 shards, 4 lanes
        ShuffledBatches(_source(n=300, shard_size=100), batch_size=64, seed=0, device=torch.device("cpu"), lanes=4)


def test_geometric_median_ignores_outliers_that_move_the_mean() -> None:
    x = torch.zeros(101, 3)
    x[:, 0] = torch.linspace(-1, 1, 101)
    x[-5:] = 1000.0
    median = geometric_median(x)
    assert median.norm() < 0.2 and x.mean(0).norm() > 40


def test_k_anneals_linearly_from_k_start_to_k() -> None:
    cc = CrosscoderConfig(d_a=4, d_b=4, dict_size=2000, k=200)
    tc = TrainConfig(steps=100_000)
    assert (tc.anneal(), tc.warmup(), tc.dead_window()) == (5000, 1000, 10_000_000)
    assert k_at(0, cc, tc) == 1000 and k_at(2500, cc, tc) == 600 and k_at(5000, cc, tc) == 200
    short = TrainConfig(steps=2000, batch_size=512)
    assert (short.anneal(), short.warmup(), short.dead_window()) == (100, 20, 51_200)
    assert k_at(0, CrosscoderConfig(d_a=4, d_b=4, dict_size=300, k=20), short) == 300  # capped at dict_size


def test_training_writes_metrics_checkpoints_and_a_final_model_with_the_scales(tmp_path) -> None:
    result = train(_source(), CC, _tc(), tmp_path, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8, 12, 16, 20, 24]
    assert {"loss", "fve_a", "fve_b", "l0", "dead_fraction", "k", "lr", "threshold"} <= set(lines[0])
    assert lines[-1]["l0"] == pytest.approx(4.0, abs=0.05) and lines[-1]["k"] == 4
    assert lines[-1]["fve_a"] > 0.1 and lines[-1]["fve_b"] > 0.1
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000016", "step-0000024"]  # last 2 kept
    model = Crosscoder.load(result.final_dir)
    assert float(model.threshold) > 0
    assert result.steps == 24 and result.l0 == lines[-1]["l0"]
    # Centred normalisation: the saved means and scales make the training data's centred
    # median norm √((d_a+d_b)/2), whatever the store's own scalars (0.5, 2.0) were.
    source = _source()
    x_a, x_b = model.normalise(source.acts_a, source.acts_b)
    target = ((CC.d_a + CC.d_b) / 2) ** 0.5
    for x in (x_a, x_b):
        assert x.mean(0).norm() < 1e-3 * target
        assert float(x.norm(dim=1).median()) == pytest.approx(target, rel=1e-3)


def test_store_normalisation_keeps_the_harvest_scales_and_zero_means(tmp_path) -> None:
    result = train(_source(), CC, _tc(steps=8, normalisation="store"), tmp_path, progress=False)
    model = Crosscoder.load(result.final_dir)
    assert (model.cfg.scale_a, model.cfg.scale_b) == (0.5, 2.0)
    assert model.mean_A.abs().max() == 0 and model.mean_B.abs().max() == 0


def test_centring_equalises_the_variance_a_constant_offset_hides() -> None:
    # B is A's signal plus a large constant offset (as Gemma's residual): the scalar rule
    # would give B ~1/30 of A's variance; centred, both bring the same.
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(4096, 16, generator=g)
    offset = torch.zeros(16)
    offset[0] = 200.0
    source = InMemorySource(signal, signal + offset, shard_size=1024)
    mean_a, mean_b, scale_a, scale_b = normalisation_stats(source)
    var_a = ((signal - mean_a) * scale_a).var(0).sum()
    var_b = ((signal + offset - mean_b) * scale_b).var(0).sum()
    assert float(var_b / var_a) == pytest.approx(1.0, rel=1e-4)
    assert float(mean_b[0]) == pytest.approx(200.0, abs=0.1)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    source = _source()
    train(source, CC, _tc(), tmp_path / "straight", progress=False)

    original = Trainer.train_step

    def crash_at_step_13(self):
        if self.step == 13:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(source, CC, _tc(), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step-0000008"]
    result = train(source, CC, _tc(), tmp_path / "resumed", progress=False)
    assert result.resumed_from == 8

    straight = Crosscoder.load(tmp_path / "straight" / "final").state_dict()
    resumed = Crosscoder.load(tmp_path / "resumed" / "final").state_dict()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert (tmp_path / "straight" / "metrics.jsonl").read_text().count("\n") == 6
    straight_log = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in straight_log] == [x["loss"] for x in resumed_log]


def test_checkpoint_from_before_lanes_resumes_its_one_lane_stream(tmp_path) -> None:
    """A state.json with one `data_position` (xdiff before data lanes) continues that stream."""
    from xdiff_cli.atomic import write_json

    source = _source()
    train(source, CC, _tc(data_lanes=1), tmp_path / "straight", progress=False)
    train(source, CC, _tc(data_lanes=1, steps=8), tmp_path / "old", progress=False)
    state_path = tmp_path / "old" / "checkpoints" / "step-0000008" / "state.json"
    state = json.loads(state_path.read_text())
    assert state.pop("data_lanes") == 1
    state["data_position"] = state.pop("data_positions")[0]
    state["train_config"].pop("data_lanes")
    write_json(state_path, state)
    (tmp_path / "old" / "final").rename(tmp_path / "old-final")
    result = train(source, CC, _tc(), tmp_path / "old", progress=False)  # this config alone would pick 4 lanes
    assert result.resumed_from == 8
    straight = Crosscoder.load(tmp_path / "straight" / "final").state_dict()
    resumed = Crosscoder.load(tmp_path / "old" / "final").state_dict()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_resume_with_different_settings_is_refused(tmp_path) -> None:
    train(_source(), CC, _tc(steps=8), tmp_path, progress=False)
    other = CrosscoderConfig(d_a=10, d_b=14, dict_size=64, k=4)
    with pytest.raises(XdiffError, match="different settings"):
        train(_source(), other, _tc(steps=16), tmp_path, progress=False)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    original = Trainer.train_step

    def blow_up_after_step_10(self):
        if self.step == 10:
            with torch.no_grad():
                self.model.W_enc_AF.fill_(float("inf"))
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", blow_up_after_step_10)
    with pytest.raises(XdiffError, match="training diverged at step 11") as info:
        train(_source(), CC, _tc(log_every=1), tmp_path, progress=False)
    assert "step-0000008" in str(info.value)
    good = checkpoint_dirs(tmp_path)
    assert [p.name for p in good] == ["step-0000008"]
    model = Crosscoder.load(good[-1])
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert not (tmp_path / "final").exists()


# --- the stage and the CLI ------------------------------------------------------------------


def _harvested_run(name: str = "r1", n_shards: int = 4, per_shard: int = 300, **settings):
    """A run with a small fabricated activation store (what `xdiff harvest` would leave)."""
    from xdiff_cli.data.store import Shard, StoreWriter
    from xdiff_cli.run.runs import Run
    from xdiff_cli.run.settings import RunSettings

    run = Run.create(RunSettings(model_a="a", model_b="b", **settings), name=name)
    writer = StoreWriter.open_or_create(run.store_dir, {"model_a": "a", "model_b": "b", "d_a": 10, "d_b": 14})
    source = _source(n=n_shards * per_shard)
    for i in range(n_shards):
        rows = slice(i * per_shard, (i + 1) * per_shard)
        n = per_shard
        doc = torch.full((n,), i, dtype=torch.long)
        span = torch.arange(n, dtype=torch.long)
        shard = Shard(source.acts_a[rows].to(torch.bfloat16), source.acts_b[rows].to(torch.bfloat16), doc, span, span.clone(), span + 1)
        writer.write_shard(shard, [(i, "x" * (n + 1))], next_doc_index=i + 1, stats={})
    writer.finish(scale_a=0.5, scale_b=2.0, aligned_fraction=1.0, eval_fraction=0.25)
    for stage in ("pull", "harvest"):  # what `xdiff harvest` leaves
        run.mark_stage(stage, "done")
    return run


def test_train_run_trains_from_the_store_records_metrics_and_then_returns_at_once(tmp_path) -> None:
    from xdiff_cli.dfc.training import train_run
    from xdiff_cli.run.runs import Run

    run = _harvested_run(dict_size=48, k=4, steps=20, batch_size=100, lr=3e-3, device="cpu")
    run.set_metrics(eval_dead_a=0.59, eval_fve_a=0.7)  # an older crosscoder's analysis
    result = train_run(run, progress=False)
    assert not any(key.startswith("eval_") for key in Run.load(run.dir).metrics)  # stale: dropped
    final = run.crosscoder_dir / "final"
    model = Crosscoder.load(final)
    assert (model.cfg.d_a, model.cfg.d_b, model.cfg.dict_size, model.cfg.k) == (10, 14, 48, 4)
    assert model.cfg.scale_a > 0 and model.mean_A.abs().sum() > 0  # centred on the store's training split
    metrics = Run.load(run.dir).metrics
    assert metrics["l0"] == pytest.approx(4.0, abs=0.1) and 0 < metrics["fve_a"] < 1
    assert set(metrics) >= {"fve_a", "fve_b", "l0", "dead_fraction"}
    before = (final / "model.safetensors").stat().st_mtime_ns
    again = train_run(Run.load(run.dir), progress=False)
    assert (final / "model.safetensors").stat().st_mtime_ns == before
    assert again.fve_a == result.fve_a


def test_xdiff_train_cli_updates_settings_and_prints_the_result() -> None:
    from xdiff_cli.cli import app
    from xdiff_cli.run.runs import resolve_run

    _harvested_run(name="cli", steps=100_000, device="cpu")
    out = CliRunner().invoke(
        app, ["train", "--run", "cli", "--steps", "12", "--batch-size", "100", "--dict-size", "48", "--k", "4",
              "--lr", "0.003", "--exclusive-frac", "0.1"],
    )
    assert out.exit_code == 0, out.output
    assert "FVE" in out.output and "final" in out.output
    run = resolve_run("cli")
    s = run.settings
    assert (s.steps, s.batch_size, s.dict_size, s.k, s.exclusive_frac) == (12, 100, 48, 4, 0.1)
    assert run.stage_done("train")
    assert Crosscoder.load(run.crosscoder_dir / "final").cfg.n_exclusive == 5


def test_xdiff_train_without_a_harvest_says_to_harvest_first() -> None:
    from xdiff_cli.cli import app
    from xdiff_cli.run.runs import Run
    from xdiff_cli.run.settings import RunSettings

    Run.create(RunSettings(model_a="a", model_b="b"), name="empty")
    out = CliRunner().invoke(app, ["train", "--run", "empty", "--steps", "5"])
    assert out.exit_code == 1
    assert "xdiff harvest" in out.output


def test_resuming_from_the_final_checkpoint_rewrites_final_with_the_logged_metrics(tmp_path) -> None:
    first = train(_source(), CC, _tc(steps=8), tmp_path, progress=False)
    import shutil

    shutil.rmtree(first.final_dir)  # as if the process died between the last checkpoint and final/
    again = train(_source(), CC, _tc(steps=8), tmp_path, progress=False)
    assert again.resumed_from == 8 and (again.fve_a, again.l0) == (first.fve_a, first.l0)
    assert Crosscoder.load(again.final_dir).state_dict()["W_dec_FA"].equal(
        Crosscoder.load(tmp_path / "checkpoints" / "step-0000008").state_dict()["W_dec_FA"]
    )
