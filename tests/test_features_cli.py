"""`xdiff features` and `xdiff analyze`: the table, the --json contract, filters and errors."""

from __future__ import annotations

import json

import pytest
from analysis_fixtures import ANIMALS, make_analysed_run
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.findings.feature_index import Example, FeatureIndex

runner = CliRunner()


@pytest.fixture
def run():
    return make_analysed_run()


def features_json(*args: str) -> list[dict]:
    result = runner.invoke(app, ["features", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_follows_the_contract_in_ranking_order(run):
    out = features_json()
    assert len(out) == 20
    assert [f["rank"] for f in out] == list(range(1, 21))
    for feature in out:
        assert {"id", "partition", "frequency", "max_activation", "examples"} <= set(feature)
        assert feature["partition"] in ("a", "b", "shared")
        assert isinstance(feature["frequency"], float) and isinstance(feature["max_activation"], float)
        acts = [e["activation"] for e in feature["examples"]]
        assert acts == sorted(acts, reverse=True)
        for example in feature["examples"]:
            assert set(example) == {"text", "start", "end", "activation"}
            assert 0 <= example["start"] < example["end"] <= len(example["text"])
    first = out[0]
    assert first["id"] == 1 and first["partition"] == "b"
    assert all(e["text"][e["start"] : e["end"]] in ANIMALS for e in first["examples"])


def test_partition_and_limit_filter_the_list(run):
    only_b = features_json("--partition", "b")
    assert [f["id"] for f in only_b] == [1]
    shared = features_json("--partition", "shared", "--limit", "3")
    assert len(shared) == 3 and all(f["partition"] == "shared" for f in shared)


def test_sort_by_frequency_orders_descending(run):
    freqs = [f["frequency"] for f in features_json("--sort", "frequency")]
    assert freqs == sorted(freqs, reverse=True)


def test_search_returns_features_whose_examples_contain_the_text(run):
    hits = features_json("--search", "tiger")
    assert 1 in [f["id"] for f in hits]
    index = FeatureIndex.open(run.analysis_path)
    for feature in hits:
        assert any("tiger" in e.text for e in index.examples(feature["id"]))
    assert all(f["n_fires"] > 0 for f in hits)
    assert features_json("--search", "zebra") == []
    assert features_json("--search", "%") == []  # SQL wildcards are literal


def test_dead_features_are_listed_with_no_examples(run):
    dead = [f for f in features_json("--sort", "id") if f["n_fires"] == 0]
    assert dead and all(f["examples"] == [] and f["frequency"] == 0 for f in dead)


def test_table_shows_why_label_and_highlighted_snippet(run):
    result = runner.invoke(app, ["features", "--limit", "6"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "6 of 20 features" in result.output
    assert "tokenization artifact: '1989'" in result.output  # the label, before the example
    assert "artifact '1989'" in result.output and "B-only, 6 words" in result.output  # the why column


def test_snippet_keeps_markup_like_text_literal_and_highlights_the_token():
    from xdiff_cli.commands.analyze import snippet

    text = "[bold]not markup[/bold] and the cat sat"
    line = snippet(Example(text=text, start=text.index("cat"), end=text.index("cat") + 3, activation=1.0,
                           token_acts=[]))
    assert line.plain == text
    (span,) = line.spans
    assert line.plain[span.start : span.end] == "cat"


def test_unanalysed_run_asks_the_user_to_run_analyze():
    make_analysed_run("not-yet", analysed=False)
    result = runner.invoke(app, ["features", "--run", "not-yet"])
    assert result.exit_code == 1
    # The stage actually missing, and the exact command that makes it.
    assert "has not been analysed yet: stage train has not run" in result.output
    assert "xdiff train --run not-yet" in result.output


def test_bad_sort_and_partition_are_usage_errors(run):
    for args, value in ((["--sort", "loudness"], "loudness"), (["--partition", "c"], "'c'")):
        result = runner.invoke(app, ["features", *args])
        assert result.exit_code == 2
        assert value in result.output


def test_features_help_explains_the_ranking():
    result = runner.invoke(app, ["features", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "tokenization artifact" in result.output and "0.2" in result.output


def test_analyze_without_a_trained_crosscoder_says_train_first():
    make_analysed_run("untrained", analysed=False)
    result = runner.invoke(app, ["analyze", "--run", "untrained"])
    assert result.exit_code == 1
    assert "xdiff train" in result.output
