"""`xdiff steer`: JSON contract, side-by-side text output, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from steer_fixtures import make_steerable_run
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.commands.steer import parse_features
from xdiff_cli.errors import XdiffError

runner = CliRunner()
CONTRACT_KEYS = {"feature", "model", "scale", "prompt", "baseline", "steered"}


@pytest.fixture
def run(tiny_models: dict[str, Path], tmp_path: Path):
    return make_steerable_run(tiny_models, tmp_path)


def _steer(*args: str):
    return runner.invoke(app, ["steer", "--max-new-tokens", "6", *args])


def test_json_for_an_exclusive_feature_is_one_contract_object(run) -> None:
    result = _steer("--feature", "8", "--scale", "-4", "--json", "Tell me about the cat")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == CONTRACT_KEYS
    assert payload["feature"] == 8 and payload["model"] == "b" and payload["scale"] == -4.0
    assert payload["prompt"] == "Tell me about the cat"
    assert payload["baseline"] != payload["steered"]


def test_json_for_a_shared_feature_lists_both_models(run) -> None:
    result = _steer("--feature", "20:2", "--json", "--measure", "--run", run.id, "hello")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [p["model"] for p in payload] == ["a", "b"]
    assert all(set(p) == CONTRACT_KEYS | {"kl", "kl_random"} and p["kl"] > 0 for p in payload)
    assert all(p["kl_random"] >= 0 for p in payload)


def test_json_with_several_features_gives_parallel_lists(run) -> None:
    result = _steer("-f", "20:-4", "-f", "40", "--scale", "2", "--model", "a", "--json", "hello")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["feature"] == [20, 40] and payload["scale"] == [-4.0, 2.0] and payload["model"] == "a"


def test_scale_zero_json_answers_are_identical(run) -> None:
    result = _steer("-f", "3", "--scale", "0", "--raw", "--json", "the red cat")
    payload = json.loads(result.stdout)
    assert payload["baseline"] == payload["steered"] != ""


def test_text_output_shows_both_columns_and_the_kl_line(run) -> None:
    result = _steer("--feature", "8", "--scale", "3", "--measure", "Tell me about the cat")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "model B · tiny/qwen3 · layer 2" in out
    assert "unsteered" in out and "steered (#8 × +3)" in out
    assert "KL(steered ‖ unsteered) = " in out and "nats per token" in out
    assert "model A" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "999", "--scale", "1"], "error: feature 999 is out of range — valid ids are 0..63"),
        (["-f", "8"], "error: no scale for feature 8 — add --scale S or write --feature 8:S"),
        (["-f", "x:1"], "error: --feature expects ID or ID:SCALE, got 'x:1'"),
        (["-f", "8:1", "--model", "a"], "error: feature 8 is exclusive to model B; it cannot steer model A"),
        (["-f", "3:1", "-f", "8:1"], "error: these features are exclusive to different models (A and B)"),
    ],
)
def test_user_errors_are_one_red_line(run, args: list[str], message: str) -> None:
    result = _steer(*args, "hello")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.output


def test_missing_run_and_missing_analysis_are_user_errors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    result = _steer("-f", "8:1", "hello")
    assert result.exit_code == 1 and "no runs yet" in result.output
    make_steerable_run(tiny_models, tmp_path, analysed=False)
    result = _steer("-f", "8:1", "hello")
    assert result.exit_code == 1 and "has not been analysed yet: stage analyze has not run" in result.output
    assert "xdiff analyze --run" in result.output


def test_parse_features_reads_own_and_shared_scales() -> None:
    assert parse_features(["12", "40:-2.5"], 4.0) == [(12, 4.0), (40, -2.5)]
    with pytest.raises(XdiffError):
        parse_features(["-3:1"], None)
