"""`xdiff run` end to end on the tiny offline models: plan → pull → harvest → train → analyse,
Ctrl-C and resume, then `xdiff features --json` shows the planted B-exclusive concept.

Settings are the tiny preset's, shrunk further (fewer tokens and steps) to keep CI quick."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from xdiff_cli import pipeline
from xdiff_cli.cli import app
from xdiff_cli.runs import STAGES, list_runs
from xdiff_cli.tiny import ANIMALS

runner = CliRunner()
FAST = ("--tokens", "12000", "--steps", "500")

pytestmark = pytest.mark.slow


def _interrupt(run, ctx):
    raise KeyboardInterrupt


def test_tiny_preset_run_survives_ctrl_c_resumes_and_surfaces_the_planted_concept(monkeypatch):
    # First attempt: Ctrl-C during training, after pull and harvest finished.
    with monkeypatch.context() as patch:
        patch.setitem(pipeline.STAGE_FUNCTIONS, "train", _interrupt)
        first = runner.invoke(app, ["run", "--preset", "tiny", *FAST])
    assert first.exit_code == 130, first.output
    assert "interrupted" in first.output and "rerun the same command" in first.output
    [run] = list_runs()
    assert run.stage_done("pull") and run.stage_done("harvest")
    assert run.record["stages"]["train"]["status"] == "interrupted"

    # The same command again resumes that run at train and completes it.
    second = runner.invoke(app, ["run", "--preset", "tiny", *FAST])
    assert second.exit_code == 0, second.output
    assert f"resuming run {run.id} at stage train" in " ".join(second.output.split())
    [run] = list_runs()
    assert all(run.stage_done(stage) for stage in STAGES)
    record = run.record
    assert record["preset"] == "tiny"
    assert record["models"]["a"]["spec"] == "tiny:llama" and record["models"]["b"]["revision"] == "local"
    assert record["models"]["a"]["d_model"] == 64 and record["models"]["b"]["layer"] == 2
    assert record["settings"]["tokens"] == 12000 and record["settings"]["seed"] == 0
    assert {"xdiff", "torch", "transformers"} <= set(record["versions"])
    assert 0.5 < record["metrics"]["fve_a"] <= 1 and 0.5 < record["metrics"]["fve_b"] <= 1
    assert "only in model B" in second.output and f"xdiff browse --run {run.id}" in second.output

    # B-exclusive features: the planted ANIMALS concept is among the top ones.
    result = runner.invoke(app, ["features", "--json", "--partition", "b", "--limit", "5"])
    assert result.exit_code == 0, result.output
    features = json.loads(result.stdout)
    assert features and all(f["partition"] == "b" for f in features)

    def animal_share(feature) -> float:
        tokens = [e["text"][e["start"] : e["end"]].strip().lower() for e in feature["examples"]]
        return sum(t in ANIMALS for t in tokens) / max(1, len(tokens))

    assert max(animal_share(f) for f in features) >= 0.8

    # A third identical command finds the run complete and only summarises it.
    third = runner.invoke(app, ["run", "--preset", "tiny", *FAST])
    assert third.exit_code == 0 and "already complete" in third.output
    assert len(list_runs()) == 1


def test_run_from_explicit_local_dirs_records_the_models_and_restart_from(tiny_models):
    args = ["run", str(tiny_models["llama"]), str(tiny_models["qwen3"]), "--name", "local-dirs",
            "--tokens", "3000", "--steps", "60", "--dict-size", "64", "--k", "8", "--context-length", "64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "new run local-dirs" in result.output
    [run] = list_runs()
    assert run.record["models"]["b"]["path"] == str(tiny_models["qwen3"])
    assert run.record["models"]["a"]["quant"] == "none" and run.record["models"]["a"]["dtype"] == "float32"
    assert run.record["preset"] is None
    first_analysis = run.analysis_path.stat().st_mtime_ns

    again = runner.invoke(app, [*args, "--restart-from", "analyze"])
    assert again.exit_code == 0, again.output
    assert "resuming run local-dirs at stage analyze" in " ".join(again.output.split())
    [run] = list_runs()
    assert all(run.stage_done(stage) for stage in STAGES)
    assert run.analysis_path.stat().st_mtime_ns > first_analysis  # rewritten, not skipped
