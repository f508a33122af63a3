"""Scale-out: sharded harvest and data-parallel training, under a real torchrun (2 CPU ranks, gloo).

One module-scoped world does the expensive part once: a single-process harvest, a part
interrupted mid-harvest, a 2-rank torchrun harvest that resumes it and merges, a
single-process training run and the same training under a 2-rank torchrun. The tests then
assert on what those produced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xdiff_cli.data.parts import Part, merge_parts
from xdiff_cli.data.store import ActivationStore
from xdiff_cli.errors import XdiffError

HARVEST = ["--tokens", "3000", "--quiet", "--device", "cpu", "--harvest-batch-size", "4"]
TRAIN = ["--steps", "6", "--batch-size", "64", "--dict-size", "256", "--k", "8", "--device", "cpu", "--quiet"]
runner = CliRunner()


def _torchrun(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "xdiff_cli", "--", *args]  # `--`: torchrun would read --run as its own --run-path
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _copy_run(home: Path, source: str, target: str) -> Path:
    dst = home / "runs" / target
    shutil.copytree(home / "runs" / source, dst)
    record = json.loads((dst / "run.json").read_text())
    record["id"] = target
    (dst / "run.json").write_text(json.dumps(record))
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    from xdiff_cli.cli import app
    from xdiff_cli.data.store import StoreWriter
    from xdiff_cli.models.tiny import write_corpus_jsonl

    root = tmp_path_factory.mktemp("scaleout")
    home = root / "home"
    corpus = write_corpus_jsonl(root / "corpus.jsonl", n_docs=40, n_chats=8)
    models = [str(tiny_models["llama"]), str(tiny_models["qwen3"])]
    common = [*models, "--corpus", str(corpus), *HARVEST]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIFF_HOME", str(home))
        single = runner.invoke(app, ["harvest", *common, "--name", "single"])
        assert single.exit_code == 0, single.output
        # Part 1 of 2 is killed after its first shard is on disk.
        real_write, calls = StoreWriter.write_shard, []

        def die_on_second(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_write(self, *args, **kwargs)

        mp.setattr(StoreWriter, "write_shard", die_on_second)
        killed = runner.invoke(app, ["harvest", *common, "--name", "sharded", "--shard", "1/2"])
        assert killed.exit_code == 130, killed.output
    part1 = home / "runs" / "sharded" / "activations" / "parts" / "part-00001-of-00002"
    first_shard = part1 / "shards" / "shard-00000.safetensors"
    before = json.loads((part1 / "manifest.json").read_text())
    inode = first_shard.stat().st_ino
    # Both ranks under torchrun: rank 1 resumes the killed part, rank 0 merges.
    _torchrun(home, "harvest", *common, "--name", "sharded")

    # Training: the same run trained by one process and by two ranks.
    _copy_run(home, "single", "t1")
    _copy_run(home, "single", "t2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIFF_HOME", str(home))
        one = runner.invoke(app, ["train", "--run", "t1", *TRAIN])
        assert one.exit_code == 0, one.output
    _torchrun(home, "train", "--run", "t2", *TRAIN)
    return {"home": home, "common": common, "part1_before": before, "part1_inode": inode}


def _pairs(store: ActivationStore) -> dict[str, torch.Tensor]:
    shards = [store.load_shard(i) for i in range(store.num_shards)]
    cat = {k: torch.cat([getattr(s, k) for s in shards]) for k in ("acts_a", "acts_b", "doc_id", "start_a", "start_b", "end")}
    order = torch.argsort(cat["doc_id"] * 10**9 + cat["end"])
    return {k: v[order] for k, v in cat.items()}


def _store(world, run: str) -> ActivationStore:
    return ActivationStore.open(world["home"] / "runs" / run / "activations")


def test_two_rank_harvest_equals_single_process_harvest(world):
    single, merged = _store(world, "single"), _store(world, "sharded")
    assert merged.manifest["merged_parts"] == 2 and merged.n_tokens == single.n_tokens > 2000
    a, b = _pairs(single), _pairs(merged)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (merged.manifest["scale_a"], merged.manifest["scale_b"]) == (single.manifest["scale_a"], single.manifest["scale_b"])
    assert merged.manifest["stats"] == single.manifest["stats"]
    assert (merged.dir / "documents.jsonl").read_text() == (single.dir / "documents.jsonl").read_text()
    assert merged.split("eval").num_shards >= 1 and merged.split("train").num_shards >= 1


def test_parts_split_by_harvest_batch_and_share_the_tokens():
    part = Part.parse("1/3")
    assert [d for d in range(24) if part.owns(d, 4)] == [4, 5, 6, 7, 16, 17, 18, 19]
    assert [Part(i, 3).quota(10) for i in range(3)] == [4, 3, 3]


def test_killed_rank_resumes_without_duplicating_or_losing_pairs(world):
    before = world["part1_before"]
    assert not before["complete"] and len(before["shards"]) == 1
    part1 = world["home"] / "runs" / "sharded" / "activations" / "parts" / "part-00001-of-00002"
    after = json.loads((part1 / "manifest.json").read_text())
    assert after["complete"] and after["shards"][0] == before["shards"][0]
    # The shard written before the kill was kept, not harvested again.
    assert (part1 / "shards" / "shard-00000.safetensors").stat().st_ino == world["part1_inode"]
    merged = _pairs(_store(world, "sharded"))
    keys = merged["doc_id"] * 10**9 + merged["end"]
    assert keys.unique().numel() == keys.numel() == _store(world, "single").n_tokens


@pytest.mark.parametrize("bad", ["2/2", "0/0", "-1/2", "1", "a/b", "1/2/3"])
def test_bad_shard_value_is_a_one_line_error(bad):
    from xdiff_cli.cli import app

    result = runner.invoke(app, ["harvest", "model-a", "model-b", "--shard", bad])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: --shard") and len(result.output.strip().splitlines()) == 1


def _parts_copy(world, tmp_path: Path) -> Path:
    store = tmp_path / "activations"
    shutil.copytree(world["home"] / "runs" / "sharded" / "activations" / "parts", store / "parts")
    return store


def test_merge_refuses_parts_harvested_with_other_settings(world, tmp_path):
    store = _parts_copy(world, tmp_path)
    manifest_path = store / "parts" / "part-00001-of-00002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["layer_a"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(XdiffError, match=r"part 1/2 was harvested with other settings.*layer_a"):
        merge_parts(store, eval_fraction=0.1)
    assert not (store / "manifest.json").exists()


def test_merge_refuses_missing_or_incomplete_parts(world, tmp_path):
    store = _parts_copy(world, tmp_path)
    manifest_path = store / "parts" / "part-00000-of-00002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(XdiffError, match="part 0/2 is incomplete"):
        merge_parts(store, eval_fraction=0.1)
    shutil.rmtree(store / "parts" / "part-00000-of-00002")
    with pytest.raises(XdiffError, match="part 0/2 is missing"):
        merge_parts(store, eval_fraction=0.1)


def test_cli_merge_of_mismatched_parts_is_a_one_line_error(world, monkeypatch):
    from xdiff_cli.cli import app

    home = world["home"]
    monkeypatch.setenv("XDIFF_HOME", str(home))
    dst = home / "runs" / "mismatch"
    if not dst.exists():
        _copy_run(home, "sharded", "mismatch")
        (dst / "activations" / "manifest.json").unlink()
        shutil.copytree(dst / "activations" / "parts" / "part-00000-of-00002", dst / "activations" / "parts" / "part-00000-of-00003")
        manifest = json.loads((dst / "activations" / "parts" / "part-00000-of-00003" / "manifest.json").read_text())
        (dst / "activations" / "parts" / "part-00000-of-00003" / "manifest.json").write_text(json.dumps({**manifest, "part": "0/3"}))
    result = runner.invoke(app, ["harvest", "--merge", "--run", "mismatch"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert lines[-1].startswith("error: the parts in") and "split different ways" in lines[-1]


def _final(world, run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(world["home"] / "runs" / run / "crosscoder" / "final" / "model.safetensors"))


def _metrics(world, run: str) -> dict:
    lines = (world["home"] / "runs" / run / "crosscoder" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def test_two_rank_training_equals_single_process_training(world):
    one, two = _final(world, "t1"), _final(world, "t2")
    for name, value in one.items():
        assert torch.allclose(value, two[name], rtol=1e-4, atol=1e-6), name
    m1, m2 = _metrics(world, "t1"), _metrics(world, "t2")
    assert m2["step"] == m1["step"] == 6
    assert abs(m1["fve_a"] - m2["fve_a"]) < 0.01 and abs(m1["fve_b"] - m2["fve_b"]) < 0.01
    assert m1["l0"] == m2["l0"] and m1["dead_fraction"] == m2["dead_fraction"]
    assert m2["threshold"] == pytest.approx(m1["threshold"], rel=1e-5)


def test_two_rank_training_keeps_forbidden_weights_exactly_zero(world):
    from xdiff_cli.dfc.crosscoder import Crosscoder

    model = Crosscoder.load(world["home"] / "runs" / "t2" / "crosscoder" / "final")
    for name, weights in model.forbidden_weights().items():
        assert torch.count_nonzero(weights) == 0, name


def test_two_rank_checkpoint_resumes_in_one_process(world, monkeypatch):
    """Trained by 2 ranks up to step 5, finished by one process: the single-process model."""
    from xdiff_cli.cli import app

    home = world["home"]
    monkeypatch.setenv("XDIFF_HOME", str(home))
    dst = _copy_run(home, "t2", "t3")
    shutil.rmtree(dst / "crosscoder" / "final")
    shutil.rmtree(dst / "crosscoder" / "checkpoints" / "step-0000006")
    assert (dst / "crosscoder" / "checkpoints" / "step-0000005").is_dir()
    result = runner.invoke(app, ["train", "--run", "t3", *TRAIN])
    assert result.exit_code == 0, result.output
    one, resumed = _final(world, "t1"), _final(world, "t3")
    for name, value in one.items():
        assert torch.allclose(value, resumed[name], rtol=1e-4, atol=1e-6), name


WORKER = str(Path(__file__).with_name("dist_train_worker.py"))
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.fixture(scope="module")
def trained_alone(tmp_path_factory):
    """tests/dist_train_worker.py trained to step 12 in one process (checkpoints at 6 and 12)."""
    out = tmp_path_factory.mktemp("alone") / "run"
    subprocess.run([sys.executable, WORKER, str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, timeout=300)
    return out


def _launch_two_ranks(launcher: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if launcher in LAUNCHERS:
        done = subprocess.run([*LAUNCHERS[launcher], WORKER, str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    # "two-nodes": two torchrun agents, one rank each, meeting at 127.0.0.1 as two machines would
    # (RANK 0 and 1, both LOCAL_RANK 0), on a filesystem both see.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), WORKER, str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-3000:]


@pytest.mark.parametrize("launcher", [*sorted(LAUNCHERS), "two-nodes"])
def test_one_process_checkpoint_resumes_under_two_ranks_that_read_disjoint_shards(trained_alone, tmp_path, launcher):
    """Trained alone to step 6, finished by 2 ranks (torchrun, accelerate launch, or torchrun
    on two "nodes"): the uninterrupted model, and each rank read only its own half of the
    shards (its data lanes)."""
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(trained_alone, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-0000012")
    state = json.loads((resumed / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["data_lanes"] == 8 and len(state["data_positions"]) == 8
    _launch_two_ranks(launcher, resumed)
    one = load_file(str(trained_alone / "final" / "model.safetensors"))
    two = load_file(str(resumed / "final" / "model.safetensors"))
    for name, value in one.items():
        assert torch.allclose(value, two[name], rtol=1e-4, atol=1e-6), name
    reads = [set(json.loads((resumed / f"read-by-rank-{r}.json").read_text())) for r in (0, 1)]
    assert json.loads((resumed / "final" / "train_config.json").read_text())["data_lanes"] == 8
    # Lane l owns the shards s with s % 8 == l; rank 0 reads lanes 0-3, rank 1 lanes 4-7.
    assert {s % 8 for s in reads[0]} == {0, 1, 2, 3} and {s % 8 for s in reads[1]} == {4, 5, 6, 7}


def test_rank_count_that_does_not_divide_the_lanes_is_a_one_line_error():
    from xdiff_cli.dfc.distributed import Dist, rank_lanes

    assert rank_lanes(8, Dist(1, 4, 1, "gloo")) == range(2, 4)
    with pytest.raises(XdiffError, match="read in 8 lanes, which 3 ranks cannot share evenly") as info:
        rank_lanes(8, Dist(0, 3, 0, "gloo"))
    assert "divides 8" in str(info.value)
    with pytest.raises(XdiffError, match="read in 1 lane, which 2 ranks"):  # a checkpoint from before lanes
        rank_lanes(1, Dist(0, 2, 0, "gloo"))


def test_planner_points_to_torchrun_when_several_gpus_are_visible(monkeypatch):
    from xdiff_cli.models import planner

    configs = Path(__file__).parent / "data" / "configs"
    footprints = [planner.footprint_from_config(json.loads((configs / f"{n}.json").read_text()), n)
                  for n in ("Llama-3.1-8B-Instruct", "Qwen3-8B")]
    monkeypatch.setattr(planner, "_visible_gpus", lambda: 8)
    plan = planner.plan_memory(footprints, device="cuda", free_bytes=80 * 10**9, native_prequantized=False)
    assert any("torchrun --nproc-per-node 8" in note for note in plan.notes)
    monkeypatch.setattr(planner, "_visible_gpus", lambda: 1)
    plan = planner.plan_memory(footprints, device="cuda", free_bytes=80 * 10**9, native_prequantized=False)
    assert not any("torchrun" in note for note in plan.notes)


def test_cli_merge_of_separately_harvested_parts_equals_single_process(world, monkeypatch):
    """The SLURM-array path: parts harvested without a process group, then `--merge`."""
    from xdiff_cli.cli import app

    home = world["home"]
    monkeypatch.setenv("XDIFF_HOME", str(home))
    dst = _copy_run(home, "sharded", "array")
    for stale in ("manifest.json", "documents.jsonl", "shards"):
        path = dst / "activations" / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = runner.invoke(app, ["harvest", "--merge", "--run", "array"])
    assert result.exit_code == 0, result.output
    assert "merged from 2 parts" in result.output
    a, b = _pairs(_store(world, "single")), _pairs(_store(world, "array"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_split_harvest_is_marked_done_by_the_stage_runner_after_the_merge(world):
    from xdiff_cli.run.runs import load_run

    home = world["home"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDIFF_HOME", str(home))
        sharded, trained = load_run("sharded"), load_run("t2")
    assert sharded.stage_done("pull") and sharded.stage_done("harvest")
    assert sharded.metrics["harvested_tokens"] == _store(world, "sharded").n_tokens
    assert trained.stage_done("train") and 0 < trained.metrics["fve_a"] <= 1
    assert not (home / "runs" / "sharded" / ".lock").read_text()  # rank 0 released the run lock


def test_merged_store_keeps_the_parts_checksums(world, tmp_path):
    from xdiff_cli.integrity import store_problem

    store = tmp_path / "activations"
    shutil.copytree(world["home"] / "runs" / "sharded" / "activations", store)  # copies: the links stay intact
    assert store_problem(store) is None
    shard = store / "shards" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "checksum differs" in store_problem(store)


def test_a_rank_trains_through_the_optimised_sparse_step_with_the_global_cut(monkeypatch, one_torch_thread):
    """A one-rank gloo world: the rank goes through `sparse_forward` with the distributed
    top-k hook, and trains the single-process model."""
    import socket

    import torch.distributed as dist

    from xdiff_cli.dfc import distributed, sparse_step
    from xdiff_cli.dfc.crosscoder import CrosscoderConfig
    from xdiff_cli.dfc.training import InMemorySource, TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(2000, 24, generator=g)) * (torch.rand(2000, 24, generator=g) < 0.25)
    source = InMemorySource(z @ torch.randn(24, 10, generator=g), z @ torch.randn(24, 14, generator=g), shard_size=256)
    cc = CrosscoderConfig(d_a=10, d_b=14, dict_size=48, k=4, exclusive_frac=0.1)
    tc = TrainConfig(steps=20, batch_size=100, lr=3e-3, device="cpu", warmup_steps=3, k_anneal_steps=6,
                     dead_window_tokens=100, buffer_tokens=700)
    alone, steps_with_dead = Trainer(source, cc, tc, torch.device("cpu")), 0
    for _ in range(tc.steps):
        steps_with_dead += bool(alone.dead_mask().any())  # AuxK runs on this step
        alone.train_step()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        calls = []
        real = sparse_step.sparse_forward
        monkeypatch.setattr(sparse_step, "sparse_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
        rank = Trainer(source, cc, tc, torch.device("cpu"))
        distributed.attach(rank, distributed.Dist(0, 1, 0, "gloo"))
        for _ in range(tc.steps):
            rank.train_step()
    finally:
        dist.destroy_process_group()
    assert len(calls) == tc.steps and rank.dist.comm_seconds > 0
    assert steps_with_dead >= 3
    for name, value in alone.model.state_dict().items():
        assert torch.allclose(value, rank.model.state_dict()[name], rtol=1e-5, atol=1e-7), name
