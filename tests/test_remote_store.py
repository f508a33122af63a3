"""Stores that live elsewhere: fsspec URLs (memory://, file://) read through the bounded cache.

Unit tests build a small store with `StoreWriter` and copy it into fsspec's in-memory
filesystem; the end-to-end test attaches the shared analysed run's store to new runs, by URL
and by directory, trains both through the CLI and compares the crosscoders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from xdiff_cli.data.remote import CACHE_ENV, RemoteActivationStore, StoreCache, cache_limit, cache_root
from xdiff_cli.data.store import ActivationStore, Shard, StoreWriter, open_store
from xdiff_cli.errors import XdiffError

IDENTITY = {"model_a": "a", "model_b": "b", "layer_a": 1, "layer_b": 2, "d_a": 16, "d_b": 12, "dtype": "bfloat16"}
runner = CliRunner()


def _store(directory: Path, n_shards: int = 6, rows: int = 50) -> ActivationStore:
    writer = StoreWriter.open_or_create(directory, IDENTITY)
    g = torch.Generator().manual_seed(0)
    for i in range(n_shards):
        docs = [2 * i, 2 * i + 1]
        shard = Shard(
            acts_a=torch.randn(rows, 16, generator=g).to(torch.bfloat16),
            acts_b=torch.randn(rows, 12, generator=g).to(torch.bfloat16),
            doc_id=torch.tensor([docs[0]] * (rows // 2) + [docs[1]] * (rows - rows // 2)),
            start_a=torch.arange(rows), start_b=torch.arange(rows), end=torch.arange(rows) + 1,
        )
        writer.write_shard(shard, [(d, f"document {d} ✓") for d in docs], next_doc_index=docs[1] + 1, stats={})
    writer.finish(scale_a=0.5, scale_b=2.0, aligned_fraction=0.9, eval_fraction=0.2)
    return ActivationStore.open(directory)


def _upload(directory: Path) -> str:
    """A copy of `directory` in fsspec's in-memory filesystem; returns its URL."""
    memory = fsspec.filesystem("memory")
    root = f"/stores/{uuid.uuid4().hex}"
    for path in directory.rglob("*"):
        if path.is_file():
            memory.pipe_file(f"{root}/{path.relative_to(directory).as_posix()}", path.read_bytes())
    return f"memory://{root}"


@pytest.fixture
def local_store(tmp_path) -> ActivationStore:
    return _store(tmp_path / "activations")


def test_remote_store_reads_the_same_shards_and_documents_as_the_local_one(local_store):
    remote = open_store(_upload(local_store.dir))
    assert isinstance(remote, RemoteActivationStore) and remote.manifest == local_store.manifest
    for i in range(local_store.num_shards):
        here, there = local_store.load_shard(i), remote.load_shard(i)
        assert all(torch.equal(a, b) for a, b in zip(here.tensors().values(), there.tensors().values(), strict=True))
    assert remote.split("eval").n_tokens == local_store.split("eval").n_tokens
    assert remote.document_text(7) == "document 7 ✓" == local_store.document_text(7)
    assert remote.location.startswith("memory://")


def test_reading_a_split_in_order_fetches_the_next_shard_ahead(local_store):
    remote = open_store(_upload(local_store.dir))
    split = remote.split("train")
    shards = iter(split)
    first = next(shards)
    assert torch.equal(first.acts_a, local_store.load_shard(0).acts_a)
    ahead = remote._pending[split.shard_indices[1]].result()  # started while shard 0 was read
    assert ahead.is_file() and ahead.name.startswith("shard-00001.")
    assert [len(s) for s in shards] == [len(local_store.load_shard(i)) for i in range(1, split.num_shards)]
    assert not remote._pending


def test_manifest_records_each_shards_size_and_checksum(local_store):
    from xdiff_cli.atomic import file_checksum

    for entry in local_store.manifest["shards"]:
        path = local_store.dir / "shards" / entry["name"]
        assert entry["bytes"] == path.stat().st_size and entry["crc32"] == file_checksum(path)
    assert local_store.manifest["documents_crc32"] == file_checksum(local_store.dir / "documents.jsonl")


def test_cache_stays_within_its_bound_by_evicting_the_least_recently_used_shard(local_store, monkeypatch):
    shard_bytes = max(e["bytes"] for e in local_store.manifest["shards"])
    monkeypatch.setenv(CACHE_ENV, str(int(2.5 * shard_bytes)))
    remote = open_store(_upload(local_store.dir))
    usage = []
    for i in [0, 1, 2, 3, 4, 5, 4, 0]:
        remote.load_shard(i)
        usage.append(remote.cache.usage())
    assert max(usage) <= cache_limit() == int(2.5 * shard_bytes)
    names = lambda paths: sorted(p.name.split(".")[0] for p in paths)  # noqa: E731
    # 0..5 in order keeps the two newest; 4 is a hit (no eviction); 0 then evicts 5, not 4.
    evicted = [p for p in remote.cache.evicted if p.parent.parent == remote.dir]
    assert names(evicted) == names(remote.dir / "shards" / f"shard-0000{i}.x" for i in (0, 1, 2, 3, 5))
    cached = names(p for p in (remote.dir / "shards").iterdir())
    assert cached == ["shard-00000", "shard-00004"]


def test_corrupted_remote_shard_is_a_one_line_error_and_leaves_nothing_in_the_cache(local_store):
    url = _upload(local_store.dir)
    memory = fsspec.filesystem("memory")
    name = local_store.manifest["shards"][2]["name"]
    remote_path = f"{url.removeprefix('memory://')}/shards/{name}"
    data = bytearray(memory.cat_file(remote_path))
    data[-3] ^= 0xFF
    memory.pipe_file(remote_path, bytes(data))
    remote = open_store(url)
    with pytest.raises(XdiffError, match=r"shard shard-00002\.safetensors at .* does not match the store's manifest \(checksum differs\)") as exc:
        remote.load_shard(2)
    assert "\n" not in str(exc.value)
    assert not list((remote.dir / "shards").glob("shard-00002*")) and not list((remote.dir / "shards").glob(".*"))
    memory.pipe_file(remote_path, bytes(data[:-10]))  # truncated: caught by size before the checksum
    with pytest.raises(XdiffError, match=r"bytes, [\d,]+ expected"):
        remote.load_shard(2)
    assert torch.equal(remote.load_shard(1).acts_a, local_store.load_shard(1).acts_a)  # the others still load


def test_shard_larger_than_the_cache_bound_is_refused(local_store, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "100")
    with pytest.raises(XdiffError, match=f"more than the store cache may hold.*raise {CACHE_ENV}"):
        open_store(_upload(local_store.dir)).load_shard(0)


def test_a_killed_download_does_not_count_against_the_bound(local_store, tmp_path):
    cache = StoreCache(tmp_path / "cache", limit=10**6)
    stale = tmp_path / "cache" / "abc" / "shards" / ".shard-00000.safetensors.999999999.0a1b2c3d.500000.tmp"
    stale.parent.mkdir(parents=True)
    stale.touch()
    assert cache.usage() == 0 and not stale.exists()  # pid 999999999 does not exist


def test_missing_backend_or_store_is_a_one_line_error(tmp_path):
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(XdiffError, match=r"reading s3:// stores needs the s3fs package — pip install s3fs"):
            open_store("s3://bucket/run/activations")
    with pytest.raises(XdiffError, match="unknown storage protocol 'nosuch'"):
        open_store("nosuch://x/y")
    with pytest.raises(XdiffError, match=r"no activation store at memory://nothing/here \(no manifest.json there\)"):
        open_store("memory://nothing/here")


def test_file_url_reads_through_the_cache(local_store):
    remote = open_store(local_store.dir.as_uri())
    assert isinstance(remote, RemoteActivationStore)
    assert torch.equal(remote.load_shard(3).acts_b, local_store.load_shard(3).acts_b)
    assert remote.dir.parent == cache_root()


def test_store_served_over_http_reads_like_the_local_one(local_store):
    """fsspec's http backend (aiohttp) against a plain HTTP server on 127.0.0.1."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(local_store.dir.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = open_store(f"http://127.0.0.1:{server.server_port}/activations")
        for i in range(local_store.num_shards):
            assert torch.equal(remote.load_shard(i).acts_a, local_store.load_shard(i).acts_a)
        assert remote.document_text(3) == "document 3 ✓"
        with pytest.raises(XdiffError, match="no activation store at http://127.0.0.1"):
            open_store(f"http://127.0.0.1:{server.server_port}/nothing")
    finally:
        server.shutdown()
        server.server_close()


def test_bad_cache_size_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(XdiffError, match=f"{CACHE_ENV}='lots' is not a size"):
        cache_limit()
    monkeypatch.setenv(CACHE_ENV, "1.5G")
    assert cache_limit() == 1_500_000_000


# --- hf:// through the real HfFileSystem, against the fake hub (tests/fakehub.py) ---------------


def _hub_dataset(hub, directory: Path, repo_id: str = "org/acts", **options):  # noqa: ANN001, ANN003
    """The store at `directory` uploaded as `activations/` of a dataset repo (beside a README,
    as people publish them); returns the repo."""
    files = {f"activations/{p.relative_to(directory).as_posix()}": p.read_bytes()
             for p in directory.rglob("*") if p.is_file()}
    return hub.add_repo(repo_id, files={"README.md": b"# activations\n", **files}, repo_type="dataset", **options)


def test_store_in_a_hub_dataset_repo_reads_like_the_local_one(local_store, fake_hub):
    _hub_dataset(fake_hub, local_store.dir)
    remote = open_store("hf://datasets/org/acts/activations")
    assert isinstance(remote, RemoteActivationStore) and remote.manifest == local_store.manifest
    split = remote.split("train")  # in order: each next shard is fetched ahead on the reader thread
    assert [len(s) for s in split] == [len(local_store.load_shard(i)) for i in split.shard_indices]
    assert not remote._pending
    for i in range(local_store.num_shards):
        here, there = local_store.load_shard(i), remote.load_shard(i)
        assert all(torch.equal(a, b) for a, b in zip(here.tensors().values(), there.tensors().values(), strict=True))
    assert remote.split("eval").n_tokens == local_store.split("eval").n_tokens
    assert remote.document_text(7) == "document 7 ✓" == local_store.document_text(7)
    downloads = lambda: [p for m, p, _ in fake_hub.requests if m == "GET" and "/resolve/" in p]  # noqa: E731
    fetched = downloads()
    assert sorted(p.rsplit("/", 1)[1] for p in fetched if "/shards/" in p) == [e["name"] for e in local_store.manifest["shards"]]
    assert all(p.startswith("/datasets/org/acts/resolve/main/activations/") for p in fetched)
    assert torch.equal(remote.load_shard(0).acts_a, local_store.load_shard(0).acts_a) and downloads() == fetched  # cached


def test_missing_private_or_offline_hub_store_is_a_one_line_error(local_store, fake_hub, monkeypatch):
    import huggingface_hub.constants as hf_constants

    _hub_dataset(fake_hub, local_store.dir)
    _hub_dataset(fake_hub, local_store.dir, "org/gated", gated=True, allowed_tokens={"hf_good"})
    expected = {
        "hf://datasets/org/nope/activations": r"no activation store at hf://datasets/org/nope/activations "
                                              r"\(repository not found\) — .*HF_TOKEN",
        "hf://datasets/org/acts@v9/activations": r"\(revision not found\)",
        "hf://datasets/org/acts/elsewhere": r"no activation store at hf://datasets/org/acts/elsewhere \(no manifest.json",
        "hf://datasets/org/gated/activations": r"could not read the activation store at .*\(GatedRepoError: .*"
                                               r"accept its terms on the hub, then set HF_TOKEN",
    }
    for url, message in expected.items():
        with pytest.raises(XdiffError, match=message) as exc:
            open_store(url)
        assert "\n" not in str(exc.value)
    monkeypatch.setenv("HF_TOKEN", "hf_good")  # read at each request, as huggingface_hub does
    assert torch.equal(open_store("hf://datasets/org/gated/activations").load_shard(1).acts_b,
                       local_store.load_shard(1).acts_b)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(XdiffError, match=r"offline mode is on \(HF_HUB_OFFLINE\) — unset HF_HUB_OFFLINE"):
        open_store("hf://datasets/org/acts/activations")


def test_damaged_shard_on_the_hub_is_refused_by_its_checksum(local_store, fake_hub):
    repo = _hub_dataset(fake_hub, local_store.dir)
    name = local_store.manifest["shards"][2]["name"]
    path = f"activations/shards/{name}"
    good = repo.files[path]
    repo.files[path] = good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:]
    remote = open_store("hf://datasets/org/acts/activations")
    with pytest.raises(XdiffError, match=rf"shard {name} at hf://.* does not match the store's manifest \(checksum differs\)"):
        remote.load_shard(2)
    assert not list((remote.dir / "shards").glob("shard-00002*")) and not list((remote.dir / "shards").glob(".*"))
    repo.files[path] = good[:-10]  # replaced by a shorter file: reopening sees its new size
    with pytest.raises(XdiffError, match=r"bytes, [\d,]+ expected"):
        open_store("hf://datasets/org/acts/activations").load_shard(2)
    assert torch.equal(remote.load_shard(1).acts_a, local_store.load_shard(1).acts_a)  # the others still load


# --- end to end: a run attached to a store harvested elsewhere --------------------------------

PULL = ["--device", "cpu", "--quant", "none", "-q"]
TRAIN = ["--steps", "30", "--batch-size", "128", "--dict-size", "64", "--k", "4", "--device", "cpu", "-q"]


def test_runs_train_and_analyse_a_store_at_a_url_like_a_local_one(analysed_tiny_run, tiny_models, monkeypatch, one_torch_thread):
    from xdiff_cli.cli import app
    from xdiff_cli.run.runs import load_run

    home, run_id = analysed_tiny_run
    source = home / "runs" / run_id / "activations"
    manifest = json.loads((source / "manifest.json").read_text())
    url = _upload(source)
    shard_bytes = max(e["bytes"] for e in manifest["shards"])
    monkeypatch.setenv(CACHE_ENV, str(3 * shard_bytes))
    usage = []
    fetch = StoreCache.fetch

    def watched(self, *args, **kwargs):
        path = fetch(self, *args, **kwargs)
        usage.append(self.usage())
        return path

    monkeypatch.setattr(StoreCache, "fetch", watched)
    models = [str(tiny_models["llama"]), str(tiny_models["qwen3"])]
    for name, store in (("by-url", url), ("by-dir", str(source))):
        result = runner.invoke(app, ["harvest", *models, "--store", store, "--name", name, *PULL])
        assert result.exit_code == 0, result.output
        assert f"activationstore:{store}" in "".join(result.output.split())  # the console wraps long lines
        result = runner.invoke(app, ["train", "--run", name, *TRAIN])
        assert result.exit_code == 0, result.output
    by_url, by_dir = load_run("by-url"), load_run("by-dir")
    assert by_url.settings.store == url and not by_url.store_dir.exists()
    assert by_url.metrics["harvested_tokens"] == manifest["n_tokens"]
    from safetensors.torch import load_file

    one = load_file(str(by_url.crosscoder_dir / "final" / "model.safetensors"))
    two = load_file(str(by_dir.crosscoder_dir / "final" / "model.safetensors"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    n_train = manifest["eval_start_shard"]
    assert len(usage) >= n_train > 3 and max(usage) <= 3 * shard_bytes  # the bound held while training
    result = runner.invoke(app, ["analyze", "--run", "by-url"])
    assert result.exit_code == 0, result.output
    assert load_run("by-url").stage_done("analyze")
    # A corrupted shard at the URL: training from scratch fails with one line, naming the shard.
    memory = fsspec.filesystem("memory")
    name = manifest["shards"][0]["name"]
    path = f"{url.removeprefix('memory://')}/shards/{name}"
    memory.pipe_file(path, memory.cat_file(path)[:-1] + b"\x00")
    for cached in (cache_root()).rglob(f"{name.removesuffix('.safetensors')}.*"):
        os.unlink(cached)
    result = runner.invoke(app, ["train", "--run", "by-url", *TRAIN, "--steps", "31"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: shard {name} at ")


def test_run_attached_to_a_hub_store_trains_and_analyses_like_one_on_a_directory(
    analysed_tiny_run, tiny_models, fake_hub, one_torch_thread
):
    from safetensors.torch import load_file

    from xdiff_cli.cli import app
    from xdiff_cli.run.runs import load_run

    home, run_id = analysed_tiny_run
    source = home / "runs" / run_id / "activations"
    _hub_dataset(fake_hub, source, "org/planted-activations")
    url = "hf://datasets/org/planted-activations/activations"
    models = [str(tiny_models["llama"]), str(tiny_models["qwen3"])]
    for name, store in (("by-hf", url), ("by-dir", str(source))):
        result = runner.invoke(app, ["harvest", *models, "--store", store, "--name", name, *PULL])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["train", "--run", name, *TRAIN])
        assert result.exit_code == 0, result.output
    one, two = (load_file(str(load_run(n).crosscoder_dir / "final" / "model.safetensors")) for n in ("by-hf", "by-dir"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    result = runner.invoke(app, ["analyze", "--run", "by-hf"])
    assert result.exit_code == 0, result.output
    assert load_run("by-hf").stage_done("analyze") and not load_run("by-hf").store_dir.exists()
    shards = {p.rsplit("/", 1)[1] for m, p, _ in fake_hub.requests if m == "GET" and "/activations/shards/" in p}
    manifest = json.loads((source / "manifest.json").read_text())
    assert {e["name"] for e in manifest["shards"][: manifest["eval_start_shard"]]} <= shards


def test_store_of_other_models_is_refused(analysed_tiny_run, tiny_models):
    from xdiff_cli.cli import app

    home, run_id = analysed_tiny_run
    source = home / "runs" / run_id / "activations"
    layer = 0 if json.loads((source / "manifest.json").read_text())["layer_a"] else 1
    models = [str(tiny_models["llama"]), str(tiny_models["qwen3"])]
    result = runner.invoke(app, ["harvest", *models, "--store", _upload(source), "--name", "wrong",
                                 "--layer-a", str(layer), *PULL])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "was harvested from other models or layers (layer_a: store" in result.output


def test_run_plan_with_a_store_elsewhere_needs_no_activation_disk(tiny_models, local_store):
    from xdiff_cli.cli import app

    url = _upload(local_store.dir)
    result = runner.invoke(app, ["run", str(tiny_models["llama"]), str(tiny_models["qwen3"]), "--store", url,
                                 "--precision", "bf16", "--dry-run"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "store memory://" in flat and "disk 0 B of activations" in flat and ", bf16" in flat
    assert "aligned pairs (context" not in flat


def test_older_store_is_checked_against_the_uploaded_sums_file(local_store):
    """A manifest from before shard checksums: the `.xdiff-sums.json` uploaded beside the shards
    is the reference (a damaged shard is still caught)."""
    manifest = json.loads((local_store.dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["bytes"], entry["crc32"]
    (local_store.dir / "manifest.json").write_text(json.dumps(manifest))
    url = _upload(local_store.dir)
    assert torch.equal(open_store(url).load_shard(0).acts_a, local_store.load_shard(0).acts_a)
    memory = fsspec.filesystem("memory")
    path = f"{url.removeprefix('memory://')}/shards/shard-00001.safetensors"
    memory.pipe_file(path, memory.cat_file(path)[:-1] + b"\x01")
    with pytest.raises(XdiffError, match=r"shard shard-00001.safetensors at .* \(checksum differs\)"):
        open_store(url).load_shard(1)


def test_processes_sharing_the_cache_keep_it_within_the_bound_together(local_store, tmp_path):
    """Two readers (as torchrun ranks on one node) over one cache root: each counts the other's
    downloads in flight, so the shards on disk never exceed the bound."""
    import threading

    shard_bytes = max(e["bytes"] for e in local_store.manifest["shards"])
    limit = 3 * shard_bytes
    url = local_store.dir.as_uri()  # file://: fsspec's memory:// shares one file object between threads
    stores = [RemoteActivationStore.open_url(url, cache=StoreCache(tmp_path / "cache", limit)) for _ in range(2)]
    usage, errors = [], []

    def read(store, order):  # noqa: ANN001
        try:
            for i in order:
                assert torch.equal(store.load_shard(i).acts_b, local_store.load_shard(i).acts_b)
                usage.append(store.cache.usage())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    orders = [[0, 1, 2, 3, 4, 5] * 2, [5, 3, 1, 4, 2, 0] * 2]
    threads = [threading.Thread(target=read, args=(s, o)) for s, o in zip(stores, orders, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(usage) == 24 and max(usage) <= limit
    assert sum(len(s.cache.evicted) for s in stores) > 0


def test_training_more_epochs_than_the_cache_holds_is_noted_with_the_bound_to_set(local_store, monkeypatch):
    from xdiff_cli.data.remote import cache_shortfall_note

    shard_bytes = max(e["bytes"] for e in local_store.manifest["shards"])
    monkeypatch.setenv(CACHE_ENV, str(2 * shard_bytes))
    train = open_store(_upload(local_store.dir)).split("train")
    assert train.num_shards > 2
    note = cache_shortfall_note(train, epochs=3.0)
    assert note is not None and "most are downloaded again every epoch" in note and f"{CACHE_ENV}=1G" in note
    assert cache_shortfall_note(train, epochs=0.8) is None  # one pass: nothing to re-download
    assert cache_shortfall_note(train, epochs=3.0, share=1.5 / train.num_shards) is None  # a rank's lanes fit
    assert cache_shortfall_note(local_store.split("train"), epochs=3.0) is None  # a local store has no cache
