"""SVG snapshots of `xdiff browse`'s main states at 80×24 and 160×48.

Regenerate with `pytest tests/test_tui_snapshots.py --snapshot-update` and look at the
SVGs in tests/__snapshots__/test_tui_snapshots/ before committing them. The fixture run
has a fixed name, date and feature set, so nothing on screen changes between runs.
"""

from __future__ import annotations

import pytest
from tui_fixtures import ARTIFACT_FEATURE, make_analysed_run, make_run

from xdiff_cli.run.runs import StageStatus
from xdiff_cli.tui.app import XdiffApp

SMALL = (80, 24)
LARGE = (160, 48)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "160x48"])
def test_feature_list(snap_compare, size):
    make_analysed_run()
    assert snap_compare(XdiffApp(), terminal_size=size)


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "160x48"])
def test_token_artifact_feature_detail(snap_compare, size):
    make_analysed_run()

    async def select_artifact(pilot):  # noqa: ANN001, ANN202
        pilot.app.screen.select_feature(ARTIFACT_FEATURE)
        await pilot.pause()

    assert snap_compare(XdiffApp(), terminal_size=size, run_before=select_artifact)


def test_search_results(snap_compare):
    make_analysed_run()
    assert snap_compare(XdiffApp(), terminal_size=LARGE, press=["4", "slash", *"harbor", "enter", "_", "_"])


def test_shared_feature_in_b_tokens(snap_compare):
    make_analysed_run()
    assert snap_compare(XdiffApp(), terminal_size=LARGE, press=["3", "v"])


def test_run_picker(snap_compare):
    make_analysed_run("old-run", created="2024-05-01T00:00:00+00:00")
    make_analysed_run("new-run", created="2025-06-01T00:00:00+00:00")
    run = make_run("training-run", created="2025-07-01T00:00:00+00:00", done=("pull", "harvest"))
    run.record.stages["train"] = StageStatus("running", "2025-07-01T00:00:00+00:00")
    run.save()
    assert snap_compare(XdiffApp(), terminal_size=SMALL)


def test_no_runs_empty_state(snap_compare):
    assert snap_compare(XdiffApp(), terminal_size=SMALL)


def test_unanalysed_run_empty_state(snap_compare):
    make_run("training-run", done=("pull", "harvest"))
    assert snap_compare(XdiffApp(), terminal_size=SMALL)


def test_help_screen(snap_compare):
    make_analysed_run()
    assert snap_compare(XdiffApp(), terminal_size=LARGE, press=["question_mark"])


@pytest.mark.parametrize("size", [SMALL, LARGE], ids=["80x24", "160x48"])
def test_steer_screen_before_generating(snap_compare, size):
    make_analysed_run()
    assert snap_compare(XdiffApp(), terminal_size=size, press=["s", *"Tell me about the sea", "tab", "down"])
