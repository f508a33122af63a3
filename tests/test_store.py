"""Activation store: round trip, splits, document text, atomic resume bookkeeping, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from xdiff_cli.data.store import ActivationStore, Shard, StoreWriter
from xdiff_cli.errors import XdiffError

IDENTITY = {"model_a": "a", "model_b": "b", "layer_a": 1, "layer_b": 2, "d_a": 4, "d_b": 3, "dtype": "bfloat16"}


def _shard(doc_ids, d_a=4, d_b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(doc_ids)
    return Shard(
        acts_a=torch.randn(n, d_a, generator=g).to(torch.bfloat16),
        acts_b=torch.randn(n, d_b, generator=g).to(torch.bfloat16),
        doc_id=torch.tensor(doc_ids, dtype=torch.long),
        start_a=torch.arange(n, dtype=torch.long),
        start_b=torch.arange(n, dtype=torch.long),
        end=torch.arange(n, dtype=torch.long) + 1,
    )


def _write_three_shards(directory):
    writer = StoreWriter.open_or_create(directory, IDENTITY)
    shards = [_shard([0, 0, 1], seed=0), _shard([2, 2], seed=1), _shard([3, 3, 3, 4], seed=2)]
    docs = [[(0, "zero"), (1, "one")], [(2, "two ✓")], [(3, "three"), (4, "four")]]
    for i, (shard, documents) in enumerate(zip(shards, docs, strict=True)):
        writer.write_shard(shard, documents, next_doc_index=documents[-1][0] + 1, stats={"aligned_pairs": len(shard)})
        assert writer.manifest["shards"][i]["first_doc_id"] == documents[0][0]
    return writer, shards


def test_store_roundtrip_splits_and_document_text(tmp_path):
    writer, shards = _write_three_shards(tmp_path / "acts")
    writer.finish(scale_a=0.5, scale_b=2.0, aligned_fraction=0.9, eval_fraction=0.1)
    store = ActivationStore.open(tmp_path / "acts")
    assert store.manifest["n_tokens"] == 9 and store.manifest["complete"]
    assert store.manifest["stats"]["aligned_pairs"] == 9
    train, evaluation = store.split("train"), store.split("eval")
    assert (train.num_shards, evaluation.num_shards) == (2, 1)
    assert (train.n_tokens, evaluation.n_tokens) == (5, 4)
    assert (train.d_a, train.d_b, train.scale_a, train.scale_b) == (4, 3, 0.5, 2.0)
    loaded = evaluation.load_shard(0)
    assert torch.equal(loaded.acts_a, shards[2].acts_a) and loaded.acts_a.dtype == torch.bfloat16
    assert loaded.doc_id.tolist() == [3, 3, 3, 4]
    assert store.document_text(2) == "two ✓" and store.document_text(4) == "four"


def test_eval_split_gets_its_own_shards_and_a_single_shard_store_is_refused(tmp_path):
    writer = StoreWriter.open_or_create(tmp_path / "one", IDENTITY)
    writer.write_shard(_shard([0]), [(0, "x")], 1, {})
    with pytest.raises(XdiffError, match="only 1 aligned tokens"):
        writer.finish(scale_a=1, scale_b=1, aligned_fraction=1, eval_fraction=0.1)


def test_reopening_discards_writes_after_the_last_manifest_update(tmp_path):
    writer, _ = _write_three_shards(tmp_path / "acts")
    # a crash after writing a shard file and documents, before the manifest listed them:
    (tmp_path / "acts" / "shards" / "shard-00003.safetensors").write_bytes(b"partial")
    with (tmp_path / "acts" / "documents.jsonl").open("a") as fh:
        fh.write(json.dumps({"doc_id": 5, "text": "lost"}) + "\n")
    resumed = StoreWriter.open_or_create(tmp_path / "acts", IDENTITY)
    assert resumed.manifest["next_doc_index"] == 5
    assert not (tmp_path / "acts" / "shards" / "shard-00003.safetensors").exists()
    lines = (tmp_path / "acts" / "documents.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["doc_id"] for line in lines] == [0, 1, 2, 3, 4]


def test_incomplete_store_cannot_be_opened_for_reading(tmp_path):
    _write_three_shards(tmp_path / "acts")
    with pytest.raises(XdiffError, match="incomplete"):
        ActivationStore.open(tmp_path / "acts")
    assert ActivationStore.open(tmp_path / "acts", require_complete=False).num_shards == 3


def test_store_with_other_models_or_layers_is_refused(tmp_path):
    _write_three_shards(tmp_path / "acts")
    with pytest.raises(XdiffError, match="different settings.*layer_a: stored 1 vs requested 5"):
        StoreWriter.open_or_create(tmp_path / "acts", {**IDENTITY, "layer_a": 5})


def test_missing_store_is_a_user_error(tmp_path):
    with pytest.raises(XdiffError, match="no activation store"):
        ActivationStore.open(tmp_path / "nothing")
