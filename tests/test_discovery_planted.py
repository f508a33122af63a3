"""Issue 19, discovery scored end to end on the *contextual* planted pair, with the scorer of
`benchmarks/discovery.py` (one implementation for the test and the benchmark).

`llama-ctx` carries the topic of a trigger word forward to every later token with an
attention head (`topic_a`); `qwen3-ctx` has its own head for another topic (`topic_b`) and a
token-level animal direction (`animals`); both share `topic_shared` and `colors`. Harvest,
train with the default recipe, analyse and verify a small run, then ask: is each planted
exclusive concept found on its own side, and does verify keep them off the wrong side?
About half a minute on 2 cores (the benchmark runs the larger version, two seeds)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _benchmark():  # noqa: ANN202 - the benchmarks/discovery.py module
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "discovery.py"
    spec = importlib.util.spec_from_file_location("discovery_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_dfc_finds_the_planted_exclusive_concepts_of_the_contextual_pair(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    bench = _benchmark()
    # harvest_pair points XDIFF_HOME at its work dir; monkeypatch restores it afterwards.
    monkeypatch.setenv("XDIFF_HOME", str(tmp_path / "ctx" / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = dataclasses.replace(bench.PAIRS["ctx"], tokens=12_000, steps=600)
    store, _ = bench.harvest_pair("ctx", spec, tmp_path / "ctx")
    labels = bench.concept_labels(store, store.split("eval"), spec.concepts)
    assert all(int(mask.sum()) > 100 for mask in labels.values())  # every concept is on held-out text

    row = bench.train_and_score(store, labels, spec, "dfc", 0, bench.RECIPES["after"], tmp_path / "runs")

    assert row["n_excl"] == 3
    # Measured on this machine: 3 of 3 found (2 by their exclusive block), 3 of 3 after
    # verify with none on the wrong side; the bounds leave one concept of slack.
    assert row["any"] >= 2 and row["blk"] >= 1, row
    assert row["v_any"] >= 2 and row["v_wrong"] == 0, row
    # The exclusive blocks live (before issue 19: 98-100% dead on this pair) ...
    assert row["dead_a"] <= 0.3 and row["dead_b"] <= 0.3, row
    # ... without costing reconstruction.
    assert row["fve"] > 0.99, row
