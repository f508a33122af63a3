"""Shared fixtures: an isolated XDIFF_HOME per test and tiny real-architecture models.

Tiny models are built once per session, offline (see `xdiff_cli/models/tiny.py`): a Llama-style,
a Qwen3-style and a GPT-OSS-style causal LM, each with its own byte-level BPE tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def xdiff_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data root and HF cache; nothing leaks into the user's."""
    home = tmp_path / "xdiff-home"
    monkeypatch.setenv("XDIFF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def one_torch_thread():
    """For tests of tiny tensors: one thread beats two threads fighting over a busy CI box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'llama': dir, 'qwen3': dir, 'gptoss': dir} — saved tiny models with planted concepts."""
    from xdiff_cli.models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mixed .jsonl corpus (web-like text + chats) over the tiny models' vocabulary."""
    from xdiff_cli.models.tiny import write_corpus_jsonl

    return write_corpus_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", n_docs=300, n_chats=60)


# --- fake model hub (issue 3: models) --------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running `tests/fakehub.FakeHub`, with this process pointed at it.

    The endpoint, cache and offline flag are read by `xdiff_cli.models.hub` at call time; the offline
    flag huggingface_hub froze at import is reset here too. `hub.add_repo(id, dir)` serves a
    model directory; `fetch_model(id)` then downloads it through the real huggingface_hub code.
    """
    import huggingface_hub.constants as hf_constants
    from fakehub import FakeHub  # tests/ is on sys.path (rootdir conftest)

    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # Never send the developer's stored token to the fake hub.
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"), raising=False)
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored"), raising=False)
    yield hub
    hub.stop()


# --- one analysed run shared by the end-to-end tests ------------------------------------------

# The planted end-to-end settings (see test_analysis_planted.py for why these).
PLANTED_SETTINGS = dict(
    tokens=12_000, context_length=128, harvest_batch_size=16, eval_fraction=0.25, dict_size=128, k=8,
    exclusive_frac=0.1, steps=500, batch_size=256, lr=2e-3, quant="none", device="cpu", seed=0,
)
HARVEST_KEYS = ("tokens", "context_length", "harvest_batch_size", "eval_fraction", "quant", "device", "seed")


def _flags(settings: dict, keys) -> list[str]:  # noqa: ANN001
    return [item for key in keys for item in (f"--{key.replace('_', '-')}", str(settings[key]))]


@pytest.fixture(scope="session")
def analysed_tiny_run(tiny_models, tiny_corpus, tmp_path_factory):  # noqa: ANN001
    """(XDIFF_HOME, run id) of one run made the way a user makes it stage by stage:
    `xdiff harvest A B`, then `xdiff train`, then `xdiff analyze`. Built once per session and
    shared by every end-to-end test that reads a real analysed run (read-only: copy it to
    change it)."""
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    home = tmp_path_factory.mktemp("analysed-home")
    old_home = os.environ.get("XDIFF_HOME")
    os.environ["XDIFF_HOME"] = str(home)
    try:
        runner = CliRunner()
        s = PLANTED_SETTINGS
        steps = (
            ["harvest", str(tiny_models["llama"]), str(tiny_models["qwen3"]), "--corpus", str(tiny_corpus),
             "--name", "planted", "-q", *_flags(s, HARVEST_KEYS)],
            ["train", "-q", *_flags(s, ("dict_size", "k", "exclusive_frac", "steps", "batch_size", "lr"))],
            ["analyze"],
        )
        for args in steps:
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args[0], result.output)
    finally:
        if old_home is None:
            os.environ.pop("XDIFF_HOME", None)
        else:
            os.environ["XDIFF_HOME"] = old_home
    return home, "planted"
