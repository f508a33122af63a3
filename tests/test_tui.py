"""Functional tests of `xdiff browse`: drive the Textual app with Pilot on a tiny analysed run."""

from __future__ import annotations

import io

import pytest
from rich.style import Style
from textual.widgets import DataTable, Input, Static, Tab, Tabs
from tui_fixtures import ARTIFACT_FEATURE, CONCEPTS, N_EXCLUSIVE, make_analysed_run, make_run

from xdiff_cli.tui.app import XdiffApp
from xdiff_cli.tui.screens.empty_state import EmptyStateScreen
from xdiff_cli.tui.screens.features import FeaturesScreen
from xdiff_cli.tui.screens.help import HelpScreen
from xdiff_cli.tui.screens.run_picker import RunPickerScreen
from xdiff_cli.tui.widgets.example_text import activation_color
from xdiff_cli.tui.widgets.feature_detail import FeatureDetail
from xdiff_cli.tui.widgets.feature_table import FeatureTable

SIZE = (100, 30)


def listed_ids(app: XdiffApp) -> list[int]:
    table = app.screen.query_one(FeatureTable)
    return [int(key.value) for key in table.rows]


def static_text(screen, selector: str) -> str:  # noqa: ANN001
    """What a Static shows, as plain text (strings, Text and tables alike)."""
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(screen.query_one(selector, Static).content)
    return console.export_text()


async def test_single_run_opens_on_the_a_exclusive_features_in_rank_order():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen)
        # the run and both model names are on screen from the start
        assert app.screen.sub_title == "demo-run · A org/model-a vs B org/model-b"
        ids = listed_ids(app)
        assert sorted(ids) == list(range(N_EXCLUSIVE))
        ranks = [app.screen.index.feature(i).rank for i in ids]
        assert ranks == sorted(ranks)


async def test_partition_keys_switch_the_list_and_tabs():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("2")
        await pilot.pause()
        assert sorted(listed_ids(app)) == list(range(N_EXCLUSIVE, 2 * N_EXCLUSIVE))
        assert app.screen.query_one(Tabs).active == "tab-b"
        await pilot.press("3")
        await pilot.pause()
        assert all(i >= 2 * N_EXCLUSIVE for i in listed_ids(app))
        await pilot.press("4")
        await pilot.pause()
        assert len(listed_ids(app)) == len(CONCEPTS)


async def test_clicking_a_tab_switches_partition():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.click("#tab-b")
        await pilot.pause()
        assert sorted(listed_ids(app)) == list(range(N_EXCLUSIVE, 2 * N_EXCLUSIVE))


async def test_sort_key_cycles_and_header_click_sorts_by_that_column():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("4", "o")  # rank -> id
        await pilot.pause()
        assert listed_ids(app) == list(range(len(CONCEPTS)))
        assert "by id" in static_text(app.screen, "#list-status")
        table = app.screen.query_one(FeatureTable)
        table.post_message(
            DataTable.HeaderSelected(table, table.columns["max_activation"].key, 4, table.columns["max_activation"].label)
        )
        await pilot.pause()
        s_max = [app.screen.index.feature(i).max_activation for i in listed_ids(app)]
        assert s_max == sorted(s_max, reverse=True)
        assert "by s_max" in static_text(app.screen, "#list-status")


async def test_incremental_search_narrows_the_list_as_you_type():
    make_analysed_run()
    app = XdiffApp(search_debounce=0)  # no timer to wait for: every keystroke queries
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("4", "slash")
        assert app.screen.query_one("#search", Input).has_focus
        await pilot.press(*"glacier")
        await pilot.pause()
        assert listed_ids(app) == [CONCEPTS.index("glacier")]
        await pilot.press(*"xyz")
        await pilot.pause()
        assert listed_ids(app) == []
        assert "No feature matches" in static_text(app.screen, "#detail-stats")


async def test_selecting_a_feature_shows_its_stats_and_shaded_examples():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("4", "o", "ctrl+home")  # all features by id: row i is feature i
        await pilot.pause()
        await pilot.press(*["down"] * ARTIFACT_FEATURE)
        await pilot.pause()
        detail = app.screen.query_one(FeatureDetail)
        assert detail.feature is not None and detail.feature.id == ARTIFACT_FEATURE
        assert "token artifact" in static_text(app.screen, "#detail-stats")
        examples = app.screen.query_one("#detail-examples", Static).content
        assert CONCEPTS[ARTIFACT_FEATURE] in str(examples)
        # the firing token is emphasised and shaded at the hottest colour
        styled = [s for s in examples.spans if isinstance(s.style, Style)]
        bold = [s for s in styled if s.style.bold]
        assert bold and str(examples)[bold[0].start : bold[0].end] == CONCEPTS[ARTIFACT_FEATURE]
        hottest = activation_color(1.0, 1.0)
        assert any(s.style.bgcolor == hottest and (s.start, s.end) == (bold[0].start, bold[0].end) for s in styled)


async def test_shared_feature_view_toggles_between_a_and_b_tokens():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("3")
        await pilot.pause()
        detail = app.screen.query_one(FeatureDetail)
        assert detail.feature.partition == "shared" and detail.view == "a"
        await pilot.press("v")
        assert detail.view == "b"
        assert "model B tokens" in static_text(app.screen, "#detail-examples-title")


async def test_several_runs_start_with_the_picker_newest_first_and_open_one():
    make_analysed_run("old-run", created="2024-05-01T00:00:00+00:00")
    make_analysed_run("new-run", created="2025-06-01T00:00:00+00:00")
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, RunPickerScreen)
        table = app.screen.query_one("#run-table", DataTable)
        assert [k.value for k in table.rows] == ["new-run", "old-run"]
        assert table.get_row_at(0)[1] == "org/model-a vs org/model-b"
        await pilot.press("down", "enter")
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen) and app.screen.run.id == "old-run"
        await pilot.press("escape")  # back to the picker
        assert isinstance(app.screen, RunPickerScreen)


async def test_run_option_opens_that_run_directly():
    make_analysed_run("old-run", created="2024-05-01T00:00:00+00:00")
    make_analysed_run("new-run", created="2025-06-01T00:00:00+00:00")
    app = XdiffApp(run_id="old-run")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen) and app.screen.run.id == "old-run"


async def test_no_runs_shows_how_to_make_one():
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, EmptyStateScreen)
        message = static_text(app.screen, "#empty-message")
        assert "No runs yet" in message and "xdiff run MODEL_A MODEL_B" in message


async def test_unanalysed_run_says_its_stage_and_rechecks_when_it_finishes():
    run = make_run("training-run", done=("pull", "harvest"))
    run.mark_stage("train", "running")
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, EmptyStateScreen)
        message = static_text(app.screen, "#empty-message")
        assert "train (running)" in message and "xdiff run" in message
        # the pipeline finishes while the screen is open; `r` picks it up
        from tui_fixtures import write_analysis

        write_analysis(run.analysis_path)
        run.mark_stage("train", "done")
        run.mark_stage("analyze", "done")
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen)


async def test_help_screen_opens_and_closes():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, FeaturesScreen)


async def test_command_palette_goes_to_a_feature():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"feature 20")
        await pilot.pause(0.6)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen)
        assert app.screen.query_one(FeatureDetail).feature.id == 20
        assert app.screen.query_one(Tabs).active == "tab-shared"


async def test_steer_refuses_a_dead_feature_with_a_notice():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.select_feature(35)  # the dead feature
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen)
        assert any("never fires" in n.message for n in app._notifications)


@pytest.mark.parametrize("command", [["browse", "--run", "nope"]])
def test_browse_unknown_run_is_a_one_line_error(command):
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1
    assert "no run named 'nope'" in result.output


# --- the steered chat on the tiny models ------------------------------------------------


async def _open_steer_screen(pilot, app: XdiffApp, feature_id: int):  # noqa: ANN001, ANN202
    from xdiff_cli.tui.screens.steer import SteerScreen

    await pilot.pause()
    app.screen.select_feature(feature_id)
    await pilot.press("s")
    await pilot.pause()
    assert isinstance(app.screen, SteerScreen)
    return app.screen


async def _wait_until_done(pilot, screen, timeout_s: float = 60.0) -> None:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout_s
    await pilot.pause(0.2)
    while screen.generating and time.monotonic() < deadline:
        await pilot.pause(0.2)
    assert not screen.generating, "generation did not finish"


def _steerable_run(tiny_models, tmp_path):  # noqa: ANN001, ANN202
    from steer_fixtures import make_steerable_run

    run = make_steerable_run(tiny_models, tmp_path)
    for stage in ("pull", "harvest", "train", "analyze"):
        run.mark_stage(stage, "done")
    return run


async def test_steered_chat_streams_both_answers_side_by_side(tiny_models, tmp_path):
    from xdiff_cli.findings.steering import Steerer
    from xdiff_cli.tui.widgets.stream_pane import StreamPane

    run = _steerable_run(tiny_models, tmp_path)
    app = XdiffApp(run_id=run.id)
    streamed: list[tuple[str, str]] = []
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_steer_screen(pilot, app, 2)  # A-exclusive: steers model A
        original_append = screen._append
        screen._append = lambda side, stream, piece: (streamed.append((stream, piece)), original_append(side, stream, piece))
        await pilot.press(*"the cat", "tab", *["down"] * 8)  # in the scale box: α +4 -> -4
        assert screen.scale_input.value == "-4"
        await pilot.press("enter")
        await _wait_until_done(pilot, screen)
        result = screen.last_result
        assert result is not None and not result.stopped and result.model == "a"
        assert result.features == [(2, -4.0)]
        baseline = screen.query_one("#pane-a-baseline", StreamPane)
        steered = screen.query_one("#pane-a-steered", StreamPane)
        assert baseline.text == result.baseline and steered.text == result.steered
        assert steered.border_title == "model A steered (α = -4)"
        assert not screen.query_one("#steer-panes-b").display  # A-exclusive: one model only
        assert {s for s, _ in streamed} == {"baseline", "steered"}
        assert "".join(p for s, p in streamed if s == "baseline") == result.baseline
        assert result.kl is not None and "KL" in static_text(screen, "#steer-status")
    # the TUI shows exactly what the library generates for the same request
    expected = Steerer(run).generate("the cat", [(2, -4.0)], side="a", max_new_tokens=64)
    assert (expected.baseline, expected.steered) == (result.baseline, result.steered)


async def test_escape_stops_generation_then_leaves_the_chat(tiny_models, tmp_path):
    from xdiff_cli.tui.widgets.stream_pane import StreamPane

    run = _steerable_run(tiny_models, tmp_path)
    app = XdiffApp(run_id=run.id)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_steer_screen(pilot, app, 3)
        original_append = screen._append

        def append_then_escape(side: str, stream: str, piece: str) -> None:
            original_append(side, stream, piece)
            if not screen.cancel_event.is_set():
                screen.action_cancel_or_back()  # what Esc does, right after the first piece

        screen._append = append_then_escape
        await pilot.press(*"the cat", "enter")
        await _wait_until_done(pilot, screen)
        assert screen.last_result.stopped
        assert screen.query_one("#pane-a-steered", StreamPane).text == ""  # never started
        assert "stopped" in static_text(screen, "#steer-status")
        await pilot.press("escape")  # not generating: Esc goes back to the features
        await pilot.pause()
        assert isinstance(app.screen, FeaturesScreen)


async def test_plus_minus_keys_change_the_scale_and_the_steered_title():
    from xdiff_cli.tui.widgets.stream_pane import StreamPane

    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_steer_screen(pilot, app, 3)
        screen.query_one("#pane-a-steered", StreamPane).focus()
        await pilot.press("plus")
        assert screen.scale_input.value == "+5"
        await pilot.press("minus", "minus", "minus")
        await pilot.pause()
        assert screen.scale_input.value == "+2"
        assert screen.query_one("#pane-a-steered", StreamPane).border_title == "model A steered (α = +2)"
        await pilot.press("ctrl+r")  # no prompt yet: says so instead of generating
        assert not screen.generating
        assert "Type a prompt first" in static_text(screen, "#steer-status")


# --- issue #17: what the browse and steer screens show at a glance ------------------------------


async def test_tabs_count_live_features_over_all_features():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        labels = {tab.id: str(tab.label) for tab in app.screen.query(Tab)}
        # one shared feature (DEAD_FEATURE) never fires
        assert labels["tab-a"] == f"A-exclusive {N_EXCLUSIVE}/{N_EXCLUSIVE}"
        assert labels["tab-shared"] == f"Shared {len(CONCEPTS) - 2 * N_EXCLUSIVE - 1}/{len(CONCEPTS) - 2 * N_EXCLUSIVE}"
        assert labels["tab-all"] == f"All {len(CONCEPTS) - 1}/{len(CONCEPTS)}"


async def test_escape_clears_the_search_and_shows_every_feature_again():
    make_analysed_run()
    app = XdiffApp(search_debounce=0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("4", "slash", *"glacier", "enter")
        await pilot.pause()
        assert listed_ids(app) == [CONCEPTS.index("glacier")]
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen.query_one("#search", Input).value == "" and app.screen.search == ""
        assert len(listed_ids(app)) == len(CONCEPTS)
        assert isinstance(app.screen, FeaturesScreen)


async def test_home_and_end_jump_to_the_first_and_last_feature():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("4", "end")
        await pilot.pause()
        ids = listed_ids(app)
        assert app.screen.query_one(FeatureDetail).feature.id == ids[-1]
        await pilot.press("home")
        await pilot.pause()
        assert app.screen.query_one(FeatureDetail).feature.id == ids[0]


async def test_changing_the_sort_starts_at_the_top_of_the_new_order():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("4", *["down"] * 7, "o")  # rank -> id
        await pilot.pause()
        table = app.screen.query_one(FeatureTable)
        assert table.cursor_row == 0 and table.selected_feature_id == 0


async def test_help_says_how_to_close_it():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("question_mark")
        await pilot.pause()
        assert "esc, ? or q closes this help" in static_text(app.screen, "#help-text")


def test_histogram_uses_log_density_so_rare_bins_stay_visible():
    from xdiff_cli.tui.widgets.feature_detail import HIST_ROWS, histogram_text

    feature = make_feature_stub(histogram={"edges": [0.5, 1.0, 2.0, 4.0], "counts": [1000, 0, 1]})
    lines = histogram_text(feature).plain.splitlines()
    assert len(lines) == 1 + HIST_ROWS + 1  # title, bars, axis
    bottom = lines[HIST_ROWS]
    per_bin = len(bottom.rstrip()) // 3 if bottom.rstrip() else 1
    assert bottom[0] == "█" and bottom[2 * per_bin] != " "  # a single firing still shows
    assert bottom[per_bin] == " "  # an empty bin stays empty
    assert "1,000" in lines[1] and "0.50" in lines[-1] and "4.00" in lines[-1]


def test_a_fine_histogram_is_merged_to_fit_the_pane():
    from xdiff_cli.tui.widgets.feature_detail import histogram_text

    edges = [2 ** (i / 8) for i in range(193)]
    counts = [i % 7 for i in range(192)]
    feature = make_feature_stub(histogram={"edges": edges, "counts": counts})
    lines = histogram_text(feature, width=48).plain.splitlines()
    assert all(len(line) == 48 for line in lines[2:-1])  # 192 bins, 4 to a column
    assert lines[-1].startswith("1.00") and "activation" in lines[-1]


def make_feature_stub(**changes):  # noqa: ANN003, ANN201
    from xdiff_cli.findings.feature_index import Feature

    values = dict(id=0, partition="a", frequency=0.1, n_fires=10, mean_activation=1.0, max_activation=2.0,
                  dec_norm_a=1.0, dec_norm_b=0.0, rel_norm=1.0, dec_cos=None, n_distinct_tokens=3, top_token="cat",
                  top_token_share=0.5, token_artifact=False, candidate=True, score=1.0, rank=1,
                  histogram={"edges": [], "counts": []})
    values.update(changes)
    return Feature(**values)


def test_token_effects_are_the_decoder_direction_through_the_unembedding(tiny_models, tmp_path):
    import torch
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from xdiff_cli.findings.token_effects import effects_for_run

    run = _steerable_run(tiny_models, tmp_path)
    effects = effects_for_run(run, 20, "shared", k=5)  # shared: read by both models
    assert set(effects) == {"a", "b"}
    for side, model in (("a", tiny_models["llama"]), ("b", tiny_models["qwen3"])):
        with safe_open(str(run.crosscoder_dir / "final" / "model.safetensors"), "pt") as f:
            d = f.get_tensor("W_dec_FA" if side == "a" else "W_dec_FB")[20].float()
        with safe_open(str(model / "model.safetensors"), "pt") as f:
            logits = f.get_tensor("lm_head.weight").float() @ (d * f.get_tensor("model.norm.weight").float())
        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        expected_top = [tok.decode([int(i)]) for i in torch.topk(logits, 5).indices]
        expected_bottom = [tok.decode([int(i)]) for i in torch.topk(-logits, 5).indices]
        assert [t for t, _ in effects[side].promoted] == expected_top
        assert [t for t, _ in effects[side].suppressed] == expected_bottom
        values = [v for _, v in effects[side].promoted]
        assert values == sorted(values, reverse=True) and values[0] > 0
    only_a = effects_for_run(run, 2, "a", k=3)
    assert set(only_a) == {"a"}


async def test_detail_pane_shows_promoted_tokens_computed_in_a_worker(tiny_models, tmp_path):
    import time

    run = _steerable_run(tiny_models, tmp_path)
    app = XdiffApp(run_id=run.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        app.screen.select_feature(20)
        detail = app.screen.query_one(FeatureDetail)
        deadline = time.monotonic() + 30
        while detail.effects is None and time.monotonic() < deadline:
            await pilot.pause(0.1)
        assert detail.effects is not None and set(detail.effects) == {"a", "b"}
        text = static_text(app.screen, "#detail-effects")
        assert "model A: +" in text and "model B: +" in text


async def test_fixture_run_without_models_says_why_no_tokens_are_shown():
    import time

    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        detail = app.screen.query_one(FeatureDetail)
        deadline = time.monotonic() + 10
        while detail.effects is None and time.monotonic() < deadline:
            await pilot.pause(0.1)
        assert "not downloaded" in static_text(app.screen, "#detail-effects")


async def test_up_arrow_changes_alpha_from_the_prompt_and_the_default_is_shown():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_steer_screen(pilot, app, 3)
        assert screen.query_one("#prompt", Input).has_focus
        assert "default +4" in static_text(screen, "#steer-status")
        await pilot.press("up", "up")
        assert screen.scale_input.value == "+6"
        assert screen.query_one("#prompt", Input).value == ""  # nothing typed into the prompt


async def test_alpha_change_after_an_answer_keeps_the_title_of_the_text_shown():
    from xdiff_cli.tui.widgets.stream_pane import StreamPane

    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_steer_screen(pilot, app, 3)
        pane = screen.query_one("#pane-a-steered", StreamPane)
        screen.shown_scale = 4.0  # an answer made with α +4 is on screen
        await pilot.press("up")
        await pilot.pause()
        assert pane.border_title == "model A steered (α = +4)"
        assert "α is now +5" in static_text(screen, "#steer-status") and "used +4" in static_text(screen, "#steer-status")


async def test_shared_feature_steers_both_models_by_default_and_ctrl_o_picks_one():
    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_steer_screen(pilot, app, 20)  # shared
        assert screen.sides == ("a", "b")
        assert screen.query_one("#steer-panes-a").display and screen.query_one("#steer-panes-b").display
        await pilot.press("ctrl+o")  # works from the prompt, where a letter would be typed
        assert screen.sides == ("a",) and not screen.query_one("#steer-panes-b").display
        await pilot.press("ctrl+o")
        assert screen.sides == ("b",) and not screen.query_one("#steer-panes-a").display
        assert "steering model B" in static_text(screen, "#steer-heading")


async def test_shared_feature_chat_generates_in_both_models_like_the_cli(tiny_models, tmp_path):
    from xdiff_cli.findings.steering import Steerer
    from xdiff_cli.tui.widgets.stream_pane import StreamPane

    run = _steerable_run(tiny_models, tmp_path)
    app = XdiffApp(run_id=run.id)
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_steer_screen(pilot, app, 20)
        await pilot.press(*"the cat", "enter")
        await _wait_until_done(pilot, screen, timeout_s=120)
        assert [r.model for r in screen.results] == ["a", "b"]
        for result in screen.results:
            assert screen.query_one(f"#pane-{result.model}-steered", StreamPane).text == result.steered
    # `xdiff steer` steers both models of a shared feature too
    assert Steerer(run).sides_for([(20, 4.0)]) == ["a", "b"]


async def test_x_asks_for_weaker_firings_and_says_why_a_run_without_a_store_has_none():
    import time

    make_analysed_run()
    app = XdiffApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "x: sample examples" in static_text(app.screen, "#detail-quantiles")
        await pilot.press("x")
        detail = app.screen.query_one(FeatureDetail)
        deadline = time.monotonic() + 20
        while (detail.quantiles is None or "sampling" in str(detail.quantiles)) and time.monotonic() < deadline:
            await pilot.pause(0.1)
        assert "no activation store" in static_text(app.screen, "#detail-quantiles")
