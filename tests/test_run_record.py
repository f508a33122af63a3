"""The run record and its guards: typed run.json, validated names, locks, corrupt records,
settings validated up front, trust_remote_code only from the command line, the run a command
picks by default, and the plan agreeing with the trained model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.errors import XdiffError
from xdiff_cli.run.runs import Run, list_runs, load_run, scan_runs
from xdiff_cli.run.settings import RunSettings

runner = CliRunner()


def make_run(name: str, **settings) -> Run:  # noqa: ANN003
    return Run.create(RunSettings(model_a="org/a", model_b="org/b", **settings), name)


# --- the typed record -----------------------------------------------------------------------


def test_run_json_round_trips_through_the_typed_record_and_keeps_unknown_keys():
    run = make_run("typed")
    run.set_model("a", {"spec": "org/a", "revision": "abc", "layer": 3, "someday": 1})
    run.mark_stage("pull", "done", seconds=2.5)
    raw = json.loads(run.json_path.read_text())
    raw["verify"] = {"added by": "a newer version"}
    run.json_path.write_text(json.dumps(raw))
    again = load_run("typed")
    assert again.models["a"].revision == "abc" and again.models["a"].layer == 3
    assert again.record.stages["pull"].status == "done" and again.record.stages["pull"].info == {"seconds": 2.5}
    again.save()
    assert json.loads(run.json_path.read_text())["verify"] == {"added by": "a newer version"}


# --- #18.2 names and paths --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "x" * 101, "a\\b"])
def test_run_names_that_would_leave_the_runs_root_are_rejected(name, xdiff_home):
    outside = xdiff_home / "evil"
    outside.mkdir(parents=True)
    (outside / "analysis.sqlite").write_text("keep me")
    for args in (["run", "--preset", "tiny", "--name", name, "--restart-from", "analyze"],
                 ["features", "--run", name], ["rm", name, "--yes"], ["train", "--run", name]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "invalid run name" in result.output, (args, result.output)
    assert (outside / "analysis.sqlite").read_text() == "keep me"


def test_a_symlinked_run_directory_cannot_point_outside_the_runs_root(xdiff_home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (xdiff_home / "runs").mkdir(parents=True)
    (xdiff_home / "runs" / "link").symlink_to(elsewhere)
    result = runner.invoke(app, ["rm", "link", "--yes"])
    assert result.exit_code == 1 and "outside" in result.output
    assert elsewhere.is_dir()


# --- #18.3 custom code only from the command line ----------------------------------------------


def test_trust_remote_code_in_run_json_enables_nothing(monkeypatch):
    run = make_run("sneaky")
    raw = json.loads(run.json_path.read_text())
    raw["settings"]["trust_remote_code"] = True  # what an older version, or a hand edit, leaves
    run.json_path.write_text(json.dumps(raw))
    run = load_run("sneaky")
    run.set_model("a", {"spec": "org/a", "path": "/models/a", "quant": "none", "device": "cpu"})
    assert not hasattr(run.settings, "trust_remote_code")
    assert "trust_remote_code" not in json.loads(run.json_path.read_text())["settings"]

    calls = []
    monkeypatch.setattr("xdiff_cli.models.loading.load_model", lambda *a, **kw: calls.append(kw["trust_remote_code"]))
    from xdiff_cli.models.pull import load_pulled_model
    from xdiff_cli.run.stages import StageContext

    load_pulled_model(run, "a", StageContext())
    load_pulled_model(run, "a", StageContext(trust_remote_code=True))
    assert calls == [False, True]

    from xdiff_cli.findings.steering import Steerer

    assert Steerer(run).trust_remote_code is False


# --- #18.4 one process per run ------------------------------------------------------------------


def _hold_lock(path) -> subprocess.Popen:  # noqa: ANN001
    code = textwrap.dedent(f"""
        import sys, time
        sys.argv = ["xdiff", "run", "--preset", "tiny"]
        from xdiff_cli.locks import exclusive
        with exclusive({str(path)!r}, "run"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_command_on_a_locked_run_fails_naming_the_holder():
    run = make_run("busy")
    run.mark_stage("pull", "done")
    run.mark_stage("harvest", "done")
    holder = _hold_lock(run.lock_path)
    try:
        result = runner.invoke(app, ["train", "--run", "busy"])
        assert result.exit_code == 1
        assert f"run busy is in use by process {holder.pid} (xdiff run --preset tiny)" in result.output
        result = runner.invoke(app, ["rm", "busy", "--yes"])
        assert result.exit_code == 1 and "in use" in result.output
        assert run.dir.is_dir()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the lock with the process: the run is usable again.
    result = runner.invoke(app, ["rm", "busy", "--yes"])
    assert result.exit_code == 0 and not run.dir.exists()


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    from xdiff_cli.locks import exclusive, is_locked

    path = tmp_path / "entry.lock"
    with exclusive(path, "the entry"), exclusive(path, "the entry"):
        assert not is_locked(path)  # ours
    holder = _hold_lock(path)
    try:
        assert is_locked(path)
        with pytest.raises(XdiffError, match=f"the entry is in use by process {holder.pid}"):
            with exclusive(path, "the entry"):
                pass
    finally:
        holder.kill()
        holder.wait()


# --- #18.7 corrupt run.json ----------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", "[]", '{"id": "bad", "settings": {}, "stages": []}',
                                     '{"id": "bad", "settings": {"tokens": "many"}}', ""])
def test_a_corrupt_run_json_is_listed_as_corrupt_and_can_be_removed(content, xdiff_home):
    make_run("good")
    bad = xdiff_home / "runs" / "bad"
    bad.mkdir()
    (bad / "run.json").write_text(content)
    result = runner.invoke(app, ["runs", "--json"])
    assert result.exit_code == 0, result.output
    listed = {r["id"]: r for r in json.loads(result.stdout)}
    assert listed["good"]["stage"] == "pull" and listed["bad"]["stage"] == "corrupt"
    assert listed["bad"]["complete"] is False and "corrupt" in listed["bad"]["error"]
    table = runner.invoke(app, ["runs"])
    assert table.exit_code == 0 and "corrupt" in table.output
    assert [r.id for r in list_runs()] == ["good"]  # never picked as a default run
    result = runner.invoke(app, ["rm", "bad", "--yes"])
    assert result.exit_code == 0, result.output
    assert not bad.exists() and [r.id for r in scan_runs()] == ["good"]


# --- #18 numeric options up front -----------------------------------------------------------------


@pytest.mark.parametrize("option", [("--lr", "nan"), ("--lr", "inf"), ("--exclusive-frac", "nan")])
def test_non_finite_numbers_are_rejected_before_any_work(option):
    result = runner.invoke(app, ["run", "--preset", "tiny", *option])
    assert result.exit_code == 1
    assert f"{option[0]} must be a finite number" in result.output
    assert list_runs() == []


def test_non_finite_train_options_are_rejected_before_training():
    run = make_run("t")
    run.mark_stage("pull", "done")
    run.mark_stage("harvest", "done")
    result = runner.invoke(app, ["train", "--run", "t", "--lr", "-inf"])
    assert result.exit_code == 1 and "--lr must be a finite number" in result.output
    assert load_run("t").stage_status("train") is None


# --- #17.2 the run a command picks -----------------------------------------------------------------


def test_commands_default_to_the_newest_analysed_run_and_name_it(monkeypatch):
    from analysis_fixtures import make_analysed_run

    monkeypatch.setattr("xdiff_cli.commands.common._stderr_is_terminal", lambda: True)
    make_analysed_run("analysed")
    failed = make_run("failed-later")
    failed.record.created = "9999"
    failed.save()
    failed.mark_stage("pull", "failed", error="offline")
    result = runner.invoke(app, ["features", "--json", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)  # stdout stays pure JSON
    assert "using run analysed (the newest analysed run" in result.stderr


def test_a_run_missing_a_stage_names_that_stage_and_the_command_that_makes_it():
    failed = make_run("offline")
    failed.mark_stage("pull", "failed", error="offline")
    for args, stage in ((["features", "--run", "offline"], "pull"), (["analyze", "--run", "offline"], "pull"),
                        (["train", "--run", "offline"], "pull")):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert f"stage {stage} failed" in result.output and "xdiff harvest --run offline" in result.output
    harvested = make_run("harvested")
    for stage in ("pull", "harvest"):
        harvested.mark_stage(stage, "done")
    result = runner.invoke(app, ["report", "--run", "harvested"])
    assert result.exit_code == 1
    assert "stage train has not run" in result.output and "xdiff train --run harvested" in result.output


# --- one home per decision ------------------------------------------------------------------------


@pytest.mark.parametrize("dict_size", [20, 33, 255, 256, 257, 1001])
@pytest.mark.parametrize("exclusive_frac", [0.05, 0.1, 0.13])
def test_the_plan_and_the_trained_crosscoder_agree_on_the_partition(dict_size, exclusive_frac):
    from xdiff_cli.dfc.crosscoder import CrosscoderConfig
    from xdiff_cli.models.pull import ModelFacts
    from xdiff_cli.run.hardware import Hardware
    from xdiff_cli.run.plan import Plan

    settings = RunSettings(model_a="a", model_b="b", dict_size=dict_size, exclusive_frac=exclusive_frac, k=4)
    plan = Plan(settings, None, Hardware("cpu", 2), ModelFacts("a", d_model=8), ModelFacts("b", d_model=8), "none")
    model = CrosscoderConfig(d_a=8, d_b=8, dict_size=dict_size, k=4, exclusive_frac=exclusive_frac)
    assert plan.n_exclusive == model.n_exclusive
    assert dict_size - 2 * plan.n_exclusive == model.n_shared


def test_dry_run_prints_the_partition_the_crosscoder_will_have():
    from xdiff_cli.dfc.crosscoder import CrosscoderConfig

    result = runner.invoke(app, ["run", "--preset", "tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    cfg = CrosscoderConfig(d_a=64, d_b=48, dict_size=256, k=16, exclusive_frac=0.1)
    assert f"{cfg.n_exclusive} A-only, {cfg.n_exclusive} B-only, {cfg.n_shared} shared" in result.output
    assert "26 A-only, 26 B-only, 204 shared" in result.output


def test_eval_split_is_chosen_by_tokens_not_by_shard_count():
    from xdiff_cli.data.store import eval_start_shard

    # Nine full shards and a 9-token remainder: 10% of the tokens is the last two shards, not one.
    assert eval_start_shard([200] * 9 + [9], 0.1) == 8
    assert eval_start_shard([100] * 10, 0.25) == 7
    assert eval_start_shard([1000, 5], 0.9) == 1  # always one shard left to train on
    assert eval_start_shard([10, 10], 0.0001) == 1  # and one to evaluate on


def test_one_home_for_the_default_dictionary_middle_layer_and_config_reading(tmp_path):
    from xdiff_cli.models import modelconfig, planner
    from xdiff_cli.models.arch import default_layer
    from xdiff_cli.models.pull import config_facts
    from xdiff_cli.run.settings import default_dict_size

    assert planner.default_dict_size is default_dict_size
    assert default_dict_size(4096, 4096) == 131_072
    assert default_layer(36) == modelconfig.middle_layer(36) == 18
    # A multimodal config: width and depth come from text_config for every reader.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "hidden_size": 1, "text_config": {"hidden_size": 2560, "num_hidden_layers": 34},
    }))
    facts = config_facts("local", tmp_path)
    assert (facts.d_model, facts.n_layers, facts.layer(None)) == (2560, 34, 17)
    assert modelconfig.width(modelconfig.read_config(tmp_path)) == 2560


def test_a_preset_name_cannot_reach_outside_the_presets_directory(tmp_path):
    (tmp_path / "outside.toml").write_text('[models]\na = "x"\nb = "y"\n')
    result = runner.invoke(app, ["run", "--preset", f"../../../../../../..{tmp_path}/outside", "--dry-run"])
    assert result.exit_code == 1 and "invalid preset name" in result.output
