"""`xdiff report`: a self-contained HTML (and Markdown) report of a run's findings."""

from __future__ import annotations

import re

import pytest
from analysis_fixtures import make_analysed_run
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.run.runs import resolve_run

runner = CliRunner()


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """`xdiff report` writes to the current directory: make that a temporary one."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_html_report_is_self_contained_with_histogram_and_highlighted_examples(in_tmp_dir):
    make_analysed_run()
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    page = (in_tmp_dir / "xdiff-report-fake-run.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and not re.search(r"(src|href)=", page)  # nothing external
    assert page.count("<svg") == 1 and page.count("<rect") > 3
    assert "org/model-a" in page and "org/model-b" in page
    assert "variance explained in model A" in page and "fve_a" not in page
    # B's top feature is the planted animal feature; its examples outline an animal token.
    b_section = page.split("specific to model B")[1]
    assert "feature 1 · B-exclusive" in b_section
    fired = re.findall(r'class="tok fire"[^>]*>([^<]*)<', b_section)
    assert fired and set(fired) <= {"cat", "dog", "horse", "tiger", "rabbit", "eagle"}
    # The A side lists the lopsided shared feature before the "1989" tokenization artifact.
    a_section = page.split("specific to model A")[1].split("specific to model B")[0]
    assert a_section.index("feature 5") < a_section.index("tokenization artifact")


def test_report_escapes_text_from_models_and_corpora(in_tmp_dir):
    evil = "<script>alert(1)</script>"
    make_analysed_run(models={"a": {"spec": evil}, "b": {"spec": "org/b"}})
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    page = (in_tmp_dir / f"xdiff-report-{resolve_run(None).id}.html").read_text()
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_markdown_report_to_a_chosen_path(tmp_path):
    make_analysed_run()
    out = tmp_path / "audit.md"
    result = runner.invoke(app, ["report", "--format", "md", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# xdiff report: org/model-a vs org/model-b\n")
    assert "## Relative decoder norms" in text and "```" in text
    b_section = text.split("specific to model B")[1].split("In each example")[0]
    assert "#### feature 1 · B-exclusive" in b_section
    fired = re.findall(r"\*\*«([^»]*)»\*\*", b_section)
    assert fired and set(fired) <= {"cat", "dog", "horse", "tiger", "rabbit", "eagle"}
    assert "tokenization artifact: '1989'" in text


def test_report_on_an_unanalysed_run_is_a_user_error():
    make_analysed_run("bare", analysed=False)
    result = runner.invoke(app, ["report", "--run", "bare"])
    assert result.exit_code == 1 and "has not been analysed yet" in result.output


def test_unknown_format_is_rejected():
    make_analysed_run()
    result = runner.invoke(app, ["report", "--format", "pdf"])
    assert result.exit_code == 1 and "html or md" in result.output
