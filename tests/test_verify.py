"""`xdiff verify`: the closed-form transfer probe, verdicts, null control, evidence table."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from analysis_fixtures import FakeStore, hand_built_crosscoder, make_analysed_run
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.data.store import Shard
from xdiff_cli.dfc.crosscoder import Crosscoder, CrosscoderConfig
from xdiff_cli.errors import XdiffError
from xdiff_cli.findings.feature_index import FeatureIndex, FeatureIndexWriter
from xdiff_cli.findings.verify import (
    MirrorSplit,
    VerifyConfig,
    fit_ridge,
    null_thresholds,
    verify,
)

runner = CliRunner()


# --- the closed-form probe ---------------------------------------------------------------


def test_closed_form_probe_equals_direct_least_squares(one_torch_thread):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(700, 6, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.0]) + 5.0  # off-centre
    w = torch.randn(6, 3, generator=gen)
    y = x @ w + 0.3 * torch.randn(700, 3, generator=gen) - 2.0
    fit = fit_ridge(x, y, ridge=0.0, batch=37)  # streamed in odd batches, shifted by the first one
    design = torch.cat([x, torch.ones(700, 1)], 1).double()
    direct = torch.linalg.lstsq(design, y.double()).solution
    assert torch.allclose(fit.W_DF.double(), direct[:6], atol=1e-4)
    assert torch.allclose(fit.predict(x).double(), design @ direct, atol=1e-3)
    # With a ridge: the centred normal equations, solved directly.
    lam_rel = 0.1
    xc, yc = (x - x.mean(0)).double(), (y - y.mean(0)).double()
    gram = xc.T @ xc
    lam = lam_rel * gram.diagonal().mean()
    w_ridge = torch.linalg.solve(gram + lam * torch.eye(6, dtype=torch.float64), xc.T @ yc)
    assert torch.allclose(fit_ridge(x, y, ridge=lam_rel, batch=50).W_DF.double(), w_ridge, atol=1e-4)


# --- verdicts on constructed data ----------------------------------------------------------


class MemorySplit:
    """An in-memory split: shards of (x_a, x_b) with scale 1 (verify reads nothing else)."""

    scale_a = scale_b = 1.0

    def __init__(self, x_a: torch.Tensor, x_b: torch.Tensor, shard_size: int = 500) -> None:
        self.shards = []
        for lo in range(0, x_a.shape[0], shard_size):
            n = min(shard_size, x_a.shape[0] - lo)
            zeros = torch.zeros(n, dtype=torch.int64)
            self.shards.append(Shard(x_a[lo : lo + n], x_b[lo : lo + n], zeros, zeros, zeros, zeros))
        self.n_tokens, self.num_shards = x_a.shape[0], len(self.shards)
        self.d_a, self.d_b = x_a.shape[1], x_b.shape[1]

    def load_shard(self, index: int) -> Shard:
        return self.shards[index]


def _index_for(crosscoder: Crosscoder, path, live: set[int]):  # noqa: ANN001
    """A minimal analysis.sqlite: every feature's partition, liveness and a rank by id."""
    rows = []
    for i, partition in enumerate(crosscoder.partition_labels()):
        rows.append({
            "id": i, "partition": partition, "frequency": 0.1 if i in live else 0.0, "n_fires": 100 if i in live else 0,
            "mean_activation": 1.0, "max_activation": 1.0, "dec_norm_a": 1.0, "dec_norm_b": 1.0, "rel_norm": 0.5,
            "n_distinct_tokens": 3, "top_token": None, "top_token_share": 0.1, "token_artifact": 0,
            "candidate": int(partition != "shared"), "score": 30.0 - i, "rank": i + 1,
            "histogram": {"edges": [], "counts": []},
        })
    with FeatureIndexWriter(path) as writer:
        writer.set_meta(complete=True)
        writer.add_features(rows)
    return path


def _reader_crosscoder(d: int, reads: dict[int, tuple[str, int]]) -> Crosscoder:
    """dict 20 (2 exclusive per side); feature i reads (side, dim) with weight 1, threshold 0."""
    cc = Crosscoder(CrosscoderConfig(d_a=d, d_b=d, dict_size=20, k=2, exclusive_frac=0.1))
    with torch.no_grad():
        for p in cc.parameters():
            p.zero_()
        for feature, (side, dim) in reads.items():
            if side in ("a", "both"):
                cc.W_enc_AF[dim, feature] = 1.0
                cc.W_dec_FA[feature, dim] = 1.0
            if side in ("b", "both"):
                cc.W_enc_BF[dim, feature] = 1.0
                cc.W_dec_FB[feature, dim] = 1.0
        cc.threshold.fill_(0.0)
    return cc


def _splits(n: int, seed: int, *, linked: bool):
    gen = torch.Generator().manual_seed(seed)
    x_b = torch.randn(n, 8, generator=gen)
    x_a = torch.randn(n, 8, generator=gen)
    if linked:  # A's dim 0 is a linear function of B's residual; A's dim 1 is not
        x_a[:, 0] = x_b @ torch.linspace(-1, 1, 8) * 0.5 + 0.2
        x_a[:, 3] = x_b[:, 3]  # a concept both carry
    return x_a, x_b


def test_feature_linear_in_other_residual_is_analogous_and_random_one_is_exclusive(tmp_path, one_torch_thread):
    # A-exclusive 0 reads A dim 0 (= linear in B's residual); A-exclusive 1 reads A dim 1
    # (independent of B); B-exclusive 2 is dead; shared 4 reads A dim 2 only (a difference
    # hiding in the shared block); shared 5 reads dim 3 of both (shared for real).
    cc = _reader_crosscoder(8, {0: ("a", 0), 1: ("a", 1), 4: ("a", 2), 5: ("both", 3)})
    train, held_out = (MemorySplit(*_splits(6000, s, linked=True)) for s in (1, 2))
    path = _index_for(cc, tmp_path / "analysis.sqlite", live={0, 1, 4, 5})
    summary = verify(cc, train, held_out, path, config=VerifyConfig(max_train_tokens=6000))
    index = FeatureIndex.open(path)
    f0, f1, f2, f4, f5 = (index.feature(i) for i in (0, 1, 2, 4, 5))
    assert f0.verdict == "analogous", f0.verdict_reason
    assert f0.probe_r2 > 0.6 and f0.probe_auc > 0.9
    assert f1.verdict == "exclusive", f1.verdict_reason
    assert f1.probe_r2 < 0.05 and f1.ceiling_r2 > 0.6 and f1.probe_auc < 0.6
    assert f2.verdict == "dead" and f2.probe_r2 is None
    assert f4.verdict == "exclusive" and f4.found_in_shared and "shared block" in f4.verdict_reason
    assert f5.verdict is None and f5.probe_r2 > 0.6  # not a candidate, both predict it: no claim
    assert summary.counts["a"]["exclusive"] == 1 and summary.counts["a"]["analogous"] == 1
    assert summary.found_in_shared == 1
    # The default ranking puts verified differences first, dead features last.
    ranked = [f.id for f in index.features(sort="rank")]
    assert set(ranked[:2]) == {1, 4}
    assert ranked.index(0) < ranked.index(2)
    as_json = f1.to_json()
    assert as_json["verdict"] == "exclusive" and isinstance(as_json["verdict_reason"], str)
    assert {"probe_r2", "probe_auc"} <= set(as_json)
    index.close()


def test_null_run_on_identical_models_exclusive_features_are_flagged(tmp_path, one_torch_thread):
    """A vs A: every exclusive-block feature that fires is a false positive of the partition;
    the probe (B's residual is A's) calls each of them analogous, never exclusive."""
    x, _ = _splits(4000, 3, linked=False)
    train, held_out = MirrorSplit(MemorySplit(x, x.clone())), MirrorSplit(MemorySplit(*_splits(3000, 4, linked=False)))
    assert train.load_shard(0).acts_b is train.load_shard(0).acts_a
    cc = _reader_crosscoder(8, {0: ("a", 0), 1: ("a", 5), 2: ("b", 1), 3: ("b", 6), 7: ("both", 2)})
    path = _index_for(cc, tmp_path / "analysis.sqlite", live={0, 1, 2, 3, 7})
    summary = verify(cc, train, held_out, path)
    index = FeatureIndex.open(path)
    evidence = index.evidence
    assert [evidence[i].verdict for i in (0, 1, 2, 3)] == ["analogous"] * 4
    assert all(evidence[i].probe_r2 == pytest.approx(evidence[i].ceiling_r2, abs=1e-5) for i in (0, 1, 2, 3))
    assert sum(c["exclusive"] for c in summary.counts.values()) == 0
    thresholds = null_thresholds(list(evidence.values()), VerifyConfig())
    assert thresholds.source == "null run" and thresholds.transfer_ratio <= 0.5
    index.close()


# --- the run-level command on the shared analysed-run fixture -----------------------------------


def make_verifiable_run(name: str = "verify-run"):
    """The shared fake analysed run, plus an activation store (train + eval) and the crosscoder on disk."""
    from xdiff_cli.data.store import ActivationStore, StoreWriter
    from xdiff_cli.findings.analysis import AnalysisConfig, analyze

    run = make_analysed_run(name, analysed=False)
    fake = FakeStore(n_docs=90)
    identity = {"model_a": "org/model-a", "model_b": "org/model-b", "d_a": 6, "d_b": 4}
    writer = StoreWriter.open_or_create(run.store_dir, identity)
    for shard, rows in zip(fake.shards, fake.rows_by_shard, strict=True):
        docs = sorted({(r[0], fake.texts[r[0]]) for r in rows})
        writer.write_shard(shard, docs, next_doc_index=docs[-1][0] + 1, stats={})
    writer.finish(scale_a=fake.scale_a, scale_b=fake.scale_b, aligned_fraction=1.0, eval_fraction=0.34)
    cc = hand_built_crosscoder()
    cc.save(run.crosscoder_dir / "final")
    store = ActivationStore.open(run.store_dir)
    analyze(cc, store.split("eval"), store, run.analysis_path, config=AnalysisConfig(top_k=8))
    for stage in ("pull", "harvest", "train", "analyze"):
        run.mark_stage(stage, "done")
    return run


@pytest.fixture
def verified_run(one_torch_thread):
    run = make_verifiable_run()
    result = runner.invoke(app, ["verify", "--run", run.id])
    assert result.exit_code == 0, result.output
    return run, result.output


def test_verify_command_on_planted_fake_run(verified_run):
    run, output = verified_run
    assert "B-exclusive: 1 exclusive" in output
    features = {f["id"]: f for f in json.loads(runner.invoke(app, ["features", "--json", "--run", run.id]).stdout)}
    assert features[1]["verdict"] == "exclusive"  # animals: only B's residual has them
    assert features[5]["verdict"] == "analogous"  # colours, R > 0.8: B's residual has colours too
    # One-word features cannot be judged: the probe predicts each word with a fit that never saw it.
    assert features[0]["verdict"] == "weak"  # the split year "1989" (a tokenization artifact)
    assert features[3]["verdict"] is None  # "the", shared and balanced: nothing claimed, nothing found
    assert features[4]["verdict"] == "dead"
    assert features[2]["verdict"] is None  # balanced shared colours: nothing claimed
    ranked = json.loads(runner.invoke(app, ["features", "--json", "--run", run.id]).stdout)
    assert ranked[0]["id"] == 1  # the verified difference leads the default ranking
    table = runner.invoke(app, ["features", "--run", run.id])
    assert table.exit_code == 0 and "exclusive" in table.output and "live" in table.output


def test_verify_rerun_is_idempotent(verified_run):
    run, _ = verified_run
    db = sqlite3.connect(run.analysis_path)
    before = db.execute("SELECT * FROM verify_evidence ORDER BY id").fetchall()
    ranks = db.execute("SELECT id, rank FROM features ORDER BY id").fetchall()
    db.close()
    mtime = run.analysis_path.stat().st_mtime_ns
    assert runner.invoke(app, ["verify", "--run", run.id]).exit_code == 0
    assert run.analysis_path.stat().st_mtime_ns == mtime  # nothing recomputed
    forced = runner.invoke(app, ["verify", "--run", run.id, "--force"])
    assert forced.exit_code == 0, forced.output
    db = sqlite3.connect(run.analysis_path)
    assert db.execute("SELECT * FROM verify_evidence ORDER BY id").fetchall() == before
    assert db.execute("SELECT id, rank FROM features ORDER BY id").fetchall() == ranks
    db.close()


def test_corrupt_evidence_table_is_a_one_line_error(verified_run):
    run, _ = verified_run
    db = sqlite3.connect(run.analysis_path)
    db.execute("DROP TABLE verify_evidence")
    db.execute("CREATE TABLE verify_evidence (id INTEGER, junk TEXT)")
    db.commit()
    db.close()
    result = runner.invoke(app, ["features", "--run", run.id])
    assert result.exit_code == 1
    assert "verify evidence" in result.output and "corrupt" in result.output and "Traceback" not in result.output
    with pytest.raises(XdiffError, match="corrupt"):
        FeatureIndex.open(run.analysis_path).features()
    # --force rebuilds it.
    assert runner.invoke(app, ["verify", "--run", run.id, "--force"]).exit_code == 0
    assert FeatureIndex.open(run.analysis_path).feature(1).verdict == "exclusive"


# --- causal specificity ---------------------------------------------------------------------------


def test_steer_check_measures_kl_in_both_models_and_resumes(tiny_models, tmp_path, one_torch_thread):
    from safetensors.torch import save_file
    from steer_fixtures import make_steerable_run

    from xdiff_cli.findings.feature_index import Evidence, write_evidence
    from xdiff_cli.findings.verify import ProbeFit, RidgeFit, steer_check_run

    run = make_steerable_run(tiny_models, tmp_path)  # A = tiny llama (d 64), B = tiny qwen3 (d 48)
    gen = torch.Generator().manual_seed(0)
    def empty() -> RidgeFit:
        return RidgeFit(torch.zeros(1, 1), torch.zeros(1), torch.zeros(1))

    fit = ProbeFit(torch.tensor([0]), {"a": [empty(), empty()], "b": [empty(), empty()]}, torch.ones(1), torch.randn(64, 48, generator=gen) / 8,
                   torch.zeros(48, 64), 1)  # B <- A map random; A <- B map zero: no direction in A
    (run.dir / "verify").mkdir()
    save_file(fit.tensors(), str(run.dir / "verify" / "probe_fit.safetensors"))
    evidence = [Evidence(i) for i in range(64)]
    evidence[0] = Evidence(0, "exclusive", "high", "test", own_side="a")  # A-exclusive: mapped into B
    evidence[6] = Evidence(6, "exclusive", "high", "test", own_side="b")  # B-exclusive: maps to zero in A
    write_evidence(run.analysis_path, evidence, {"complete": True})
    results = steer_check_run(run, 2)
    assert set(results) == {0, 6}
    kl_own_0, kl_other_0 = results[0]
    assert kl_own_0 > 1e-3 and kl_other_0 > 1e-4
    assert results[6][0] > 1e-3 and results[6][1] == pytest.approx(0.0, abs=1e-6)  # zero vector moves nothing
    index = FeatureIndex.open(run.analysis_path)
    assert index.feature(0).kl_own == pytest.approx(kl_own_0)
    index.close()
    assert steer_check_run(run, 2) == {}  # resumes: both already checked


def test_fit_progress_total_is_the_rows_the_fit_reads(analysed_tiny_run, one_torch_thread):
    """The fit reads whole shards, so its progress bar's total counts theirs, not the wish."""
    from xdiff_cli.data.store import ActivationStore
    from xdiff_cli.findings.verify import fit_probes, fit_tokens

    home, run_id = analysed_tiny_run
    run_dir = home / "runs" / run_id
    store = ActivationStore.open(run_dir / "activations")
    train = store.split("train")
    crosscoder = Crosscoder.load(run_dir / "crosscoder" / "final")
    wanted = train.n_tokens // 3
    advanced: list[int] = []
    fit_probes(crosscoder, train, torch.arange(8), VerifyConfig(max_train_tokens=wanted), advanced.append)
    assert sum(advanced) == fit_tokens(train, wanted) >= wanted
