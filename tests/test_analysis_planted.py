"""End to end on tiny real models with planted differences: harvest → train → `xdiff analyze`.

Model B (Qwen3-style) carries one extra embedding direction on every ANIMALS token; both
models carry a (model-specific) direction on every COLORS token. The analysis must surface
the animal concept as a broad B-exclusive feature near the top of the default ranking, and
must not report the colour concept as exclusive (it belongs in the shared block)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.tiny import ANIMALS, COLORS

runner = CliRunner()
pytestmark = pytest.mark.slow

# Chosen after a sweep (dict 128/256, k 8/16, 500-1500 steps, lr 1e-3/2e-3, seeds 0-2): a
# broad animal feature led the B-exclusive ranking in every configuration; colour words
# leaked into exclusive features one to three words at a time, never as the whole concept.
SETTINGS = dict(
    tokens=12_000, context_length=128, harvest_batch_size=16, eval_fraction=0.25, dict_size=128, k=8,
    exclusive_frac=0.1, steps=500, batch_size=256, lr=2e-3, quant="none", device="cpu", seed=0, top_examples=20,
)


def fired_words(feature: dict) -> list[str]:
    return [e["text"][e["start"] : e["end"]].strip().lower() for e in feature["examples"]]


def concept_share(feature: dict, words) -> float:  # noqa: ANN001
    fired = fired_words(feature)
    return sum(w in words for w in fired) / max(1, len(fired))


def distinct(feature: dict, words) -> set[str]:  # noqa: ANN001
    return {w for w in fired_words(feature) if w in words}


@pytest.fixture(scope="module")
def planted_run(tiny_models, tiny_corpus, tmp_path_factory):  # noqa: ANN001
    import os

    from xdiff_cli.harvest import harvest_run
    from xdiff_cli.loading import load_model
    from xdiff_cli.runs import Run
    from xdiff_cli.settings import RunSettings
    from xdiff_cli.training import train_run

    home = tmp_path_factory.mktemp("planted-home")
    old_home = os.environ.get("XDIFF_HOME")
    os.environ["XDIFF_HOME"] = str(home)
    settings = RunSettings(
        model_a=str(tiny_models["llama"]), model_b=str(tiny_models["qwen3"]), corpus=str(tiny_corpus), **SETTINGS
    ).validate()
    run = Run.create(settings, name="planted")
    model_a = load_model(tiny_models["llama"], device="cpu")
    model_b = load_model(tiny_models["qwen3"], device="cpu")
    harvest_run(run, model_a, model_b, progress=False)
    run.mark_stage("harvest", "done")
    train_run(run, progress=False)
    run.mark_stage("train", "done")
    yield home, run
    if old_home is None:
        os.environ.pop("XDIFF_HOME", None)
    else:
        os.environ["XDIFF_HOME"] = old_home


def test_planted_concepts_end_to_end(planted_run, monkeypatch):  # noqa: ANN001
    home, run = planted_run
    monkeypatch.setenv("XDIFF_HOME", str(home))
    result = runner.invoke(app, ["analyze", "--run", run.id])
    assert result.exit_code == 0, result.output
    assert "candidate differences" in result.output
    from xdiff_cli.runs import resolve_run

    assert resolve_run(run.id).stage_done("analyze")

    ranked = json.loads(runner.invoke(app, ["features", "--json", "--run", run.id]).stdout)
    assert [f["rank"] for f in ranked] == list(range(1, len(ranked) + 1))

    # 1. The animal concept: the first-ranked B-exclusive feature fires on several different
    #    animal words (a concept, not one word), and it is in the top 3 of the whole ranking.
    best_b = next(f for f in ranked if f["partition"] == "b")
    assert concept_share(best_b, ANIMALS) >= 0.75, fired_words(best_b)
    assert len(distinct(best_b, ANIMALS)) >= 3, fired_words(best_b)
    assert best_b["rank"] <= 3
    # Taken together, the B-exclusive features cover most of the animal words.
    exclusive = [f for f in ranked if f["partition"] in ("a", "b") and f["n_fires"] > 0]
    animals_covered = set().union(*(distinct(f, ANIMALS) for f in exclusive if f["partition"] == "b"))
    assert len(animals_covered) >= 7, animals_covered

    # 2. The colour concept is not the top finding: no colour feature outranks the animal
    #    feature. (Since the exclusive blocks live (issue 19) an exclusive feature may take
    #    up part of one model's colour direction: the DFC's known false positives, measured
    #    in benchmarks/discovery.py as shFP.)...
    for feature in exclusive:
        if concept_share(feature, COLORS) > 0.5:
            assert feature["rank"] > best_b["rank"]
    # ...while a balanced shared feature does span it.
    shared_colour = [
        f for f in ranked
        if f["partition"] == "shared" and 0.2 < f["rel_norm"] < 0.8 and len(distinct(f, COLORS)) >= len(COLORS) // 2
    ]
    assert shared_colour, "no shared feature covers the colour concept"

    # 3. Idempotent: a second analyse reuses the index.
    from xdiff_cli.analysis import analyze_run

    mtime = run.analysis_path.stat().st_mtime_ns
    assert analyze_run(resolve_run(run.id), progress=False) == run.analysis_path
    assert run.analysis_path.stat().st_mtime_ns == mtime


def test_exclusive_blocks_stay_alive_and_their_dead_share_is_reported(planted_run, monkeypatch):  # noqa: ANN001
    """Issue 19: with the unsquared loss, joint AuxK and balanced init the B-exclusive block
    lives (held-out dead share reported per block) and holds the animal concept."""
    home, run = planted_run
    monkeypatch.setenv("XDIFF_HOME", str(home))
    from xdiff_cli.analysis import analyze_run
    from xdiff_cli.runs import resolve_run

    run = resolve_run(run.id)
    analyze_run(run, progress=False)
    metrics = resolve_run(run.id).record["metrics"]
    for key in ("dead_a", "dead_b", "dead_shared", "eval_dead_a", "eval_dead_b", "eval_dead_shared"):
        assert 0.0 <= metrics[key] <= 1.0, key
    print({k: round(v, 3) for k, v in metrics.items() if "dead" in k})
    assert metrics["dead_b"] <= 0.10 and metrics["dead_a"] <= 0.10  # alive while training
    assert metrics["eval_dead_b"] <= 0.5
    table = runner.invoke(app, ["features", "--run", run.id, "--limit", "3"])
    assert table.exit_code == 0 and "dead: A-only" in table.output.replace("\n", " ")
