"""Corpus, model and tokenizer text never reaches a terminal, TUI, Markdown or HTML raw.

The payloads are the ones a hostile corpus would carry: ESC[2J (clear screen), OSC 0 (window
title) and OSC 52 (clipboard write). Every human-facing output shows them as visible
characters; `--json` keeps the exact text, escaped.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from analysis_fixtures import make_analysed_run
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.safe_text import inert, json_dumps

CLEAR = "\x1b[2J"
TITLE = "\x1b]0;pwned\x07"
CLIPBOARD = "\x1b]52;c;ZWNobyBldmls\x07"
PAYLOAD = CLEAR + TITLE + CLIPBOARD
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e")
runner = CliRunner()


def assert_inert(output: str) -> None:
    for ch in RAW_CONTROLS:
        assert ch not in output, f"raw {ch!r} reached the output"


def test_inert_replaces_each_control_character_with_one_visible_one():
    text = f"a{PAYLOAD}b\x9b31m\u202eevil\x7f\r"
    shown = inert(text)
    assert len(shown) == len(text)  # spans computed on the raw text still index it
    assert_inert(shown)
    assert "\x7f" not in shown and "\r" not in shown
    assert shown.startswith("a␛[2J␛]0;pwned␇␛]52;c;")
    assert inert("line\none\tcol") == "line\none\tcol"
    assert inert("line\none", one_line=True) == "line␊one"
    assert inert("plain ünïcode ✓") == "plain ünïcode ✓"


def test_json_dumps_keeps_exact_text_and_escapes_every_live_character():
    value = {"text": f"{PAYLOAD}\x9b\u202e\x7f"}
    encoded = json_dumps(value)
    assert_inert(encoded)
    assert "\x7f" not in encoded
    assert json.loads(encoded) == value


def poison(run, label: bool = True) -> None:
    """Put the payload at the start of every example (spans shifted) and in every label."""
    db = sqlite3.connect(run.analysis_path)
    shift = len(PAYLOAD)
    rows = db.execute("SELECT rowid, text, start, end, token_acts FROM examples").fetchall()
    for rowid, text, start, end, token_acts in rows:
        acts = [[s + shift, e + shift, a] for s, e, a in json.loads(token_acts)]
        db.execute(
            "UPDATE examples SET text = ?, start = ?, end = ?, token_acts = ? WHERE rowid = ?",
            (PAYLOAD + text, start + shift, end + shift, json.dumps(acts), rowid),
        )
    if label:
        db.execute("UPDATE features SET label = ?", (f"label{PAYLOAD}",))
    db.commit()
    db.close()


@pytest.fixture
def poisoned_run():
    run = make_analysed_run()
    poison(run)
    return run


def test_features_table_shows_escapes_visibly_even_when_redirected(poisoned_run):
    result = runner.invoke(app, ["features"])  # CliRunner output is a pipe: the redirected case
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert "␛[2J" in result.output


def test_features_json_keeps_the_exact_text_correctly_escaped(poisoned_run):
    result = runner.invoke(app, ["features", "--json"])
    assert result.exit_code == 0, result.output
    assert_inert(result.stdout)
    assert "\\u001b[2J" in result.stdout
    examples = [e for f in json.loads(result.stdout) for e in f["examples"]]
    assert examples and all(e["text"].startswith(PAYLOAD) for e in examples)


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_shows_escapes_visibly(poisoned_run, fmt, tmp_path):
    out = tmp_path / f"report.{fmt}"
    result = runner.invoke(app, ["report", "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert_inert(text)
    assert "52;c;ZWNobyBldmls␇" in text and "␛" in text


async def test_browse_pane_shows_escapes_visibly():
    from tui_fixtures import make_analysed_run as make_tui_run

    from xdiff_cli.tui.app import XdiffApp
    from xdiff_cli.tui.widgets.feature_detail import FeatureDetail

    run = make_tui_run()
    poison(run)
    app = XdiffApp()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        detail = app.screen.query_one(FeatureDetail)
        assert "label␛[2J" in str(detail.border_title)
        screen = app.export_screenshot()
    assert_inert(screen)
    assert "␛[2J" in screen


def test_steer_columns_show_model_output_escapes_visibly():
    from rich.console import Console

    from xdiff_cli.commands.steer import _columns

    console = Console(width=120, record=True, force_terminal=False)
    with console.capture() as captured:
        console.print(_columns(f"base{PAYLOAD}", f"steered{CLEAR}", [(3, 4.0)], "title"))
    assert_inert(captured.get())
    assert "base␛[2J" in captured.get()


def test_runs_table_shows_model_names_from_run_json_inert_and_without_markup():
    run = make_analysed_run()
    path = run.dir / "run.json"
    record = json.loads(path.read_text())
    record["settings"]["model_a"] = "evil\x1b]52;c;ZXZpbA==\x07[bold]A"
    path.write_text(json.dumps(record))
    result = runner.invoke(app, ["runs"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert "[bold]A" in result.output  # shown as text, not taken as markup
