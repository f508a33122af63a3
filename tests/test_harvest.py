"""Harvest stage: truncated forwards, padding, outliers, scales, resume, refusals, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xdiff_cli.data import harvest as harvest_module
from xdiff_cli.data.corpus import Document, iter_documents
from xdiff_cli.data.harvest import (
    encode_documents,
    harvest,
    harvest_run,
    layer_activations,
    normalisation_scale,
    outlier_mask,
)
from xdiff_cli.data.store import ActivationStore, estimate_bytes
from xdiff_cli.errors import XdiffError


@pytest.fixture(scope="module")
def models(tiny_models):
    from xdiff_cli.models.loading import load_model

    return {name: load_model(path, device="cpu") for name, path in tiny_models.items()}


def _docs(n, start=0):
    return list(iter_documents("builtin:smoke"))[start : start + n]


def test_truncated_forward_equals_full_forward_at_that_layer(models):
    model = models["qwen3"]
    ids = model.tokenizer("The blue cat found a small box near the river.")["input_ids"]
    hidden = layer_activations(model, [ids], layer=1)
    with torch.inference_mode():
        full = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    assert torch.allclose(hidden, full.hidden_states[2], atol=1e-6)


def test_truncated_forward_never_runs_later_layers(models):
    model = models["llama"]
    ran = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, layer in enumerate(model.adapter.layers)]
    head = model.model.lm_head.register_forward_hook(lambda m, i, o: ran.append("head"))
    try:
        layer_activations(model, [[1, 2, 3]], layer=1)
    finally:
        for h in [*hooks, head]:
            h.remove()
    assert ran == [0, 1]


def test_padding_does_not_change_a_documents_activations(models):
    model = models["gptoss"]
    short = model.tokenizer("Jun saw a tiger.")["input_ids"]
    long = model.tokenizer("Emil bought some bread painted green yesterday. The white eagle carried a coin.")["input_ids"]
    alone = layer_activations(model, [short], layer=2)[0]
    batched = layer_activations(model, [long, short], layer=2)[1, : len(short)]
    assert torch.allclose(alone, batched, atol=1e-4)


def test_outliers_above_twice_the_batch_median_are_dropped():
    norms_a = torch.tensor([1.0, 1.1, 0.9, 5.0, 1.0])
    norms_b = torch.tensor([2.0, 9.0, 2.1, 2.0, 1.9])
    assert outlier_mask(norms_a, norms_b).tolist() == [True, False, True, False, True]


def test_normalisation_scale_maps_median_norm_to_sqrt_mean_width():
    norms = torch.tensor([2.0, 4.0, 8.0])
    assert normalisation_scale(norms, 64, 32) * 4.0 == pytest.approx(math.sqrt(48))


def test_disk_estimate_counts_both_widths_in_16_bits():
    assert estimate_bytes(1000, 64, 32) == 1000 * ((64 + 32) * 2 + 40)


@pytest.fixture(scope="module")
def harvested(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "activations"
    store = harvest(models["llama"], models["gptoss"], _docs(40), out, tokens=600, batch_size=4, progress=False)
    return store


def test_store_holds_requested_tokens_in_document_order(harvested):
    m = harvested.manifest
    assert m["complete"] and m["n_tokens"] == 600 and (m["d_a"], m["d_b"]) == (64, 32)
    assert (m["layer_a"], m["layer_b"]) == (2, 2)  # middle layer of 4 by default
    assert m["revision_a"] == "local" and len(m["tokenizer_hash_a"]) == 16
    assert m["tokenizer_hash_a"] != m["tokenizer_hash_b"]
    assert harvested.split("train").num_shards >= 2 and harvested.split("eval").num_shards >= 1
    shards = [harvested.load_shard(i) for i in range(harvested.num_shards)]
    doc_ids = torch.cat([s.doc_id for s in shards]).numpy()
    assert (np.diff(doc_ids) >= 0).all()  # documents contiguous, in order, never split across shards
    for left, right in zip(shards, shards[1:], strict=False):
        assert left.doc_id[-1] < right.doc_id[0]
    ends = torch.cat([s.end for s in shards]).numpy()
    same_doc = np.diff(doc_ids) == 0
    assert (np.diff(ends)[same_doc] > 0).all()  # positions ascending within a document


def test_stored_spans_index_the_document_text(harvested):
    shard = harvested.load_shard(0)
    for k in range(0, len(shard), 7):
        text = harvested.document_text(int(shard.doc_id[k]))
        piece_a = text[int(shard.start_a[k]) : int(shard.end[k])]
        piece_b = text[int(shard.start_b[k]) : int(shard.end[k])]
        assert piece_a.strip() and piece_b.strip()
        assert piece_a.endswith(piece_b) or piece_b.endswith(piece_a)  # same end, one may be longer


def test_stored_activations_match_a_fresh_forward_of_that_document(harvested, models):
    shard = harvested.load_shard(0)
    doc_id = int(shard.doc_id[0])
    doc = next(d for d in _docs(40) if d.doc_id == doc_id)
    enc = encode_documents(models["llama"].tokenizer, [doc], 512)[0]
    hidden = layer_activations(models["llama"], [enc.input_ids], layer=2)[0]
    rows = (shard.doc_id == doc_id).nonzero().flatten()
    position_of_end = {int(e): p for p, e in enumerate(enc.spans.end) if enc.spans.keep[p]}
    positions = [position_of_end[int(shard.end[r])] for r in rows]
    expected = hidden[positions].to(torch.bfloat16)
    assert torch.allclose(shard.acts_a[rows].float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_scales_put_the_median_normalised_norm_at_sqrt_mean_width(harvested):
    m = harvested.manifest
    norms_a = torch.cat([harvested.load_shard(i).acts_a.float().norm(dim=-1) for i in range(harvested.num_shards)])
    norms_b = torch.cat([harvested.load_shard(i).acts_b.float().norm(dim=-1) for i in range(harvested.num_shards)])
    target = math.sqrt((64 + 32) / 2)
    assert float((norms_a * m["scale_a"]).median()) == pytest.approx(target, rel=1e-3)
    assert float((norms_b * m["scale_b"]).median()) == pytest.approx(target, rel=1e-3)
    # outliers were dropped per batch, so nothing is far above the median
    assert float(norms_a.max() / norms_a.median()) < 2.5


def test_complete_store_is_returned_without_running_models(harvested, models, monkeypatch):
    monkeypatch.setattr(harvest_module, "harvest_batch", lambda *a, **k: pytest.fail("re-harvested"))
    again = harvest(models["llama"], models["gptoss"], _docs(40), harvested.dir, tokens=600, batch_size=4, progress=False)
    assert again.manifest["shards"] == harvested.manifest["shards"]


def test_store_for_other_layers_is_refused(harvested, models):
    with pytest.raises(XdiffError, match="different settings.*layer_a"):
        harvest(models["llama"], models["gptoss"], _docs(40), harvested.dir, tokens=600, layer_a=1, progress=False)


def test_interrupted_harvest_resumes_after_last_complete_shard(models, tmp_path, monkeypatch, harvested):
    from xdiff_cli.data.store import StoreWriter

    real_write = StoreWriter.write_shard
    calls = []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_shard", crash_on_third)
    out = tmp_path / "activations"
    with pytest.raises(KeyboardInterrupt):
        harvest(models["llama"], models["gptoss"], _docs(40), out, tokens=600, batch_size=4, progress=False)
    partial = ActivationStore.open(out, require_complete=False)
    assert len(partial.manifest["shards"]) == 2 and not partial.manifest["complete"]
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    resumed = harvest(models["llama"], models["gptoss"], _docs(40), out, tokens=600, batch_size=4, progress=False)
    assert resumed.manifest["n_tokens"] == 600
    assert [s["n_tokens"] for s in resumed.manifest["shards"]] == [s["n_tokens"] for s in harvested.manifest["shards"]]
    for i in range(resumed.num_shards):
        a, b = resumed.load_shard(i), harvested.load_shard(i)
        assert torch.equal(a.doc_id, b.doc_id) and torch.allclose(a.acts_b.float(), b.acts_b.float(), atol=1e-2)
    assert resumed.manifest["stats"] == harvested.manifest["stats"]


def test_disk_shortfall_is_reported_before_harvesting(models, tmp_path, monkeypatch):
    monkeypatch.setattr("xdiff_cli.paths.free_bytes", lambda path: 1000)
    # The estimate in readable units, never "0.00 GB".
    with pytest.raises(XdiffError, match=r"not enough disk for the activation store: needs ~\d+\.\d MB"):
        harvest(models["llama"], models["qwen3"], _docs(5), tmp_path / "a", tokens=10**6, progress=False)


def test_chat_documents_align_only_message_content(models, tmp_path):
    chats = [d for d in iter_documents("builtin:smoke") if d.is_chat][:12]
    docs = [Document(i, d.text, d.messages) for i, d in enumerate(chats)]
    store = harvest(models["qwen3"], models["gptoss"], docs, tmp_path / "acts", tokens=200, batch_size=6, progress=False)
    for i in range(store.num_shards):
        shard = store.load_shard(i)
        for k in range(len(shard)):
            text = store.document_text(int(shard.doc_id[k]))
            piece = text[int(shard.start_b[k]) : int(shard.end[k])]
            assert piece.strip() and "<|" not in piece and "assistant" not in piece
    assert store.manifest["aligned_fraction"] > 0.9


def test_harvest_run_records_metrics(models, xdiff_home):
    from xdiff_cli.run.runs import Run
    from xdiff_cli.run.settings import RunSettings

    settings = RunSettings(model_a="tiny-a", model_b="tiny-b", tokens=300, harvest_batch_size=8)
    run = Run.create(settings, "h")
    store = harvest_run(run, models["llama"], models["qwen3"], progress=False)
    assert store.dir == run.store_dir and store.n_tokens == 300
    metrics = Run.load(run.dir).metrics
    assert metrics["harvested_tokens"] == 300
    assert metrics["aligned_fraction"] == pytest.approx(store.manifest["aligned_fraction"])
    assert store.manifest["model_a"] == "tiny-a" and not run.stage_done("harvest")


def test_cli_harvest_end_to_end(tiny_models, xdiff_home):
    from xdiff_cli.cli import app

    result = CliRunner().invoke(
        app,
        ["harvest", str(tiny_models["llama"]), str(tiny_models["qwen3"]), "--tokens", "300", "--layer-a", "1",
         "--name", "cli", "--quiet", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "300 aligned token pairs" in result.output
    store = ActivationStore.open(xdiff_home / "runs" / "cli" / "activations")
    assert store.manifest["layer_a"] == 1 and store.manifest["layer_b"] == 2
    again = CliRunner().invoke(app, ["harvest", "--run", "cli", "--quiet"])
    assert again.exit_code == 0 and "300 aligned token pairs" in again.output
    missing = CliRunner().invoke(app, ["harvest", "a", "b", "--corpus", "nope.jsonl"])
    assert missing.exit_code == 1 and "not found" in missing.output
