"""`xdiff run` end to end on the tiny offline models: plan → pull → harvest → train → analyse,
Ctrl-C and resume, the record it leaves, and the summary it prints.

Settings are the tiny preset's, shrunk (fewer tokens and steps, a small dictionary) to keep CI
quick; the planted result itself is proven on the shared analysed run (test_analysis_planted)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.run.runs import list_runs
from xdiff_cli.run.stages import STAGE_NAMES

runner = CliRunner()
FAST = ("--tokens", "3000", "--steps", "60", "--dict-size", "64", "--k", "8", "--context-length", "64")

pytestmark = pytest.mark.slow


def _interrupt(run, ctx):
    raise KeyboardInterrupt


def test_tiny_preset_run_survives_ctrl_c_resumes_and_summarises(monkeypatch):
    # First attempt: Ctrl-C during training, after pull and harvest finished.
    with monkeypatch.context() as patch:
        patch.setattr("xdiff_cli.dfc.training.train_stage", _interrupt)
        first = runner.invoke(app, ["run", "--preset", "tiny", *FAST])
    assert first.exit_code == 130, first.output
    assert "interrupted" in first.output and "rerun the same command" in first.output
    [run] = list_runs()
    assert run.stage_done("pull") and run.stage_done("harvest")
    assert run.record.stages["train"].status == "interrupted"

    # The same command again resumes that run at train and completes it.
    second = runner.invoke(app, ["run", "--preset", "tiny", *FAST])
    assert second.exit_code == 0, second.output
    assert f"resuming run {run.id} at stage train" in " ".join(second.output.split())
    [run] = list_runs()
    assert all(run.stage_done(stage) for stage in STAGE_NAMES)
    record = run.record
    assert record.preset == "tiny"
    assert record.models["a"].spec == "tiny:llama" and record.models["b"].revision == "local"
    assert record.models["a"].d_model == 64 and record.models["b"].layer == 2
    assert record.models["a"].quant == "none" and record.models["a"].dtype == "float32"
    assert record.settings.tokens == 3000 and record.settings.seed == 0
    assert {"xdiff", "torch", "transformers"} <= set(record.versions)
    assert 0 < record.metrics["fve_a"] <= 1 and 0 < record.metrics["fve_b"] <= 1
    assert "only in model B" in second.output and f"xdiff browse --run {run.id}" in second.output

    # A third identical command finds the run complete and only summarises it.
    third = runner.invoke(app, ["run", "--preset", "tiny", *FAST])
    assert third.exit_code == 0 and "already complete" in third.output
    assert len(list_runs()) == 1
