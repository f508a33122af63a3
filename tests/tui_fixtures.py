"""A small analysed run for the TUI tests: fixed name, fixed date, fixed features.

Everything here is deterministic (seeded, no clock) so SVG snapshots are stable. The run
has 36 features — ids 0-5 A-exclusive, 6-11 B-exclusive, 12-35 shared — each with
examples whose words carry per-token activations, plus one token-artifact feature and
one dead feature, the cases the TUI must render.
"""

from __future__ import annotations

import random
from pathlib import Path

from xdiff_cli.findings.feature_index import FeatureIndexWriter
from xdiff_cli.run.runs import ModelRecord, Run, StageStatus
from xdiff_cli.run.settings import RunSettings
from xdiff_cli.run.stages import STAGE_NAMES as STAGES

N_EXCLUSIVE = 6
N_FEATURES = 36
ARTIFACT_FEATURE = 14
DEAD_FEATURE = 35
FIXED_CREATED = "2025-01-02T03:04:05+00:00"

# Each feature fires on one concept word; contexts are built around it.
CONCEPTS = [
    "violin", "harbor", "glacier", "lantern", "orchard", "compass",
    "falcon", "meadow", "quartz", "saddle", "tundra", "velvet",
    "anchor", "bakery", "canyon", "dagger", "ember", "fjord",
    "garnet", "hammock", "igloo", "jasmine", "kettle", "lagoon",
    "marble", "nectar", "oasis", "pepper", "quill", "ribbon",
    "summit", "thimble", "umbrella", "vortex", "walnut", "yonder",
]
FILLER = "the a of and to in on with for by at from near under over quietly slowly".split()


def partition_of(feature_id: int) -> str:
    if feature_id < N_EXCLUSIVE:
        return "a"
    if feature_id < 2 * N_EXCLUSIVE:
        return "b"
    return "shared"


def _example(rng: random.Random, word: str, peak: float, view: str) -> dict:
    """A context of ~10 words with `word` in it; words near `word` get some activation too."""
    words = [rng.choice(FILLER) for _ in range(9)]
    at = rng.randrange(3, 8)
    words.insert(at, word)
    text, token_acts, start, end = "", [], 0, 0
    for i, w in enumerate(words):
        if text:
            text += " "
        s = len(text)
        text += w
        distance = abs(i - at)
        act = peak if distance == 0 else (round(peak * 0.3 / distance, 3) if distance <= 2 else 0.0)
        token_acts.append((s, len(text), act))
        if distance == 0:
            start, end = s, len(text)
    return {"view": view, "text": text, "start": start, "end": end, "activation": peak, "token_acts": token_acts}


def _feature_row(feature_id: int, rng: random.Random) -> dict:
    partition = partition_of(feature_id)
    dead = feature_id == DEAD_FEATURE
    max_act = 0.0 if dead else round(2.0 + 8.0 * rng.random(), 3)
    if partition == "a":
        norm_a, norm_b = round(0.8 + 0.4 * rng.random(), 3), 0.0
    elif partition == "b":
        norm_a, norm_b = 0.0, round(0.8 + 0.4 * rng.random(), 3)
    else:
        norm_a, norm_b = round(0.2 + rng.random(), 3), round(0.2 + rng.random(), 3)
    rel_norm = norm_a / (norm_a + norm_b)
    n_fires = 0 if dead else rng.randrange(20, 2000)
    counts = [0] * 12 if dead else [max(0, int(n_fires * (0.6**i) * rng.uniform(0.5, 1.0))) for i in range(12)]
    return {
        "id": feature_id,
        "partition": partition,
        "frequency": n_fires / 20_000,
        "n_fires": n_fires,
        "mean_activation": round(max_act * 0.4, 3),
        "max_activation": max_act,
        "dec_norm_a": norm_a,
        "dec_norm_b": norm_b,
        "rel_norm": rel_norm,
        "dec_cos": None,
        "n_distinct_tokens": 0 if dead else (1 if feature_id == ARTIFACT_FEATURE else rng.randrange(2, 40)),
        "top_token": None if dead else CONCEPTS[feature_id],
        "top_token_share": 0.0 if dead else (1.0 if feature_id == ARTIFACT_FEATURE else round(rng.uniform(0.3, 1.0), 3)),
        "token_artifact": int(feature_id == ARTIFACT_FEATURE),
        "candidate": int(partition != "shared" or rel_norm < 0.2 or rel_norm > 0.8),
        "score": 0.0 if dead else round((3.0 if partition != "shared" else 1.0) * max_act * (n_fires / 2000), 4),
        "rank": 0,  # filled in once every score is known
        "histogram": {"edges": [max_act * i / 12 for i in range(13)], "counts": counts},
        "label": None,
    }


def write_analysis(path: Path, seed: int = 0) -> Path:
    """Write a deterministic analysis.sqlite with N_FEATURES features and their examples."""
    rng = random.Random(seed)
    rows = [_feature_row(i, rng) for i in range(N_FEATURES)]
    for rank, row in enumerate(sorted(rows, key=lambda r: (-r["score"], r["id"])), start=1):
        row["rank"] = rank
    examples = []
    for row in rows:
        if row["n_fires"] == 0:
            continue
        views = ["a", "b"] if row["partition"] == "shared" else [row["partition"]]
        for view in views:
            made = [_example(rng, CONCEPTS[row["id"]], round(row["max_activation"] * rng.uniform(0.5, 1.0), 3), view)
                    for _ in range(5)]
            made[0]["activation"] = row["max_activation"]
            made.sort(key=lambda e: -e["activation"])
            for rank, example in enumerate(made):
                example["token_acts"] = [
                    (s, e, example["activation"] if (s, e) == (example["start"], example["end"]) else a)
                    for s, e, a in example["token_acts"]
                ]
                examples.append({"feature_id": row["id"], "rank": rank, "doc_id": rank, **example})
    with FeatureIndexWriter(path) as writer:
        writer.set_meta(n_features=N_FEATURES, n_exclusive=N_EXCLUSIVE, n_tokens=20_000, layer_a=2, layer_b=2)
        writer.add_features(rows)
        writer.add_examples(examples)
    return path


def make_run(name: str = "demo-run", *, created: str = FIXED_CREATED, done: tuple[str, ...] = STAGES,
             model_a: str = "org/model-a", model_b: str = "org/model-b") -> Run:
    """A run record (in the current XDIFF_HOME) with `done` stages marked and a fixed date."""
    run = Run.create(RunSettings(model_a=model_a, model_b=model_b), name=name)
    run.record.created = created
    run.record.models = {
        "a": ModelRecord(spec=model_a, revision="0123abc", layer=2),
        "b": ModelRecord(spec=model_b, revision="4567def", layer=2),
    }
    for stage in done:
        run.record.stages[stage] = StageStatus("done", created)
    run.save()
    return run


def make_analysed_run(name: str = "demo-run", created: str = FIXED_CREATED) -> Run:
    """A fully analysed run with the deterministic feature set above."""
    run = make_run(name, created=created)
    write_analysis(run.analysis_path)
    return run


if __name__ == "__main__":  # `python tests/tui_fixtures.py` fills $XDIFF_HOME for manual poking
    print(make_analysed_run().dir)
