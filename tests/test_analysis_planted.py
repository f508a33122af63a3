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
from xdiff_cli.models.tiny import ANIMALS, COLORS

runner = CliRunner()
pytestmark = pytest.mark.slow

# Settings: conftest.PLANTED_SETTINGS, chosen after a sweep (dict 128/256, k 8/16, 500-1500
# steps, lr 1e-3/2e-3, seeds 0-2): a broad animal feature led the B-exclusive ranking in every
# configuration; colour words leaked into exclusive features one to three words at a time,
# never as the whole concept.


def fired_words(feature: dict) -> list[str]:
    return [e["text"][e["start"] : e["end"]].strip().lower() for e in feature["examples"]]


def concept_share(feature: dict, words) -> float:  # noqa: ANN001
    fired = fired_words(feature)
    return sum(w in words for w in fired) / max(1, len(fired))


def distinct(feature: dict, words) -> set[str]:  # noqa: ANN001
    return {w for w in fired_words(feature) if w in words}


def test_planted_concepts_end_to_end(analysed_tiny_run, monkeypatch):  # noqa: ANN001
    home, run_id = analysed_tiny_run
    monkeypatch.setenv("XDIFF_HOME", str(home))
    from xdiff_cli.run.runs import load_run

    run = load_run(run_id)
    # Made by `xdiff harvest`, `xdiff train`, `xdiff analyze` alone: the run is complete.
    assert run.complete
    runs = json.loads(runner.invoke(app, ["runs", "--json"]).stdout)
    assert [(r["id"], r["stage"], r["complete"]) for r in runs] == [(run_id, "done", True)]
    result = runner.invoke(app, ["analyze", "--run", run.id])
    assert result.exit_code == 0, result.output
    assert "candidate differences" in result.output

    ranked = json.loads(runner.invoke(app, ["features", "--json", "--run", run.id]).stdout)
    assert [f["rank"] for f in ranked] == list(range(1, len(ranked) + 1))

    # 1. The animal concept: the first-ranked B-exclusive feature fires on several different
    #    animal words (a concept, not one word), and it is in the top 3 of the whole ranking.
    #    (>= 60% of its examples: benchmarks/discovery.py's "matches a concept" share; with live
    #    exclusive blocks the first feature also takes a word or two of B's own, e.g. a name.)
    best_b = next(f for f in ranked if f["partition"] == "b")
    assert concept_share(best_b, ANIMALS) >= 0.6, fired_words(best_b)
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
    from xdiff_cli.findings.analysis import analyze_run

    mtime = run.analysis_path.stat().st_mtime_ns
    assert analyze_run(load_run(run.id), progress=False) == run.analysis_path
    assert run.analysis_path.stat().st_mtime_ns == mtime


def test_exclusive_blocks_stay_alive_and_their_dead_share_is_reported(analysed_tiny_run, monkeypatch):  # noqa: ANN001
    """Issue 19: with the unsquared loss, joint AuxK and balanced init the exclusive blocks
    live, and the dead share of each block is reported (run metrics and `xdiff features`)."""
    home, run_id = analysed_tiny_run
    monkeypatch.setenv("XDIFF_HOME", str(home))
    from xdiff_cli.run.runs import load_run

    metrics = load_run(run_id).metrics
    for key in ("dead_a", "dead_b", "dead_shared", "eval_dead_a", "eval_dead_b", "eval_dead_shared"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["dead_b"] <= 0.10 and metrics["dead_a"] <= 0.10  # alive while training
    assert metrics["eval_dead_b"] <= 0.5
    table = runner.invoke(app, ["features", "--run", run_id, "--limit", "3"])
    assert table.exit_code == 0 and "dead: A-only" in " ".join(table.output.split())


def test_stored_per_token_activations_match_a_recomputation_over_the_context(analysed_tiny_run, monkeypatch):  # noqa: ANN001
    """Every token of a top example's context carries the feature's activation there (for
    Neuronpedia-style shading): recompute it with the trained crosscoder from the store."""
    import torch

    from xdiff_cli.data.store import ActivationStore
    from xdiff_cli.dfc.crosscoder import Crosscoder
    from xdiff_cli.findings.feature_index import FeatureIndex
    from xdiff_cli.run.runs import load_run

    home, run_id = analysed_tiny_run
    monkeypatch.setenv("XDIFF_HOME", str(home))
    run = load_run(run_id)
    index = FeatureIndex.open(run.analysis_path)
    # The strongest example of the first live feature whose context has co-firing tokens
    # (else the first live feature's): a real check of the whole window.
    live = index.features(alive_only=True, limit=40)
    examples = [index.examples(f.id, view=f.own_view, limit=1)[0] for f in live]
    pick = next((i for i, e in enumerate(examples) if sum(a > 0 for _, _, a in e.token_acts) > 1), 0)
    feature, example = live[pick], examples[pick]
    assert len(example.token_acts) > 1  # the whole window, not only the firing token

    crosscoder = Crosscoder.load(run.crosscoder_dir / "final")
    store = ActivationStore.open(run.store_dir)
    split = store.split("eval")
    doc = store.document_text(example.doc_id)
    wanted = {(s, e) for s, e, _ in example.token_acts}
    for i in range(split.num_shards):
        shard = split.load_shard(i)
        rows = (shard.doc_id == example.doc_id).nonzero().flatten().tolist()
        starts = (shard.start_b if example.view == "b" else shard.start_a).tolist()
        ends = shard.end.tolist()
        for r in rows:
            lo = ends[r] - example.end
            if starts[r] - lo == example.start and doc[lo : lo + len(example.text)] == example.text:
                window = [q for q in rows if (starts[q] - lo, ends[q] - lo) in wanted]
                break
        else:
            continue
        break
    assert len(window) == len(example.token_acts)
    with torch.no_grad():
        acts = crosscoder.encode(*crosscoder.normalise(shard.acts_a[window], shard.acts_b[window]))[:, feature.id]
    stored = [a for _, _, a in sorted(example.token_acts)]
    assert stored == pytest.approx(acts.tolist(), abs=2e-3, rel=2e-3)
    firing = {(s, e): a for s, e, a in example.token_acts}[(example.start, example.end)]
    assert firing == pytest.approx(example.activation, rel=1e-3)
    index.close()
