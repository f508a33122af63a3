"""Fault injection: kill points, corrupt files and full disks end in a resumed or redone
stage, or in one line of error — never a traceback, never a damaged artifact trusted.

Fast by design: the fabricated activation store of test_training (no model runs), the
analysed fake run of analysis_fixtures, 24-step trainings on 24-wide activations. The real
kill (SIGKILL inside a checkpoint write) and the real full disk (RLIMIT_FSIZE → EFBIG) run
once each, in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_training import CC, _harvested_run, _source, _tc
from typer.testing import CliRunner

from xdiff_cli import atomic
from xdiff_cli.cli import app
from xdiff_cli.data.store import ActivationStore, Shard, StoreWriter
from xdiff_cli.dfc.crosscoder import Crosscoder
from xdiff_cli.dfc.training import checkpoint_dirs, train, train_run
from xdiff_cli.errors import XdiffError
from xdiff_cli.integrity import (
    analysis_problem,
    crosscoder_problem,
    safetensors_problem,
    stage_problem,
    store_problem,
)
from xdiff_cli.run import stages

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN_SETTINGS = dict(dict_size=48, k=4, steps=20, batch_size=100, lr=3e-3, device="cpu")


def truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(int(size * keep))


def flip_byte(path: Path, offset_fraction: float = 0.7) -> None:
    """Same size, one byte different: only the recorded checksum can tell."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line_error(result) -> str:  # noqa: ANN001 - click Result
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# --- checksums recorded at write time ---------------------------------------------------------


def test_every_atomic_write_records_size_and_checksum(tmp_path):
    target = tmp_path / "artifact.bin"
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 1000)
    sums = json.loads((tmp_path / atomic.SUMS_FILE).read_text())
    assert sums["artifact.bin"]["size"] == 1000 and len(sums["artifact.bin"]["crc32"]) == 8
    assert atomic.recorded_mismatch(target) is None
    flip_byte(target)
    assert "checksum" in atomic.recorded_mismatch(target)
    truncate(target)
    assert "500 bytes, 1,000 were written" == atomic.recorded_mismatch(target)


# --- activation store ---------------------------------------------------------------------------


def test_a_sound_store_passes_and_each_kind_of_damage_is_named():
    run = _harvested_run(**RUN_SETTINGS)
    assert store_problem(run.store_dir) is None
    shard = run.store_dir / "shards" / "shard-00001.safetensors"
    original = shard.read_bytes()
    truncate(shard, 0.9)
    assert "shard-00001.safetensors is truncated" in store_problem(run.store_dir)
    shard.write_bytes(original)
    flip_byte(shard, 0.95)  # inside the tensor data: header and size still fine
    assert "checksum" in store_problem(run.store_dir)
    shard.write_bytes(original)
    truncate(run.store_dir / "documents.jsonl", 0.8)
    assert "documents.jsonl is" in store_problem(run.store_dir)


def test_truncated_documents_are_an_error_not_blank_examples():
    run = _harvested_run(**RUN_SETTINGS)
    truncate(run.store_dir / "documents.jsonl", 0.6)
    store = ActivationStore.open(run.store_dir)
    with pytest.raises(XdiffError, match="documents.jsonl is damaged|missing from"):
        [store.document_text(i) for i in range(4)]


def test_manifest_without_shards_is_one_line_from_the_cli():
    run = _harvested_run(**RUN_SETTINGS)
    manifest = json.loads((run.store_dir / "manifest.json").read_text())
    del manifest["shards"]
    (run.store_dir / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(runner.invoke(app, ["train", "--run", run.id, "-q"]))
    assert "no complete activation store" in line or "no 'shards' list" in line
    with pytest.raises(XdiffError, match="no 'shards' list"):
        ActivationStore.open(run.store_dir)


def test_nan_in_a_shard_is_refused_when_it_is_loaded(tmp_path):
    writer = StoreWriter.open_or_create(tmp_path / "store", {"model_a": "a", "model_b": "b", "d_a": 2, "d_b": 2})
    acts = torch.ones(4, 2, dtype=torch.bfloat16)
    bad = acts.clone()
    bad[2, 1] = float("nan")
    span = torch.arange(4)
    for a in (acts, bad):
        shard = Shard(a.clone(), acts.clone(), torch.zeros(4, dtype=torch.long), span.clone(), span.clone(), span + 1)
        writer.write_shard(shard, [(0, "abcde")], 1, {})
    writer.finish(scale_a=1.0, scale_b=1.0, aligned_fraction=1.0, eval_fraction=0.5)
    store = ActivationStore.open(tmp_path / "store")
    store.load_shard(0)
    with pytest.raises(XdiffError, match="1 token.* of acts_a .* NaN or infinite"):
        store.load_shard(1)


def test_resuming_a_store_drops_unlisted_shards_and_temporaries_but_keeps_checksums(tmp_path):
    identity = {"model_a": "a", "model_b": "b", "d_a": 2, "d_b": 2}
    writer = StoreWriter.open_or_create(tmp_path, identity)
    span = torch.arange(3)
    shard = Shard(torch.ones(3, 2), torch.ones(3, 2), torch.zeros(3, dtype=torch.long), span, span.clone(), span + 1)
    writer.write_shard(shard, [(0, "abcd")], 1, {})
    shards = tmp_path / "shards"
    (shards / "shard-00001.safetensors").write_bytes(b"half a shard")  # killed after the rename
    (shards / ".shard-00002.safetensors.k3j.tmp").write_bytes(b"half a temp")  # killed mid-write
    with (tmp_path / "documents.jsonl").open("a") as fh:
        fh.write('{"doc_id": 1, "te')  # killed mid-append
    StoreWriter.open_or_create(tmp_path, identity)
    assert sorted(p.name for p in shards.iterdir()) == [atomic.SUMS_FILE, "shard-00000.safetensors"]
    assert atomic.recorded_mismatch(tmp_path / "documents.jsonl") is None
    assert atomic.recorded_mismatch(shards / "shard-00000.safetensors") is None


def test_a_harvest_killed_before_its_first_manifest_starts_over(tmp_path):
    store = tmp_path / "store"
    (store / "shards").mkdir(parents=True)
    (store / "documents.jsonl").touch()
    (store / ".manifest.json.a1b2.tmp").write_text('{"format_ver')
    writer = StoreWriter.open_or_create(store, {"model_a": "a", "model_b": "b"})
    assert writer.manifest["shards"] == [] and not (store / ".manifest.json.a1b2.tmp").exists()
    (store / "notes.txt").write_text("someone else's file")
    (store / "manifest.json").unlink()
    with pytest.raises(XdiffError, match="holds no activation store manifest"):
        StoreWriter.open_or_create(store, {"model_a": "a", "model_b": "b"})


# --- training: final model and checkpoints ----------------------------------------------------


def test_truncated_final_model_is_finished_again_from_the_last_checkpoint(capsys):
    run = _harvested_run(**RUN_SETTINGS)
    train_run(run, progress=False)
    final = run.crosscoder_dir / "final"
    good = Crosscoder.load(final).state_dict()
    truncate(final / "model.safetensors")
    assert "model.safetensors is" in crosscoder_problem(final)
    train_run(run, progress=False)
    assert "damaged" in capsys.readouterr().err
    assert crosscoder_problem(final) is None
    again = Crosscoder.load(final).state_dict()
    assert all(torch.equal(good[k], again[k]) for k in good)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, capsys):
    source = _source()
    straight = train(source, CC, _tc(), tmp_path / "straight", progress=False)
    out = tmp_path / "damaged"
    train(source, CC, _tc(), out, progress=False)
    newest = checkpoint_dirs(out)[-1]
    truncate(newest / "trainer.safetensors")
    import shutil

    shutil.rmtree(out / "final")
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 28, "lo')  # a log line cut short by the kill
    result = train(source, CC, _tc(), out, progress=False)
    err = capsys.readouterr().err
    assert f"checkpoint {newest.name} is damaged" in err and "resuming from the earlier checkpoint step-0000016" in err
    assert result.resumed_from == 16
    want, got = Crosscoder.load(straight.final_dir).state_dict(), Crosscoder.load(result.final_dir).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]


def test_no_usable_checkpoint_restarts_training_and_says_so(tmp_path, capsys):
    source = _source()
    out = tmp_path / "run"
    train(source, CC, _tc(steps=16), out, progress=False)
    for directory in checkpoint_dirs(out):
        (directory / "state.json").write_text("{not json")
    import shutil

    shutil.rmtree(out / "final")
    result = train(source, CC, _tc(steps=16), out, progress=False)
    err = capsys.readouterr().err
    assert "state.json is unreadable" in err and "restarts from step 0" in err
    assert result.resumed_from is None and result.steps == 16


def test_killed_inside_a_checkpoint_write_resumes_to_the_same_model(tmp_path):
    """A real SIGKILL while the second checkpoint's trainer state is half written."""
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import safetensors.torch as st
        import torch
        torch.set_num_threads(1)  # the same reduction order as the in-process runs it is compared with
        from test_training import CC, _source, _tc
        from xdiff_cli.dfc.training import train
        real = st.save_file
        calls = []
        def save_then_die(tensors, path, *a, **k):
            calls.append(path)
            real(tensors, path, *a, **k)
            if len(calls) == 4:  # checkpoint 2: model, then trainer state — die mid-write
                with open(path, "r+b") as fh:
                    fh.truncate(100)
                os.kill(os.getpid(), signal.SIGKILL)
        st.save_file = save_then_die
        train(_source(), CC, _tc(), {str(out)!r}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in checkpoint_dirs(out)] == ["step-0000008"]
    leftovers = [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the kill left a half-written checkpoint folder
    result = train(_source(), CC, _tc(), out, progress=False)
    assert result.resumed_from == 8
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    straight = train(_source(), CC, _tc(), tmp_path / "straight", progress=False)
    want, got = Crosscoder.load(straight.final_dir).state_dict(), Crosscoder.load(result.final_dir).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


# --- a done stage is verified before it is trusted ------------------------------------------------


def test_xdiff_run_redoes_a_done_stage_whose_output_was_damaged(monkeypatch, capsys):
    run = _harvested_run(**RUN_SETTINGS)
    train_run(run, progress=False)
    for stage in ("pull", "harvest", "train"):
        run.mark_stage(stage, "done")
    truncate(run.crosscoder_dir / "final" / "model.safetensors")
    ran = []
    monkeypatch.setattr("xdiff_cli.dfc.training.train_stage", lambda r, ctx: ran.append("train") or train_run(r, False))
    monkeypatch.setattr("xdiff_cli.findings.analysis.analyze_stage", lambda r, ctx: ran.append("analyze"))
    monkeypatch.setattr("xdiff_cli.findings.verify.verify_stage", lambda r, ctx: ran.append("verify"))
    assert stage_problem(run, "train") is not None
    stages.run_stages(run, stages.StageContext(progress=False))
    assert ran == ["train", "analyze", "verify"]
    assert "the train output of run" in capsys.readouterr().err
    assert stage_problem(run, "train") is None and run.stage_done("train")
    assert [p.name for p in checkpoint_dirs(run.crosscoder_dir)]  # kept: training resumed, not redone


# --- analysis.sqlite -------------------------------------------------------------------------------


def corrupt_middle_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    n_pages = len(data) // page
    for p in range(n_pages // 2, n_pages - 1):
        data[p * page : (p + 1) * page] = bytes([0xA5]) * page
    path.write_bytes(bytes(data))


def test_sqlite_with_corrupt_middle_pages_is_not_called_complete_and_cli_says_one_line():
    from analysis_fixtures import make_analysed_run

    from xdiff_cli.findings.analysis import analysis_is_valid

    run = make_analysed_run()
    assert analysis_problem(run.analysis_path) is None
    corrupt_middle_pages(run.analysis_path)
    assert "corrupt" in analysis_problem(run.analysis_path)
    assert not analysis_is_valid(run.analysis_path)
    line = one_line_error(runner.invoke(app, ["features", "--json"]))
    assert "analysis database" in line and "corrupt" in line


async def test_browse_on_a_corrupt_database_exits_non_zero_without_a_traceback():
    from tui_fixtures import make_analysed_run

    from xdiff_cli.tui.app import XdiffApp

    run = make_analysed_run()
    corrupt_middle_pages(run.analysis_path)
    app = XdiffApp()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        # The shared features' examples sit on the damaged pages ("3" on the keyboard).
        app.call_later(app.screen.action_partition, "shared")
        for _ in range(50):
            if app.return_code is not None:
                break
            await asyncio.sleep(0.1)
    assert app.return_code == 1
    assert isinstance(app.user_error, XdiffError) and "corrupt" in app.user_error.message


# --- temporaries left behind ----------------------------------------------------------------------


def test_temporaries_of_killed_writes_are_removed_on_the_next_run_of_their_stage():
    run = _harvested_run(**RUN_SETTINGS)
    train_run(run, progress=False)
    leftovers = [
        run.crosscoder_dir / "final" / ".model.safetensors.x1y2.tmp",
        run.crosscoder_dir / "checkpoints" / ".step-0000030.tmp" / "trainer.safetensors",
        run.dir / ".analysis.sqlite.4242.tmp",
        run.dir / ".analysis.sqlite.4242.tmp-journal",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    (run.crosscoder_dir / "final" / "model.safetensors").unlink()  # so the stage runs
    train_run(run, progress=False)
    assert not leftovers[0].exists() and not leftovers[1].parent.exists()
    assert atomic.clean_temp_files(run.dir, recursive=False) == [leftovers[2], leftovers[3]] or not leftovers[2].exists()
    assert not leftovers[2].exists() and not leftovers[3].exists()


# --- full disk --------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", ["No space left on device (os error 28)", "File too large (os error 27)"])
def test_safetensors_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, message):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: IoError({message})")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    model = Crosscoder(CC)
    with pytest.raises(XdiffError, match="is full"):
        model.save(tmp_path / "final")
    assert list((tmp_path / "final").iterdir()) == []


def test_a_real_file_size_limit_during_a_shard_write_is_the_disk_full_error(tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the write with EFBIG, as a full quota would."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from xdiff_cli.errors import XdiffError
        from xdiff_cli.data.store import Shard, StoreWriter
        writer = StoreWriter.open_or_create({str(tmp_path / "store")!r}, {{"model_a": "a", "model_b": "b"}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        n = 20_000
        span = torch.arange(n)
        shard = Shard(torch.ones(n, 8), torch.ones(n, 8), torch.zeros(n, dtype=torch.long), span, span.clone(), span + 1)
        try:
            writer.write_shard(shard, [(0, "x")], 1, {{}})
        except XdiffError as exc:
            print("ERROR", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ERROR the disk holding") and "is full" in proc.stdout
    assert [p.name for p in (tmp_path / "store" / "shards").iterdir()] == []


# --- one-line errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "   \n\t\n  \n"])
def test_empty_or_whitespace_corpus_is_one_line(tmp_path, content):
    from xdiff_cli.data.corpus import check_corpus

    corpus = tmp_path / "empty.txt"
    corpus.write_text(content)
    with pytest.raises(XdiffError, match="has no documents"):
        check_corpus(str(corpus))


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_steer_rejects_a_non_finite_scale(scale):
    line = one_line_error(runner.invoke(app, ["steer", "hi", "--feature", "1", "--scale", scale]))
    assert "finite number" in line
    line = one_line_error(runner.invoke(app, ["steer", "hi", "--feature", f"1:{scale}"]))
    assert "finite number" in line


def test_small_disk_sizes_are_not_printed_as_zero_gigabytes(tmp_path, monkeypatch):
    import shutil

    from xdiff_cli import paths
    from xdiff_cli.run.formatting import format_bytes

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=512))
    with pytest.raises(XdiffError) as info:
        paths.check_free_space(tmp_path, 4_100, "the activation store")
    assert "needs ~4.1 KB" in info.value.message and "512 B free" in info.value.message
    assert format_bytes(1.3e9) == "1.3 GB"


def test_custom_code_error_names_the_repo_not_the_snapshot(tmp_path):
    from xdiff_cli.models.loading import inspect_model_dir

    snapshot = tmp_path / "models--acme--odd-lm" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "odd", "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    with pytest.raises(XdiffError, match="^acme/odd-lm needs custom code"):
        inspect_model_dir(snapshot)


def test_safetensors_header_check_catches_a_cut_file(tmp_path):
    model = Crosscoder(CC)
    model.save(tmp_path)
    assert safetensors_problem(tmp_path / "model.safetensors") is None
    (tmp_path / atomic.SUMS_FILE).unlink()  # no record: the header alone must tell
    truncate(tmp_path / "model.safetensors", 0.99)
    assert "truncated" in safetensors_problem(tmp_path / "model.safetensors")


# --- memory bounded by the harvested window, not the line ----------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny_models):
    from xdiff_cli.models.loading import load_model

    return tuple(load_model(tiny_models[name], device="cpu") for name in ("llama", "gptoss"))


def test_non_finite_activations_stop_the_harvest_with_one_line(tiny_pair, tmp_path, monkeypatch):
    from xdiff_cli.data import harvest as harvest_module

    real = harvest_module.layer_activations

    def overflowing(loaded, sequences, layer):
        hidden = real(loaded, sequences, layer)
        return hidden if loaded is tiny_pair[0] else hidden.masked_fill(torch.rand_like(hidden) < 0.01, float("inf"))

    monkeypatch.setattr(harvest_module, "layer_activations", overflowing)
    with pytest.raises(XdiffError, match="model B produced NaN or infinite activations at layer 2"):
        harvest_module.harvest(*tiny_pair, "builtin:smoke", tmp_path / "store", tokens=300, progress=False)


def test_a_huge_line_is_read_tokenized_and_stored_only_up_to_its_window(tiny_pair, tmp_path):
    from xdiff_cli.data.corpus import iter_documents
    from xdiff_cli.data.harvest import harvest, window_chars

    corpus = tmp_path / "corpus.txt"
    normal = "the blue cat saw a small red box near the river and then the dog ran home\n"
    with corpus.open("w") as fh:
        fh.write(normal * 20)
        fh.write("the tiger ran " * 200_000 + "\n")  # a 2.8 MB line
        fh.write(normal * 40)
    lengths = [len(d.text) for d in iter_documents(str(corpus))]
    assert max(lengths) <= 1_000_000 and len(lengths) == 61  # read bounded, nothing after it lost
    store = harvest(*tiny_pair, str(corpus), tmp_path / "store", tokens=1500, context_length=64, batch_size=8, progress=False)
    texts = [json.loads(line)["text"] for line in (tmp_path / "store" / "documents.jsonl").read_text().splitlines()]
    assert 20 in [json.loads(line)["doc_id"] for line in (tmp_path / "store" / "documents.jsonl").read_text().splitlines()]
    assert max(len(t) for t in texts) <= window_chars(64)
    assert store_problem(store.dir) is None


def test_a_jsonl_record_too_long_to_parse_is_skipped_with_a_note_and_the_rest_is_read(tmp_path, monkeypatch, capsys):
    from xdiff_cli.data import corpus

    monkeypatch.setattr(corpus, "MAX_JSONL_RECORD_CHARS", 64)
    path = tmp_path / "corpus.jsonl"
    records = [{"text": "first short record"}, {"text": "x" * 500}, {"text": "third short record"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [text for text, _ in corpus._read_jsonl(path)]
    assert texts == ["first short record", "third short record"]
    assert f"skipped {path}:2" in capsys.readouterr().err
