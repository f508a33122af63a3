"""Render an example as Rich Text with every token of its context shaded by the feature's
activation on it (Neuronpedia's per-token shading, in a terminal).

Analysis stores, for every kept example, the feature's activation at each aligned token of
the context window (`Example.token_acts`: [start, end, activation] within the text). A
token's background runs from no colour (the feature is silent there) through a faint warm
tint to orange at the feature's s_max; the token the example was chosen for is also bold
and underlined. An example without per-token values still shows its firing token shaded by
its own activation. The same ramp serves the TUI detail pane and `xdiff features`.
"""

from __future__ import annotations

from rich.color import Color
from rich.style import Style
from rich.text import Text

from xdiff_cli.findings.feature_index import Example, shade_level
from xdiff_cli.safe_text import inert

# Shade from a dark neutral (no activation) to a warm orange (the feature's s_max).
_COLD = (40, 40, 48)
_HOT = (255, 140, 0)
_DARK_TEXT_FROM = 0.55  # above this level the background is light: black text reads better
LEGEND_RATIOS = (0.1, 0.4, 0.7, 1.0)  # activation / s_max of the legend's cells


def _ramp(level: float) -> Color:
    r, g, b = (round(c + (h - c) * level) for c, h in zip(_COLD, _HOT, strict=True))
    return Color.from_rgb(r, g, b)


def activation_color(act: float, max_act: float) -> Color:
    """Background colour for a token firing at `act`, scaled by the feature's `max_act`."""
    return _ramp(shade_level(act, max_act))


def token_style(act: float, max_act: float) -> Style | None:
    """The style of a token firing at `act` (None: the feature is silent there)."""
    level = shade_level(act, max_act)
    if level <= 0:
        return None
    return Style(bgcolor=_ramp(level), color=Color.from_rgb(0, 0, 0) if level > _DARK_TEXT_FROM else None)


def shade_example(example: Example, max_act: float, text: str | None = None, offset: int = 0) -> Text:
    """The example's whole context with each token shaded by its activation; the firing token
    also bold and underlined. `text`/`offset`: render a cut of the (inert) text whose first
    character is character `offset` of the example's text."""
    body = inert(example.text.replace("\n", "⏎")) if text is None else text
    out = Text(body)
    firing = Style(bold=True, underline=True)
    for start, end, act in example.token_spans():
        is_firing = (start, end) == (example.start, example.end)
        style = token_style(act, max_act)
        if is_firing:
            style = firing if style is None else style + firing
        lo, hi = max(0, start - offset), min(len(body), end - offset)
        if style is not None and lo < hi:
            out.stylize(style, lo, hi)
    return out


def shade_legend() -> Text:
    """'weak ████████ s_max': the shading ramp, for the examples' heading."""
    out = Text()
    out.append("weak ", style="dim")
    for ratio in LEGEND_RATIOS:
        out.append("  ", style=Style(bgcolor=activation_color(ratio, 1.0)))
    out.append(" s_max", style="dim")
    return out
