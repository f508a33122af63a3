"""`xdiff label`: evidence, prompts, parsing, scoring, caching, backends and errors.

Constructed data: short documents of filler words where some carry an animal (B-exclusive
feature 1 of the hand-built crosscoder), a colour (shared features 2 and 5) or the year
"1989" (A-exclusive feature 0), so every feature has both activating and clean windows.
An OpenAI-compatible fake server (tests/fake_openai.py) plays explainer and scorer.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from analysis_fixtures import ANIMALS, COLORS, D_A, D_B, FILLER, SPLIT_WORD, FakeStore, hand_built_crosscoder
from fake_openai import FakeOpenAI
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.findings import label as lb
from xdiff_cli.findings.feature_index import FeatureIndex

CONFIG = lb.LabelConfig(n_top=4, n_quantile=4, n_quantiles=2, n_score=5, max_new_tokens=48)
REPLIES = {1: "LABEL: animal names\nDESCRIPTION: Fires on names of animals such as cat or tiger.",
           2: "LABEL: colour words\nDESCRIPTION: Fires on colour adjectives.",
           5: "LABEL: colour words\nDESCRIPTION: Fires on colour adjectives.",
           0: "LABEL: the year 1989\nDESCRIPTION: Fires on the number 1989.",
           3: "LABEL: the article the\nDESCRIPTION: Fires on 'the'."}
CONCEPTS = {"animal names": ANIMALS, "colour words": COLORS, "the year 1989": (SPLIT_WORD,), "the article the": ("the",)}


class SparseStore(FakeStore):
    """FakeStore's concept dimensions, but each document carries at most one concept word."""

    def __init__(self, n_docs: int = 100, docs_per_shard: int = 30, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.texts, self.shards, self.rows_by_shard, rows = [], [], [], []
        filler = tuple(w for w in FILLER if w != "the")
        for doc_id in range(n_docs):
            words = [rng.choice(filler) for _ in range(rng.randint(5, 9))]
            concept = (ANIMALS, COLORS, (SPLIT_WORD,), (), ())[doc_id % 5]
            if concept:
                words.insert(rng.randrange(len(words)), rng.choice(concept))
            text, start = " ".join(words), 0
            self.texts.append(text)
            for word in words:
                end = start + len(word)
                x_a, x_b = torch.zeros(D_A), torch.zeros(D_B)
                magnitude = rng.uniform(0.5, 1.5)
                if word in ANIMALS:
                    x_b[0] = magnitude
                if word in COLORS:
                    x_a[1], x_b[1] = magnitude, magnitude
                if word == SPLIT_WORD:
                    x_a[2] = magnitude
                rows.append((doc_id, x_a / self.scale_a, x_b / self.scale_b, start, start, end, word, magnitude))
                start = end + 1
            if (doc_id + 1) % docs_per_shard == 0 or doc_id == n_docs - 1:
                self.shards.append(self._shard(rows))
                self.rows_by_shard.append(rows)
                rows = []


@pytest.fixture(scope="module")
def sparse_analysis(tmp_path_factory):
    """SparseStore, the hand-built crosscoder and their analysis.sqlite (built once per module)."""
    from xdiff_cli.findings.analysis import AnalysisConfig, analyze

    store, crosscoder = SparseStore(), hand_built_crosscoder()
    path = tmp_path_factory.mktemp("label-analysis") / "analysis.sqlite"
    analyze(crosscoder, store, store, path, config=AnalysisConfig(top_k=8), meta={})
    return store, crosscoder, path


@pytest.fixture
def labelled_run(sparse_analysis):
    """(run, evidence_for): an analysed run over SparseStore and a way to collect its evidence."""
    import shutil

    from xdiff_cli.run.runs import Run
    from xdiff_cli.run.settings import RunSettings

    store, crosscoder, analysis = sparse_analysis
    run = Run.create(RunSettings(model_a="org/model-a", model_b="org/model-b", dict_size=20, k=2), name="label-run")
    shutil.copyfile(analysis, run.analysis_path)
    for stage in ("pull", "harvest", "train", "analyze"):
        run.mark_stage(stage, "done")

    def evidence_for(todo):
        return lb.collect_evidence(crosscoder, store, store, todo, CONFIG)

    return run, evidence_for


@pytest.fixture
def server():
    by_order = [REPLIES[1], REPLIES[2], REPLIES[0], REPLIES[5]]
    fake = FakeOpenAI(replies=by_order, concepts=CONCEPTS).start()
    yield fake
    fake.stop()


def label_with(server, run, evidence_for, features, **kwargs):
    backend = lb.OpenAIEndpoint(server.url, "fake-model")
    return lb.label_features(run.analysis_path, lb.cache_path_for(run), backend, features, evidence_for, CONFIG,
                             **kwargs)


def test_evidence_holds_out_documents_and_balances_negatives(labelled_run):
    run, evidence_for = labelled_run
    evidence = evidence_for([(1, "b")])[1]
    assert len(evidence.explain) == CONFIG.n_top + CONFIG.n_quantile
    assert [w.activation for w in evidence.explain] == sorted((w.activation for w in evidence.explain), reverse=True)
    assert len(evidence.held_out) == len(evidence.negatives) > 0
    explained = {w.text for w in evidence.explain}
    assert not explained & {w.text for w in evidence.held_out}
    for window in evidence.explain + evidence.held_out:
        fired = [window.text[s:e] for s, e, a in window.token_acts if a > 0]
        assert fired and all(t in ANIMALS for t in fired)
    for window in evidence.negatives:
        assert window.activation == 0 and not any(a in window.text.split() for a in ANIMALS)


class SplitView:
    """Some shards of a store, as a split of its own (scales and documents shared)."""

    def __init__(self, store, indices) -> None:  # noqa: ANN001
        self.store, self.indices = store, list(indices)
        self.scale_a, self.scale_b = store.scale_a, store.scale_b

    @property
    def num_shards(self) -> int:
        return len(self.indices)

    def load_shard(self, index: int):  # noqa: ANN201
        return self.store.load_shard(self.indices[index])


def test_explainer_reads_the_train_split_and_scoring_the_eval_split(sparse_analysis):
    store, crosscoder, _ = sparse_analysis  # 4 shards: docs 0-29, 30-59, 60-89, 90-99
    train, evaluation = SplitView(store, [0, 1, 2]), SplitView(store, [3])
    evidence = lb.collect_evidence(crosscoder, evaluation, store, [(1, "b")], CONFIG, explain_split=train)[1]
    assert len(evidence.explain) == CONFIG.n_top + CONFIG.n_quantile  # more than eval's 2 animal documents
    assert all(w.doc_id < 90 for w in evidence.explain)
    assert evidence.held_out and all(w.doc_id >= 90 for w in evidence.held_out + evidence.negatives)
    assert len(evidence.held_out) == len(evidence.negatives)
    # explain_pairs caps what is read of the train split: its first shard only.
    capped = lb.LabelConfig(n_top=4, n_quantile=4, n_quantiles=2, n_score=5, explain_pairs=1)
    evidence = lb.collect_evidence(crosscoder, evaluation, store, [(1, "b")], capped, explain_split=train)[1]
    assert evidence.explain and all(w.doc_id < 30 for w in evidence.explain)


def test_held_out_windows_may_share_a_document_but_never_overlap():
    from analysis_fixtures import FakeStore

    store, crosscoder = FakeStore(n_docs=40, docs_per_shard=15), hand_built_crosscoder()
    config = lb.LabelConfig(n_top=4, n_quantile=0, n_score=12, window_before=2, window_after=1)
    train, evaluation = SplitView(store, [0, 1]), SplitView(store, [2])
    evidence = lb.collect_evidence(crosscoder, evaluation, store, [(1, "b")], config, explain_split=train)[1]
    held = evidence.held_out + evidence.negatives
    assert len(evidence.held_out) == len(evidence.negatives) >= 8
    assert len(held) > 10  # more windows than the eval split has documents
    spans = {}
    for w in held:  # each window's characters within its document, pairwise disjoint per document
        start = store.document_text(w.doc_id).index(w.text)
        for other in spans.get(w.doc_id, []):
            assert start + len(w.text) <= other[0] or other[1] <= start
        spans.setdefault(w.doc_id, []).append((start, start + len(w.text)))
    for w in evidence.negatives:
        assert w.activation == 0 and not any(a in w.text.split() for a in ANIMALS)


def test_prompt_shows_a_worked_example_before_the_features_examples(labelled_run, server):
    run, evidence_for = labelled_run
    label_with(server, run, evidence_for, [(1, "b")])
    messages = server.explanation_requests()[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "<<Monday>>" in messages[1]["content"] and "<<said>>" in messages[3]["content"]
    for demo in (messages[2], messages[4]):
        assert demo["content"].startswith("LABEL: ")
        assert lb.parse_explanation(demo["content"]) is None  # a reply that copies one is refused
    assert set(re.findall(r"<<([^>]+)>>", messages[-1]["content"])) <= set(ANIMALS)


def test_prompt_marks_firing_tokens_with_activation_levels(labelled_run, server):
    run, evidence_for = labelled_run
    label_with(server, run, evidence_for, [(1, "b")])
    prompt = server.explanation_requests()[0]["messages"][-1]["content"]
    examples = prompt.split("Example 1:")[1]
    marked = set(re.findall(r"<<([^>]+)>>", examples))
    assert marked and marked <= set(ANIMALS)
    assert "Activations: " in prompt and " 9" in prompt  # the strongest token is level 9
    assert "LABEL:" in server.explanation_requests()[0]["messages"][0]["content"]
    assert server.requests[0]["temperature"] == 0


def test_matching_label_beats_the_shuffled_baseline(labelled_run, server):
    run, evidence_for = labelled_run
    summary = label_with(server, run, evidence_for, [(1, "b"), (2, "a"), (0, "a")])
    by_id = {r.feature_id: r for r in summary.results}
    assert by_id[1].label == "animal names" and by_id[1].description.startswith("Fires on names")
    for result in summary.results:
        assert result.auc == pytest.approx(0.9, abs=0.1) and result.balanced_accuracy >= 0.9
        assert result.shuffled_auc is not None and result.shuffled_auc <= 0.6
    assert summary.mean_auc > summary.mean_shuffled_auc + 0.3


def test_second_run_sends_no_request_and_features_json_shows_labels(labelled_run, server):
    run, evidence_for = labelled_run
    first = label_with(server, run, evidence_for, [(1, "b"), (2, "a")])
    sent = len(server.requests)
    assert first.requests == sent > 0
    again = label_with(server, run, evidence_for, [(1, "b"), (2, "a")], force=True)
    assert len(server.requests) == sent and again.requests == 0
    assert [r.auc for r in again.results] == [r.auc for r in first.results]

    out = json.loads(CliRunner().invoke(app, ["features", "--json", "--run", run.id]).stdout)
    by_id = {f["id"]: f for f in out}
    assert by_id[1]["label"] == "animal names"
    assert by_id[1]["label_score"] == {r.feature_id: r for r in first.results}[1].auc
    assert by_id[3]["label_score"] is None
    hits = json.loads(CliRunner().invoke(app, ["features", "--json", "--search", "colour wor"]).stdout)
    assert [f["id"] for f in hits] == [2]
    table = CliRunner().invoke(app, ["features", "--run", run.id]).stdout
    assert "label" in table and "animal" in table and f"({by_id[1]['label_score']:.2f})" in table, table


def test_malformed_reply_is_retried_once_then_unlabelled(labelled_run):
    run, evidence_for = labelled_run
    fake = FakeOpenAI(replies=["I think these are animals!"], concepts=CONCEPTS).start()
    try:
        summary = label_with(fake, run, evidence_for, [(1, "b")])
    finally:
        fake.stop()
    assert len(fake.explanation_requests()) == 2 and not fake.detection_requests()
    assert fake.explanation_requests()[1]["messages"][-1]["content"] == lb.RETRY_MESSAGE
    [result] = summary.results
    assert result.status == "malformed" and result.label is None and result.auc is None
    index = FeatureIndex.open(run.analysis_path)
    assert index.feature(1).label is None and index.feature(1).label_score is None


def test_retry_that_answers_properly_is_kept(labelled_run):
    run, evidence_for = labelled_run
    fake = FakeOpenAI(replies=["sure!", "**LABEL:** animal names\n**DESCRIPTION:** animals."], concepts=CONCEPTS).start()
    try:
        summary = label_with(fake, run, evidence_for, [(1, "b")])
    finally:
        fake.stop()
    assert summary.results[0].label == "animal names" and summary.results[0].auc > 0.8


@pytest.mark.parametrize("reply, parsed", [
    ("LABEL: animal names\nDESCRIPTION: Fires on animals.", ("animal names", "Fires on animals.")),
    ("**Label:** \"colour words\".\n\n**Description:** colours", ("colour words", "colours")),
    ("LABEL: colour words\n", ("colour words", "")),  # small models often stop after the label
    ("Label: years in dates DESCRIPTION: Fires on years.", ("years in dates", "Fires on years.")),
    ("LABEL: section references. The feature fires on the word section in law texts\n", ("section references", "")),
    ("LABEL: colour words", None),  # cut off: no description and the line never ended
    ("LABEL: 8\ufffd\ufffdol Fatima\n", None),
    ("LABEL: Section numbers - fires on numbers after the word section in texts\nDESCRIPTION: x",
     ("Section numbers", "x")),
    ("LABEL: one two three four five six seven eight nine\nDESCRIPTION: x", None),
    ("LABEL: <a short label of at most 8 words>", None),
    ("LABEL: days of the week\nDESCRIPTION: Fires on weekdays.", None),  # a worked example's label
    ("LABEL: operators and their matching\nDESCRIPTION: Fires on << match>> and <<corresponding>> items.",
     ("operators and their matching", "Fires on match and corresponding items.")),
    ("LABEL: and one sentence saying when the feature fires.", None),  # the instructions echoed
    ("LABEL: DESCRIPTION: fires on things", None),
    ("animals, I think", None),
])
def test_parse_explanation(reply, parsed):
    assert lb.parse_explanation(reply) == parsed


def test_auc_and_balanced_accuracy_values():
    assert lb.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert lb.auc([0.5], [0.5]) == 0.5
    assert lb.auc([0.1, 0.9], [0.5, 0.95]) == 0.25
    assert lb.balanced_accuracy([0.9, 0.4], [0.1, 0.6]) == 0.5
    assert lb.auc([], [0.1]) is None


def test_scorer_falls_back_to_the_answer_text_without_logprobs(labelled_run):
    run, evidence_for = labelled_run
    fake = FakeOpenAI(replies=[REPLIES[1]], concepts=CONCEPTS, logprobs=False).start()
    try:
        summary = label_with(fake, run, evidence_for, [(1, "b")])
    finally:
        fake.stop()
    assert summary.results[0].auc == 1.0


def test_bad_key_is_a_one_line_error_that_never_shows_the_key(labelled_run, monkeypatch):
    run, evidence_for = labelled_run
    fake = FakeOpenAI(api_key="right-key").start()
    monkeypatch.setenv("XDIFF_LABEL_API_KEY", "sk-wrong-secret")
    monkeypatch.setattr(lb, "run_evidence", lambda run, device="cpu", config=None, advance=None: evidence_for)
    try:
        result = CliRunner().invoke(app, ["label", "--endpoint", fake.url, "--model", "m", "--limit", "1"])
    finally:
        fake.stop()
    assert result.exit_code == 1
    assert "rejected the API key (HTTP 401)" in result.output and "sk-wrong-secret" not in result.output
    assert "Traceback" not in result.output
    assert "sk-wrong-secret" not in (run.dir / "label_cache.sqlite").read_bytes().decode("latin-1")


def test_unreachable_endpoint_is_a_one_line_error(labelled_run, monkeypatch):
    run, evidence_for = labelled_run
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(lb, "run_evidence", lambda run, device="cpu", config=None, advance=None: evidence_for)
    result = CliRunner().invoke(app, ["label", "--endpoint", f"http://127.0.0.1:{port}/v1", "--model", "m"])
    assert result.exit_code == 1 and "cannot reach the label endpoint" in result.output
    assert "Traceback" not in result.output


def test_cli_labels_candidates_and_resumes(labelled_run, server, monkeypatch):
    run, evidence_for = labelled_run
    monkeypatch.setattr(lb, "run_evidence", lambda run, device="cpu", config=None, advance=None: evidence_for)
    args = ["label", "--endpoint", server.url, "--model", "fake", "--partition", "b", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["labelled"] == 1 and summary["features"][0]["label"] == "animal names"
    sent = len(server.requests)
    second = json.loads(CliRunner().invoke(app, args).stdout)
    assert second["skipped"] == 1 and second["requests"] == 0 and len(server.requests) == sent


def test_bad_options_are_one_line_errors(labelled_run):
    run, _ = labelled_run
    for args, message in ((["--partition", "x"], "unknown partition"),
                          (["--endpoint", "http://127.0.0.1:9/v1"], "--endpoint needs --model"),
                          (["--endpoint", "ftp://x", "--model", "m"], "must be an http(s) URL")):
        result = CliRunner().invoke(app, ["label", *args])
        assert result.exit_code == 1 and message in result.output, result.output


def test_local_model_scores_from_logits_and_survives_gibberish(labelled_run, tiny_models, one_torch_thread):
    from xdiff_cli.models.loading import load_model

    run, evidence_for = labelled_run
    local = lb.LocalChatModel(load_model(tiny_models["llama"], device="cpu"), name="local:tiny-llama")
    messages = lb.detection_prompt("animal names", "", "the cat saw a dog")
    logits = local.loaded.model(local._input_ids(messages)).logits[0, -1].softmax(-1)
    yes, no = float(logits[sorted(local._yes)].sum()), float(logits[sorted(local._no)].sum())
    assert local.p_yes(messages) == pytest.approx(yes / (yes + no), rel=1e-5)
    # The next prompt differs only in the excerpt: it reuses the cached prefix, same answer.
    again = lb.detection_prompt("animal names", "", "a red bird flew over the barn")
    ids = local._input_ids(again)
    full = local.loaded.model(ids).logits[0, -1].softmax(-1)
    yes, no = float(full[sorted(local._yes)].sum()), float(full[sorted(local._no)].sum())
    lengths = []
    hook = local.loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((kwargs.get("input_ids") if args == () else args[0]).shape[1]),
        with_kwargs=True)
    try:
        assert local.p_yes(again) == pytest.approx(yes / (yes + no), rel=1e-4)
    finally:
        hook.remove()
    assert lengths and lengths[0] < ids.shape[1] // 2  # only the excerpt and what follows it ran
    config = lb.LabelConfig(n_top=2, n_quantile=0, n_score=2, max_new_tokens=8)
    summary = lb.label_features(run.analysis_path, lb.cache_path_for(run), local, [(1, "b")],
                                lambda todo: {f: e for f, e in evidence_for(todo).items()}, config)
    [result] = summary.results
    # An untrained tiny model cannot follow the format: retried once, then unlabelled.
    assert result.status == "malformed" and summary.requests == 2, (result.reply, result.label)


def test_run_label_option_labels_the_top_candidates(labelled_run, server, monkeypatch, capsys):
    from xdiff_cli.commands.run import label_after_run

    run, evidence_for = labelled_run
    monkeypatch.setattr(lb, "run_evidence", lambda run, device="cpu", config=None, advance=None: evidence_for)
    label_after_run(run, model="fake", endpoint=server.url)
    index = FeatureIndex.open(run.analysis_path)
    labelled = [f for f in index.features(candidates_only=True, alive_only=True) if f.label_score is not None]
    assert labelled and index.feature(1).label == "animal names"
    assert "Mean detection AUC" in capsys.readouterr().out


def test_markers_hug_the_token_and_leave_its_spaces_outside():
    window = lb.Window("a dog ran", [(1, 5, 1.0), (5, 9, 0.5)])
    assert lb.mark_window(window, 1.0) == ("a <<dog>> <<ran>>", [("dog", 9), ("ran", 4)])
