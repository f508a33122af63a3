"""Foundation: the CLI answers fast, errors are one line, data paths honour XDIFF_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdiff_cli import paths
from xdiff_cli.atomic import read_json, write_json
from xdiff_cli.cli import app
from xdiff_cli.errors import XdiffError
from xdiff_cli.run.settings import RunSettings

runner = CliRunner()


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from xdiff_cli.cli import app;"
        "r = CliRunner().invoke(app, ['--help']); print(r.output);"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH');"
        "print('TRANSFORMERS_LOADED' if 'transformers' in sys.modules else 'NO_TRANSFORMERS')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "NO_TORCH" in out and "NO_TRANSFORMERS" in out
    assert "doctor" in out


def test_doctor_reports_versions_and_exits_zero():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for name in ("python", "torch", "transformers", "4-bit quantisation", "hf token", "data dir"):
        assert name in result.output


def test_doctor_never_prints_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")
    result = runner.invoke(app, ["doctor"])
    assert "supersecret" not in result.output
    assert "configured" in result.output


def test_xdiff_home_overrides_data_root(xdiff_home):
    assert paths.data_root() == xdiff_home
    assert paths.runs_root() == xdiff_home / "runs"


def test_data_root_defaults_to_platformdirs(monkeypatch):
    monkeypatch.delenv("XDIFF_HOME")
    assert paths.data_root().name == "xdiff"


def test_user_error_is_one_red_line_with_exit_1(tmp_path):
    env = {**os.environ, "XDIFF_HOME": str(tmp_path)}
    # `features` with no runs yet is a user mistake: one line that says what to do.
    proc = subprocess.run([sys.executable, "-m", "xdiff_cli", "features"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: no runs yet")
    assert "xdiff run" in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    env = {**os.environ, "XDIFF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "xdiff_cli", "--debug", "features"], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0
    assert "XdiffError" in proc.stderr


def test_atomic_json_roundtrip_and_corruption(tmp_path):
    target = tmp_path / "a" / "thing.json"
    write_json(target, {"x": 1})
    assert read_json(target, "thing") == {"x": 1}
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    target.write_text("{not json")
    with pytest.raises(XdiffError, match="corrupt"):
        read_json(target, "thing")


def test_settings_reject_bad_combinations():
    with pytest.raises(XdiffError, match="exclusive-frac"):
        RunSettings(exclusive_frac=0.7).validate()
    with pytest.raises(XdiffError, match="cannot exceed"):
        RunSettings(k=100, dict_size=50).validate()
    with pytest.raises(XdiffError, match="arch"):
        RunSettings(arch="sae").validate()
    assert RunSettings.from_dict(RunSettings(tokens=5).to_dict()).tokens == 5


def test_tiny_models_load_with_auto_classes_offline(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(tiny_models) == {"llama", "qwen3", "gptoss"}
    vocab_sizes, classes = set(), set()
    for directory in tiny_models.values():
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory)
        classes.add(type(model).__name__)
        vocab_sizes.add(len(tokenizer))
        assert tokenizer.pad_token and tokenizer.eos_token and tokenizer.chat_template
        ids = tokenizer("The red cat saw 1989 東京 🌞", return_tensors="pt")
        logits = model(**ids).logits
        assert logits.shape[-1] == model.config.vocab_size
    assert classes == {"LlamaForCausalLM", "Qwen3ForCausalLM", "GptOssForCausalLM"}
    assert len(vocab_sizes) == 3, "tokenizers must differ"


def test_tiny_models_carry_planted_concepts(tiny_models):
    planted_b = json.loads((Path(tiny_models["qwen3"]) / "planted.json").read_text())
    planted_a = json.loads((Path(tiny_models["llama"]) / "planted.json").read_text())
    assert "exclusive" in planted_b and "exclusive" not in planted_a
    assert len(planted_b["exclusive"]["words"]) >= 8
    assert len(planted_a["shared"]["words"]) >= 6
