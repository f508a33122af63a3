"""`xdiff runs`, `xdiff rm`, `xdiff presets`, and `xdiff run`'s early errors and run choice.

Nothing here trains: bad inputs must fail before anything heavy, and resume/new-run choice
is decided from run.json alone."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from xdiff_cli import paths
from xdiff_cli.cli import app
from xdiff_cli.errors import XdiffError
from xdiff_cli.run import pipeline, stages
from xdiff_cli.run.runs import Run, list_runs
from xdiff_cli.run.settings import RunSettings

runner = CliRunner()


def make_run(name: str, **settings) -> Run:
    run = Run.create(RunSettings(model_a="org/a", model_b="org/b", **settings), name)
    run.mark_stage("pull", "done")
    run.set_metrics(fve_a=0.8, fve_b=0.7)
    (run.dir / "blob.bin").write_bytes(b"x" * 1000)
    return run


def test_runs_json_lists_runs_with_their_stage_metrics_and_disk_use():
    make_run("first")
    result = runner.invoke(app, ["runs", "--json"])
    assert result.exit_code == 0, result.output
    [info] = json.loads(result.stdout)
    assert info["id"] == "first"
    assert info["models"] == {"a": "org/a", "b": "org/b"}
    assert info["stage"] == "harvest"
    assert info["complete"] is False
    assert info["metrics"] == {"fve_a": 0.8, "fve_b": 0.7}
    assert info["disk_bytes"] >= 1000
    assert info["created"]


def test_runs_table_and_empty_message():
    assert "no runs yet" in runner.invoke(app, ["runs"]).output
    make_run("shown")
    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 0 and "shown" in result.output and "0.800/0.700" in result.output


def test_rm_with_yes_deletes_the_run_directory():
    run = make_run("doomed")
    result = runner.invoke(app, ["rm", "doomed", "--yes"])
    assert result.exit_code == 0, result.output
    assert not run.dir.exists()


def test_rm_without_a_terminal_refuses_without_yes():
    run = make_run("kept")
    result = runner.invoke(app, ["rm", "kept"])
    assert result.exit_code == 1
    assert "--yes" in result.output and "Traceback" not in result.output
    assert run.dir.exists()


def test_rm_unknown_run_is_a_one_line_error():
    result = runner.invoke(app, ["rm", "ghost", "--yes"])
    assert result.exit_code == 1 and "no run named 'ghost'" in result.output


def test_presets_command_lists_names_and_models():
    result = runner.invoke(app, ["presets", "--json"])
    assert result.exit_code == 0
    names = {p["name"]: p for p in json.loads(result.stdout)}
    assert names["small"]["model_a"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "tiny" in runner.invoke(app, ["presets"]).output


def run_cli(*args: str):
    return runner.invoke(app, ["run", *args])


def test_unknown_preset_is_a_one_line_error_naming_the_choices():
    result = run_cli("--preset", "nope")
    assert result.exit_code == 1
    assert "unknown preset 'nope'" in result.output and "tiny" in result.output


def test_missing_corpus_file_fails_before_any_run_is_created(tmp_path):
    result = run_cli("--preset", "tiny", "--corpus", str(tmp_path / "missing.jsonl"))
    assert result.exit_code == 1
    assert "missing.jsonl not found" in result.output
    assert list_runs() == []


def test_too_little_disk_fails_with_the_estimate(monkeypatch):
    monkeypatch.setattr(paths, "free_bytes", lambda path: 1000)
    result = run_cli("--preset", "tiny")
    assert result.exit_code == 1
    assert "not enough disk" in result.output and "5.3 MB" in result.output
    assert list_runs() == []


def test_unknown_restart_stage_is_an_error():
    result = run_cli("--preset", "tiny", "--restart-from", "bake")
    assert result.exit_code == 1 and "unknown stage 'bake'" in result.output


def test_layer_out_of_range_is_caught_from_the_config(tiny_models):
    result = run_cli(str(tiny_models["llama"]), str(tiny_models["qwen3"]), "--layer-b", "9", "--dry-run")
    assert result.exit_code == 1 and "--layer-b 9 is out of range" in result.output


def test_same_model_twice_warns_but_plans(tiny_models):
    result = run_cli(str(tiny_models["llama"]), str(tiny_models["llama"]), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "same" in result.output
    assert "plan" in result.output


def test_dry_run_plan_shows_models_layers_dictionary_disk_and_time():
    result = run_cli("--preset", "tiny", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tiny:llama" in out and "d=64" in out and "tiny:qwen3" in out and "d=48" in out
    assert "26 A-only, 26 B-only, 204 shared" in out  # round(256 x 0.1), as the crosscoder has it
    assert "20,000 aligned pairs" in out
    assert "5.3 MB of activations" in out  # 20k x ((64+48) x 2 + 40) bytes
    assert "time (rough)" in out
    assert list_runs() == []  # a dry run creates nothing


def test_identical_settings_resume_the_newest_run_and_new_forces_another():
    settings = RunSettings(model_a="org/a", model_b="org/b")
    older = Run.create(settings, "older")
    newer = Run.create(settings, "newer")
    newer.record.created = "9999"  # newest by creation time
    newer.save()
    assert pipeline.find_run(settings).id == "newer"
    assert pipeline.find_run(settings, new=True) is None
    assert pipeline.find_run(settings.updated(seed=1)) is None
    assert pipeline.find_run(settings, name="older").id == older.id


def test_a_named_run_with_other_settings_is_not_silently_reused():
    Run.create(RunSettings(model_a="org/a", model_b="org/b"), "mine")
    with pytest.raises(XdiffError, match="exists with different settings \\(seed\\)"):
        pipeline.find_run(RunSettings(model_a="org/a", model_b="org/b", seed=3), name="mine")


def test_stage_marks_record_failure_and_interruption(monkeypatch):
    run = Run.create(RunSettings(model_a="org/a", model_b="org/b"), "marks")
    ctx = stages.StageContext()

    def boom(run, ctx):
        raise XdiffError("the hub is down")

    def stop(run, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr("xdiff_cli.models.pull.pull_stage", boom)
    with pytest.raises(XdiffError):
        stages.run_stage(run, "pull", ctx)
    assert run.record.stages["pull"].status == "failed"
    assert run.record.stages["pull"].error == "the hub is down"
    monkeypatch.setattr("xdiff_cli.models.pull.pull_stage", stop)
    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(run, "pull", ctx)
    assert Run.load(run.dir).record.stages["pull"].status == "interrupted"
    assert run.current_stage == "pull (interrupted)"
