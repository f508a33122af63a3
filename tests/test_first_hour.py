"""What a new user hits in the first hour (issue #17): tables at 80 columns, live counts,
search near the firing token, offline plans, progress at 80 columns, doctor, steering a dead
feature, the report, and the CLI conventions."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from analysis_fixtures import make_analysed_run
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.findings.feature_index import FeatureIndex, FeatureIndexWriter

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str, columns: int = 80):  # noqa: ANN201
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns)})


# --- 1. tables keep ids and numbers at 80 columns --------------------------------------------


def test_features_table_at_80_columns_keeps_every_number_and_shrinks_the_example():
    make_analysed_run()
    result = invoke("features", "--limit", "5")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.strip().startswith("id"))
    for column in ("id", "model", "R", "freq", "s_max", "score", "why", "top example"):
        assert column in header
    assert all(len(line) <= 80 for line in lines)
    first = next(line for line in lines if line.strip().startswith("1 "))
    # feature 1 (B-exclusive) fires on a third of the tokens: a percentage, not "3.34e-…"
    assert " B " in first and "33.4%" in first and "1.48" in first and "B-only, 6 words" in first
    assert not re.search(r"\de-\d", result.output) and "★" not in result.output


def test_frequency_is_formatted_for_its_range():
    from xdiff_cli.findings.feature_columns import format_frequency

    assert [format_frequency(f) for f in (0.0, 2.1e-5, 0.0042, 0.334)] == ["0", "<.01%", "0.42%", "33.4%"]


def test_runs_and_presets_tables_never_cut_ids_at_80_columns():
    from xdiff_cli.run.runs import Run
    from xdiff_cli.run.settings import RunSettings

    make_analysed_run("20250101-120000-abcd")
    long_a, long_b = "HuggingFaceTB/SmolLM2-360M-Instruct", "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B"
    Run.create(RunSettings(model_a=long_a, model_b=long_b), name="20250101-130000-long")
    runs = invoke("runs")
    assert runs.exit_code == 0 and "20250101-120000-abcd" in runs.output
    assert long_a in runs.output and long_b in runs.output  # whole, on one line each
    presets = invoke("presets")
    assert presets.exit_code == 0
    for name in ("gptoss-r1qwen3", "llama3-qwen3", "small", "tiny"):
        assert name in presets.output
    from xdiff_cli.run.presets import list_presets

    for preset in list_presets():  # model ids whole on one line, not folded mid-id
        assert preset.model_a in presets.output and preset.model_b in presets.output


# --- 3. live counts and a why column ------------------------------------------------------------


def test_features_says_how_many_features_of_each_block_are_live():
    run = make_analysed_run()
    index = FeatureIndex.open(run.analysis_path)
    try:
        counts = index.block_counts()
        dead_shared = sum(1 for f in index.features(partition="shared") if not f.alive)
    finally:
        index.close()
    assert counts["shared"]["live"] == counts["shared"]["total"] - dead_shared and dead_shared > 0
    result = invoke("features", "--limit", "3")
    assert (f"shared {counts['shared']['live']} of {counts['shared']['total']}") in result.output


def test_why_column_explains_the_rank():
    from xdiff_cli.findings.feature_columns import why

    run = make_analysed_run()
    index = FeatureIndex.open(run.analysis_path)
    try:
        reasons = {f.id: why(f) for f in index.features()}
        dead = [f.id for f in index.features() if not f.alive]
        artifact = [f.id for f in index.features() if f.token_artifact]
    finally:
        index.close()
    assert reasons[1] == "B-only, 6 words"
    assert all(reasons[i] == "dead: never fires" for i in dead)
    assert all(reasons[i].startswith("artifact") for i in artifact)


# --- 4. search matches the firing token, the count is not the limit -----------------------------


def _index_with_two_whales(path: Path) -> FeatureIndex:
    """Feature 0 fires on 'whale'; feature 1 fires on 'dog' with 'whale' far away in the window."""
    base = {"frequency": 0.1, "n_fires": 5, "mean_activation": 1.0, "max_activation": 2.0, "dec_norm_a": 1.0,
            "dec_norm_b": 0.0, "rel_norm": 1.0, "n_distinct_tokens": 1, "top_token": "x", "top_token_share": 1.0,
            "token_artifact": 0, "candidate": 1, "score": 1.0, "partition": "a"}
    near = "we saw a whale near the boat"
    far = "a whale was spotted in the bay long ago, and much later that day the dog barked"
    with FeatureIndexWriter(path) as writer:
        writer.add_features([{**base, "id": 0, "rank": 1}, {**base, "id": 1, "rank": 2}])
        writer.add_examples([
            {"feature_id": 0, "view": "a", "rank": 0, "text": near, "start": near.index("whale"),
             "end": near.index("whale") + 5, "activation": 2.0, "token_acts": []},
            {"feature_id": 1, "view": "a", "rank": 0, "text": far, "start": far.index("dog"),
             "end": far.index("dog") + 3, "activation": 2.0, "token_acts": []},
        ])
    return FeatureIndex.open(path)


def test_search_matches_at_the_firing_token_not_anywhere_in_the_window(tmp_path):
    index = _index_with_two_whales(tmp_path / "analysis.sqlite")
    try:
        assert [f.id for f in index.features(search="whale")] == [0]
        assert [f.id for f in index.features(search="dog")] == [1]
        assert [f.id for f in index.features(search="that day")] == [1]  # words right before the token
        assert index.count_matching(search="whale") == 1
    finally:
        index.close()


def test_search_count_is_separate_from_the_display_limit():
    make_analysed_run()
    everything = json.loads(invoke("features", "--json", "--search", "cat").stdout)
    assert len(everything) > 1
    result = invoke("features", "--search", "cat", "--limit", "1")
    assert result.exit_code == 0, result.output
    assert f"1 of {len(everything)} features matching 'cat'" in result.output


# --- 6. plans for preset pairs work offline -----------------------------------------------------


def test_plan_for_a_preset_pair_answers_offline():
    result = invoke("plan", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B", "--gpu-memory", "24", columns=120)
    assert result.exit_code == 0, result.output
    assert "config facts xdiff ships" in result.output
    assert "8.03B" in result.output and "8.19B" in result.output and "fits" in result.output


def test_dry_run_of_the_paper_pair_on_cpu_warns_it_is_not_feasible_with_an_estimate(monkeypatch):
    from xdiff_cli.run import hardware

    monkeypatch.setattr(hardware, "detect_hardware", lambda: hardware.Hardware("cpu", 2))
    result = invoke("run", "--preset", "llama3-qwen3", "--dry-run", columns=200)
    assert result.exit_code == 0, result.output
    assert "d=4096, 32 layers" in result.output and "d=4096, 36 layers" in result.output
    assert "100,000,000 token pairs of this pair is not feasible here" in result.output
    assert "days" in result.output


def test_unknown_models_still_need_the_hub_for_a_plan():
    result = invoke("plan", "someone/unknown-model", "Qwen/Qwen3-8B")
    assert result.exit_code == 1


def test_shipped_facts_of_a_mixture_of_experts_count_every_expert_and_run_the_routed_ones():
    """gpt-oss-20b (MXFP4 experts): 20.9B parameters in all, 3.6B active per token (its model
    card); the harvest's forward runs the 4 routed experts of 32 in every layer."""
    from xdiff_cli.models.pull import config_facts
    from xdiff_cli.run.presets import shipped_config_dir

    spec = "openai/gpt-oss-20b"
    facts = config_facts(spec, shipped_config_dir(spec))
    assert facts.d_model == 2880 and facts.n_layers == 24
    assert 20.5e9 < facts.n_params < 21.5e9
    unembedding = 201088 * 2880
    assert 3.5e9 < facts.linear_params + unembedding < 3.7e9  # active per token
    assert facts.harvest_flops_per_token(23) == pytest.approx(2 * facts.linear_params)


# --- 7. progress bars keep the numbers at 80 columns --------------------------------------------


@pytest.mark.parametrize("width", [80, 60])
def test_progress_keeps_count_and_eta_on_a_narrow_terminal(width):
    from rich.console import Console

    from xdiff_cli.console import stage_progress

    console = Console(width=width, file=io.StringIO(), force_terminal=False)
    progress = stage_progress("tok", show_fields="loss {task.fields[loss]:.3f}", console=console)
    task = progress.add_task("train", total=20000, loss=0.5)
    progress.update(task, completed=1234)
    console.print(progress.make_tasks_table(progress.tasks))
    line = console.file.getvalue().rstrip("\n")
    assert "1234/20000" in line and "ETA" in line and "loss 0.500" in line and "…" not in line
    assert len(line) <= width


def test_progress_without_a_terminal_prints_plain_status_lines(monkeypatch):
    """A log file sees a long stage move: a plain line per unfinished task, now and then."""
    from rich.console import Console

    from xdiff_cli import console as console_module

    monkeypatch.setattr(console_module, "PLAIN_LOG_SECONDS", 0.0)
    console = Console(width=200, file=io.StringIO(), force_terminal=False)
    with console_module.stage_progress("tok", console=console) as progress:
        task = progress.add_task("harvest", total=20000)
        progress.advance(task, 1234)
        progress.update(task, completed=20000)  # finished: no line for it
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("harvest: 1,234/20,000 (6%) ") and "tok/s" in lines[0]
    assert sum(line.startswith("harvest: ") for line in lines) == 1


# --- 8. doctor streams, probes the hub; --help is light -----------------------------------------


def test_doctor_yields_the_cheap_checks_before_the_hub_and_4bit_checks(monkeypatch):
    from xdiff_cli import doctor

    names = [c.name for c in doctor.iter_checks()]
    assert names.index("python") < names.index("hub") < names.index("4-bit quantisation")
    assert names.index("data dir") < names.index("hub")


def test_doctor_4bit_check_keeps_bitsandbytes_import_warnings_out_of_its_list(monkeypatch, caplog):
    import logging

    from xdiff_cli import doctor

    def noisy():  # what importing bitsandbytes does on a CPU without the optional kernels
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        return doctor.Check("4-bit quantisation", True, "nf4 works on cpu", False)

    monkeypatch.setattr(doctor, "_quantize_small_layer", noisy)
    with caplog.at_level(logging.WARNING):
        check = doctor.quantization_check()
    assert check.ok and not caplog.records
    assert logging.getLogger("bitsandbytes").level == logging.NOTSET  # restored


def test_hub_check_reaches_a_live_endpoint(fake_hub):
    from xdiff_cli.doctor import hub_check

    check = hub_check(timeout=5)
    assert check.ok and "reachable" in check.detail


def test_hub_check_fails_fast_on_an_unreachable_endpoint(monkeypatch):
    import socket
    import time

    from xdiff_cli.doctor import hub_check

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    start = time.monotonic()
    check = hub_check(timeout=1)
    assert not check.ok and "unreachable" in check.detail
    assert time.monotonic() - start < 5


def test_help_imports_no_heavy_module():
    code = (
        "import sys, runpy; sys.argv = ['xdiff', '--help']\n"
        "try:\n    runpy.run_module('xdiff_cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'textual', 'rich.markdown', 'pygments') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


# --- 11. steering a dead feature is refused before any model loads ------------------------------


def test_steer_refuses_a_dead_feature_without_loading_a_model():
    run = make_analysed_run()
    index = FeatureIndex.open(run.analysis_path)
    dead = next(f.id for f in index.features() if not f.alive)
    index.close()
    result = invoke("steer", "--feature", str(dead), "--scale", "4", "hello")
    assert result.exit_code == 1
    assert "never fired" in result.output and "xdiff features --partition" in result.output


# --- 13. the report -----------------------------------------------------------------------------


def test_report_goes_to_the_current_directory_readable_by_all(tmp_path, monkeypatch):
    make_analysed_run()
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        result = invoke("report")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    path = tmp_path / "xdiff-report-fake-run.html"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_report_opens_with_a_summary_and_names_its_metrics(tmp_path):
    make_analysed_run()
    out = tmp_path / "r.md"
    assert invoke("report", "--format", "md", "--out", str(out)).exit_code == 0
    text = out.read_text()
    summary = text.split("## Summary")[1].split("## Models")[0]
    assert "Model A is org/model-a" in summary and "Found:" in summary and "How sure:" in summary
    assert "B-exclusive features fire" in summary
    metrics = text.split("## Reconstruction and dictionary metrics")[1].split("##")[0]
    for raw in ("fve_a", "eval_dead_fraction", "mean_l0", "eval_l0"):
        assert raw not in metrics.replace("\\_", "_")
    assert "variance explained in model A" in metrics and "live B-exclusive features" in metrics


# --- 14. conventions -------------------------------------------------------------------------


def test_partition_is_case_insensitive_and_sort_takes_the_column_names():
    make_analysed_run()
    upper = json.loads(invoke("features", "--json", "--partition", "B").stdout)
    assert [f["partition"] for f in upper] == ["b"]
    freq = json.loads(invoke("features", "--json", "--sort", "freq").stdout)
    assert [f["frequency"] for f in freq] == sorted((f["frequency"] for f in freq), reverse=True)
    s_max = json.loads(invoke("features", "--json", "--sort", "s_max").stdout)
    assert [f["max_activation"] for f in s_max] == sorted((f["max_activation"] for f in s_max), reverse=True)


@pytest.mark.parametrize("args", [["--partition", "x"], ["--sort", "loudness"]])
def test_bad_option_values_are_usage_errors_with_exit_2(args):
    make_analysed_run()
    result = runner.invoke(app, ["features", *args])
    assert result.exit_code == 2
    assert "Usage:" in result.output


def test_debug_works_after_the_subcommand(monkeypatch):
    from xdiff_cli import cli

    monkeypatch.setattr(cli._State, "debug", False)
    assert cli._take_debug_flag(["features", "--debug", "--run", "x"]) == ["features", "--run", "x"]
    assert cli._State.debug
    monkeypatch.setattr(cli._State, "debug", False)
    assert cli._take_debug_flag(["steer", "-f", "1", "--", "--debug"]) == ["steer", "-f", "1", "--", "--debug"]
    assert not cli._State.debug
    done = subprocess.run([sys.executable, "-m", "xdiff_cli", "features", "--run", "nope", "--debug"],
                          capture_output=True, text=True, env={**os.environ, "XDIFF_HOME": str(REPO / "no-such")})
    assert done.returncode == 1 and "Traceback" in done.stderr and "XdiffError" in done.stderr


def test_help_shows_no_bool_placeholder_and_keeps_sentences_whole():
    result = invoke("run", "--help", columns=80)
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    flat = " ".join(result.output.split())
    assert "resumes the newest run with identical settings where it stopped (Ctrl-C is safe)" in flat
    assert not any(line.rstrip().endswith("where it") for line in result.output.splitlines())


def test_json_contract_is_documented_in_the_repository():
    doc = (REPO / "docs" / "JSON.md").read_text()
    for field in ("`id`", "`partition`", "`frequency`", "`max_activation`", "`examples`", "usage error"):
        assert field in doc
    readme = (REPO / "README.md").read_text()
    assert "docs/JSON.md" in readme and "DESIGN.md" not in readme


# --- 12. examples from below the top ------------------------------------------------------------


def test_weaker_firings_are_sampled_per_activation_band():
    from analysis_fixtures import ANIMALS, FakeStore, hand_built_crosscoder

    from xdiff_cli.findings.quantile_examples import quantile_examples

    run = make_analysed_run()
    index = FeatureIndex.open(run.analysis_path)
    feature = index.feature(1)  # B-exclusive: animal words
    index.close()
    store = FakeStore()
    bands = quantile_examples(hand_built_crosscoder(), store, store, 1, feature.max_activation, per_band=3)
    assert [(b.low, b.high) for b in bands] == [(0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]
    assert sum(b.n_fires for b in bands) <= feature.n_fires and bands[0].n_fires > 3
    for band in bands:
        assert len(band.examples) == min(3, band.n_fires)
        for example in band.examples:
            assert band.low * feature.max_activation <= example.activation < band.high * feature.max_activation
            assert example.text[example.start : example.end] in ANIMALS and example.view == "b"
    again = quantile_examples(hand_built_crosscoder(), store, store, 1, feature.max_activation, per_band=3)
    assert [e.text for b in again for e in b.examples] == [e.text for b in bands for e in b.examples]  # seeded


def test_run_summary_shows_live_counts_per_block(capsys):
    from xdiff_cli.commands.run import print_summary
    from xdiff_cli.run.pipeline import summarize

    run = make_analysed_run()
    print_summary(summarize(run))
    out = capsys.readouterr().out
    assert "live features: A-only 1 of 1 · B-only 1 of 1 · shared" in out
