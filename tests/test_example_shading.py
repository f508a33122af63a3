"""Top examples show every token of their context shaded by the feature's activation on it
(Neuronpedia style): in the TUI detail pane, the `xdiff features` snippet, the HTML report
(shaded) and the Markdown report (marked). An example stored without per-token values
still renders, with its firing token shaded."""

from __future__ import annotations

import re

from rich.style import Style
from rich.text import Text

from xdiff_cli.findings.feature_index import Example
from xdiff_cli.findings.report import _highlight_html, _marked_md
from xdiff_cli.tui.widgets.example_text import activation_color, shade_example, shade_legend

TEXT = "the old whale swam past the ship"


def _span(word: str) -> tuple[int, int]:
    start = TEXT.index(word)
    return start, start + len(word)


def _example(acts: dict[str, float], firing: str = "whale") -> Example:
    """Every word of TEXT as one token, with the given activations (0 elsewhere)."""
    token_acts, at = [], 0
    for word in TEXT.split():
        at = TEXT.index(word, at)
        token_acts.append((at, at + len(word), acts.get(word, 0.0)))
        at += len(word)
    start, end = _span(firing)
    return Example(text=TEXT, start=start, end=end, activation=acts[firing], token_acts=token_acts)


def _backgrounds(text: Text) -> dict[str, list]:
    """Word → the background colours styled on it."""
    out: dict[str, list] = {}
    for span in text.spans:
        style = span.style if isinstance(span.style, Style) else Style.parse(span.style)
        if style.bgcolor is not None:
            out.setdefault(text.plain[span.start : span.end], []).append(style.bgcolor)
    return out


def _brightness(colour) -> int:  # noqa: ANN001 - rich Color
    return sum(colour.get_truecolor())


def test_every_context_token_is_shaded_and_the_strongest_has_the_strongest_shade():
    example = _example({"old": 0.5, "whale": 4.0, "swam": 2.0, "ship": 0.1})
    text = shade_example(example, max_act=4.0)
    assert text.plain == TEXT
    shades = _backgrounds(text)
    # Context tokens the feature fires on are shaded too, not only the firing token.
    assert set(shades) == {"old", "whale", "swam", "ship"}
    assert shades["whale"] == [activation_color(1.0, 1.0)]  # the hottest colour of the ramp
    order = sorted(shades, key=lambda w: _brightness(shades[w][0]), reverse=True)
    assert order == ["whale", "swam", "old", "ship"]  # shade follows activation
    # Silent tokens keep the terminal's background; the firing token is also bold + underlined.
    bold = [s for s in text.spans if isinstance(s.style, Style) and s.style.bold and s.style.underline]
    assert [text.plain[s.start : s.end] for s in bold] == ["whale"]


def test_a_weak_co_firing_token_is_still_visibly_shaded():
    weak = activation_color(0.01, 4.0).get_truecolor()
    dark_end = (40, 40, 48)  # where a linear ramp would put a 0.25% activation: invisible
    assert weak.red - dark_end[0] >= 30  # the ramp's floor keeps a visible warm tint


def test_an_example_without_per_token_values_still_renders_its_firing_token():
    old = Example(text=TEXT, start=_span("whale")[0], end=_span("whale")[1], activation=3.0, token_acts=[])
    text = shade_example(old, max_act=3.0)
    assert text.plain == TEXT and list(_backgrounds(text)) == ["whale"]
    assert '<span class="tok fire"' in _highlight_html(old, 3.0)
    assert _marked_md(old) == "the old **«whale»** swam past the ship"


def test_escape_sequences_in_the_context_are_shown_inert():
    text = "say \x1b[2Jwhale now"
    start = text.index("whale")
    example = Example(text=text, start=start, end=start + 5, activation=1.0,
                      token_acts=[(0, 3, 0.5), (start, start + 5, 1.0)])
    rendered = shade_example(example, 1.0)
    assert "\x1b" not in rendered.plain and "␛" in rendered.plain
    assert rendered.plain[start : start + 5] == "whale"  # offsets still line up


def test_features_snippet_shades_the_context_around_the_firing_token():
    from xdiff_cli.commands.analyze import snippet

    line = snippet(_example({"old": 1.0, "whale": 4.0}), width=18, max_act=4.0)
    shades = _backgrounds(line)
    assert "whale" in shades and "old" in shades and "swam" not in shades
    assert _brightness(shades["whale"][0]) > _brightness(shades["old"][0])


def test_html_report_shades_each_token_and_markdown_marks_each_co_firing_token():
    example = _example({"old": 1.0, "whale": 4.0})
    page = _highlight_html(example, 4.0)
    shade = {word: float(alpha)
             for alpha, word in re.findall(r'background:rgba\(255,140,0,([\d.]+)\)"[^>]*>([^<]*)<', page)}
    assert set(shade) == {"old", "whale"} and shade["whale"] == 1.0 > shade["old"] > 0
    assert _marked_md(example) == "the «old» **«whale»** swam past the ship"


def test_legend_shows_the_ramp_from_weak_to_s_max():
    legend = shade_legend()
    assert legend.plain.startswith("weak ") and legend.plain.endswith("s_max")
    colours = [s.style.bgcolor for s in legend.spans if isinstance(s.style, Style) and s.style.bgcolor]
    assert colours[-1] == activation_color(1.0, 1.0)
    assert [_brightness(c) for c in colours] == sorted(_brightness(c) for c in colours)


def test_piped_features_table_marks_the_firing_token_it_cannot_shade():
    from analysis_fixtures import make_analysed_run
    from typer.testing import CliRunner

    from xdiff_cli.cli import app

    make_analysed_run()
    result = CliRunner().invoke(app, ["features", "--partition", "b", "--limit", "1"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("1 "))
    assert re.search(r"«(cat|dog|horse|tiger|rabbit|eagle)»", row), row
