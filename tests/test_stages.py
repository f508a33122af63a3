"""The stage runner: every stage run alone, through `xdiff run`, interrupted and resumed, and
restarted — the run record and the artifacts on disk agree after each step.

One small run is made once per module the way a user makes it stage by stage (`xdiff harvest`,
`xdiff train`, `xdiff analyze`); each case works on its own copy."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.run import stages
from xdiff_cli.run.runs import Run, load_run

runner = CliRunner()
pytestmark = pytest.mark.slow

SMALL = dict(tokens=2000, context_length=64, dict_size=64, k=8, steps=40, batch_size=128, lr=1e-3,
             quant="none", device="cpu")
HARVEST_KEYS = ("tokens", "context_length", "quant", "device")
TRAIN_KEYS = ("dict_size", "k", "steps", "batch_size", "lr")


def _flags(keys) -> list[str]:  # noqa: ANN001
    return [item for key in keys for item in (f"--{key.replace('_', '-')}", str(SMALL[key]))]


def _invoke(args: list[str]):  # noqa: ANN202
    result = runner.invoke(app, args)
    return result


@pytest.fixture(scope="module")
def small_run_dir(tiny_models, tiny_corpus, tmp_path_factory):  # noqa: ANN001
    import os

    home = tmp_path_factory.mktemp("stages-home")
    old = os.environ.get("XDIFF_HOME")
    os.environ["XDIFF_HOME"] = str(home)
    try:
        a, b = str(tiny_models["llama"]), str(tiny_models["qwen3"])
        for args in (
            ["harvest", a, b, "--corpus", str(tiny_corpus), "--name", "small", "-q", *_flags(HARVEST_KEYS)],
            ["train", "-q", *_flags(TRAIN_KEYS)],
            ["analyze"],
        ):
            result = _invoke(args)
            assert result.exit_code == 0, (args[0], result.output)
        run_args = ["run", a, b, "--corpus", str(tiny_corpus), "--name", "small", *_flags(SMALL)]
    finally:
        if old is None:
            os.environ.pop("XDIFF_HOME", None)
        else:
            os.environ["XDIFF_HOME"] = old
    return home / "runs" / "small", run_args


def assert_record_matches_artifacts(run: Run) -> None:
    """Every stage the record calls done has its artifacts, complete."""
    from xdiff_cli.data.store import ActivationStore
    from xdiff_cli.findings.analysis import analysis_is_valid

    run = run.reload()
    for stage in stages.STAGES:
        if not run.stage_done(stage.name):
            continue
        for relative in stage.artifacts:
            assert (run.dir / relative).exists(), (stage.name, relative)
    if run.stage_done("pull"):
        assert {"a", "b"} <= set(run.models) and all(m.path for m in run.models.values())
    if run.stage_done("harvest"):
        assert ActivationStore.open(run.store_dir).n_tokens == SMALL["tokens"]
    if run.stage_done("train"):
        assert (run.crosscoder_dir / "final" / "model.safetensors").is_file()
    if run.stage_done("analyze"):
        assert analysis_is_valid(run.analysis_path)


def _runs_json() -> list[dict]:
    result = _invoke(["runs", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _interrupt(run, ctx):  # noqa: ANN001
    raise KeyboardInterrupt


@pytest.mark.parametrize("name", stages.stages_through(stages.COMPLETE_THROUGH))  # verify: tests/test_verify.py
def test_stage_restarted_interrupted_resumed_alone_and_through_run_keeps_record_and_artifacts_in_step(
    name, small_run_dir, xdiff_home, monkeypatch
):
    source, run_args = small_run_dir
    shutil.copytree(source, xdiff_home / "runs" / "small")
    run = load_run("small")
    # Stage by stage (harvest, train, analyze alone) left a complete run.
    assert run.complete and _runs_json()[0]["complete"] is True and _runs_json()[0]["stage"] == "done"
    assert_record_matches_artifacts(run)
    later = stages.STAGE_NAMES[stages.STAGE_NAMES.index(name) :]
    earlier = stages.STAGE_NAMES[: stages.STAGE_NAMES.index(name)]

    # Restarted: this stage's and every later stage's artifacts and marks are gone, nothing earlier.
    stages.restart_from(run, name)
    run = run.reload()
    for each in later:
        assert run.stage_status(each) is None
        assert not any((run.dir / rel).exists() for rel in stages.stage(each).artifacts)
    assert all(run.stage_done(each) for each in earlier)
    assert_record_matches_artifacts(run)

    # Interrupted inside the stage, through `xdiff run`: marked so, and `xdiff runs` says so.
    module, _, function = stages.stage(name).function.partition(":")
    with monkeypatch.context() as patch:
        patch.setattr(f"{module}.{function}", _interrupt)
        result = _invoke(run_args)
    assert result.exit_code == 130, result.output
    run = run.reload()
    assert run.stage_status(name) == "interrupted"
    assert [(r["stage"], r["complete"]) for r in _runs_json()] == [(f"{name} (interrupted)", False)]
    assert_record_matches_artifacts(run)

    # Resumed alone, with the command the error messages name for this stage.
    command = stages.stage_command(name, "small").split()[1:]
    result = _invoke(command)
    assert result.exit_code == 0, (command, result.output)
    run = run.reload()
    assert run.stage_done(name)
    assert_record_matches_artifacts(run)

    # Through `xdiff run`: the remaining stages, then a complete run.
    result = _invoke(run_args)
    assert result.exit_code == 0, result.output
    rest = [s for s in stages.STAGE_NAMES if not run.stage_done(s)]
    if rest:
        assert f"resuming run small at stage {rest[0]}" in " ".join(result.output.split())
    else:
        assert "already complete" in result.output
    run = run.reload()
    assert run.complete
    assert [(r["stage"], r["complete"]) for r in _runs_json()] == [("done", True)]
    assert_record_matches_artifacts(run)
