"""Model download through the real huggingface_hub code, against a fake hub on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xdiff_cli.errors import XdiffError
from xdiff_cli.models.hub import fetch_model, parse_model_spec

# --- parsing ---------------------------------------------------------------------------------


def test_parse_hub_id_with_and_without_revision():
    spec = parse_model_spec("Qwen/Qwen3-8B@a1b2c3")
    assert (spec.repo_id, spec.revision, spec.is_local) == ("Qwen/Qwen3-8B", "a1b2c3", False)
    spec = parse_model_spec("gpt2")
    assert (spec.repo_id, spec.revision) == ("gpt2", None)


def test_parse_existing_directory_is_local(tmp_path: Path):
    spec = parse_model_spec(str(tmp_path))
    assert spec.is_local and spec.local_path == tmp_path.resolve() and spec.repo_id is None


@pytest.mark.parametrize("text", ["", "./missing-dir", "/nowhere/at/all", "org/name@", "a/b/c", "bad id!"])
def test_parse_rejects_bad_model_arguments(text: str):
    with pytest.raises(XdiffError):
        parse_model_spec(text)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def served(fake_hub, tiny_models):
    """The tiny Llama served as org/tiny-llama."""
    fake_hub.add_repo("org/tiny-llama", tiny_models["llama"])
    return fake_hub


# --- downloads -------------------------------------------------------------------------------


def test_fetch_downloads_only_what_loading_needs_and_records_commit(served, tiny_models):
    fetched = fetch_model("org/tiny-llama")
    repo = served.repos["org/tiny-llama"]
    assert fetched.repo_id == "org/tiny-llama"
    assert fetched.revision == repo.sha
    names = sorted(p.name for p in fetched.path.iterdir())
    assert names == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
        ]
        + ["tokenizer_config.json"]
    )
    assert "planted.json" not in names  # not a loading file
    source = tiny_models["llama"] / "model.safetensors"
    assert (fetched.path / "model.safetensors").read_bytes() == source.read_bytes()


def test_fetch_resolves_a_tag_to_its_own_commit(fake_hub, tiny_models):
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    old = {"config.json": json.dumps({**config, "note": "v1"}).encode(), "model.safetensors": b"weights-v1"}
    fake_hub.add_repo("org/tagged", tiny_models["llama"], extra_revisions={"v1": old})
    latest = fetch_model("org/tagged")
    tagged = fetch_model("org/tagged@v1")
    assert tagged.revision == fake_hub.repos["org/tagged"].revisions["v1"]
    assert tagged.revision != latest.revision
    assert json.loads((tagged.path / "config.json").read_text())["note"] == "v1"


def test_missing_repo_is_a_one_line_not_found_error(served):
    with pytest.raises(XdiffError, match="not found on the hub"):
        fetch_model("org/does-not-exist")


def test_missing_revision_is_reported(served):
    with pytest.raises(XdiffError, match="revision 'nope' not found"):
        fetch_model("org/tiny-llama@nope")


def test_gated_repo_without_token_says_accept_licence_and_log_in(fake_hub, tiny_models):
    fake_hub.add_repo("meta/gated", tiny_models["llama"], gated=True, allowed_tokens={"hf_good"})
    with pytest.raises(XdiffError) as info:
        fetch_model("meta/gated")
    message = str(info.value)
    assert "gated" in message and "accept the licence" in message and "HF_TOKEN" in message
    statuses = [p for m, p, _ in fake_hub.requests if m == "HEAD"]
    assert statuses, "the download was attempted"


def test_gated_repo_with_unaccepted_token_fails_without_leaking_it(fake_hub, tiny_models, monkeypatch):
    fake_hub.add_repo("meta/gated", tiny_models["llama"], gated=True, allowed_tokens={"hf_good"})
    monkeypatch.setenv("HF_TOKEN", "hf_secret_not_accepted")
    with pytest.raises(XdiffError, match="accept the licence") as info:
        fetch_model("meta/gated")
    assert "hf_secret_not_accepted" not in str(info.value)


def test_gated_repo_with_accepted_token_downloads(fake_hub, tiny_models, monkeypatch):
    fake_hub.add_repo("meta/gated", tiny_models["llama"], gated=True, allowed_tokens={"hf_good"})
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    fetched = fetch_model("meta/gated")
    assert (fetched.path / "model.safetensors").is_file()
    sent = {h.get("authorization") for _, p, h in fake_hub.requests if "/resolve/" in p}
    assert sent == {"Bearer hf_good"}


def test_offline_fetch_uses_the_cache(served, monkeypatch):
    import huggingface_hub.constants as hf_constants

    online = fetch_model("org/tiny-llama")
    served.stop()  # the hub is gone, and offline mode is on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    offline = fetch_model("org/tiny-llama")
    assert offline.path == online.path and offline.revision == online.revision


def test_unreachable_hub_falls_back_to_the_cache(served):
    online = fetch_model("org/tiny-llama")
    served.stop()  # connection refused
    assert fetch_model("org/tiny-llama").revision == online.revision


def test_offline_and_not_cached_is_a_clear_error(served, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(XdiffError, match="not \\(fully\\) in the local cache and offline mode is on"):
        fetch_model("org/tiny-llama")


def test_download_cut_mid_file_resumes_with_a_range_request(served, tiny_models, monkeypatch):
    import huggingface_hub.constants as hf_constants

    # Small chunks so the client has written part of the file when the connection drops.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    served.drop_once.add("model.safetensors")
    fetched = fetch_model("org/tiny-llama")
    gets = served.downloads("model.safetensors")
    assert len(gets) == 2
    assert "range" not in gets[0] and gets[1]["range"].startswith("bytes=")
    assert int(gets[1]["range"][len("bytes=") : -1]) > 0
    source = (tiny_models["llama"] / "model.safetensors").read_bytes()
    assert (fetched.path / "model.safetensors").read_bytes() == source


def test_interrupted_download_resumes_on_rerun_without_refetching(served):
    served.fail.add("model.safetensors")
    with pytest.raises(XdiffError, match="rerun the same command to resume"):
        fetch_model("org/tiny-llama")
    assert len(served.downloads("config.json")) == 1
    served.fail.clear()
    fetched = fetch_model("org/tiny-llama")
    assert (fetched.path / "model.safetensors").is_file()
    assert len(served.downloads("config.json")) == 1  # already complete: not fetched again
    assert len(served.downloads("model.safetensors")) == 2


def test_pickle_only_repo_needs_opt_in(fake_hub, tiny_models):
    files = {
        "config.json": (tiny_models["llama"] / "config.json").read_bytes(),
        "pytorch_model.bin": b"not really a pickle",
    }
    fake_hub.add_repo("old/pickled", files=files)
    with pytest.raises(XdiffError, match="--allow-pickle-weights"):
        fetch_model("old/pickled")
    assert fake_hub.downloads("pytorch_model.bin") == []  # never downloaded without opt-in
    fetched = fetch_model("old/pickled", allow_pickle_weights=True)
    assert (fetched.path / "pytorch_model.bin").read_bytes() == b"not really a pickle"


def test_custom_code_files_only_with_trust_remote_code(fake_hub, tiny_models):
    fake_hub.add_repo("odd/custom", tiny_models["llama"], files={"modeling_odd.py": b"print('hi')\n"})
    assert not (fetch_model("odd/custom").path / "modeling_odd.py").exists()
    assert (fetch_model("odd/custom", trust_remote_code=True).path / "modeling_odd.py").is_file()


def test_local_directory_is_used_in_place(tiny_models):
    fetched = fetch_model(str(tiny_models["llama"]))
    assert fetched.path == tiny_models["llama"].resolve()
    assert (fetched.repo_id, fetched.revision) == (None, "local")


def test_local_directory_without_config_is_rejected(tmp_path: Path):
    with pytest.raises(XdiffError, match="no config.json"):
        fetch_model(str(tmp_path))


# --- the command -----------------------------------------------------------------------------


def test_pull_command_prints_path_repo_and_revision(served):
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    result = CliRunner().invoke(app, ["pull", "org/tiny-llama"])
    assert result.exit_code == 0, result.output
    sha = served.repos["org/tiny-llama"].sha
    assert sha in result.output and "org/tiny-llama" in result.output and "llama" in result.output


def test_pull_command_errors_are_one_line_with_exit_1(served):
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    result = CliRunner().invoke(app, ["pull", "org/missing"])
    assert result.exit_code == 1
    assert "not found on the hub" in result.output and "Traceback" not in result.output


def test_pull_rejects_a_bert_encoder_as_not_a_causal_lm(fake_hub):
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32}
    fake_hub.add_repo(
        "google/bertish", files={"config.json": json.dumps(config).encode(), "model.safetensors": b"x"}
    )
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    result = CliRunner().invoke(app, ["pull", "google/bertish"])
    assert result.exit_code == 1 and "not a causal LM" in result.output


def test_pull_in_a_fresh_process_reads_hf_endpoint(served, tmp_path: Path):
    """The real CLI in a subprocess: HF_ENDPOINT is set before huggingface_hub is imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "sub-cache")}
    done = subprocess.run(
        [sys.executable, "-m", "xdiff_cli", "pull", "org/tiny-llama"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert served.repos["org/tiny-llama"].sha in done.stdout
