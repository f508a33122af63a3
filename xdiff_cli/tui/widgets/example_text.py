"""Render a top example as Rich Text with each token's background shaded by its activation."""

from __future__ import annotations

from rich.color import Color
from rich.style import Style
from rich.text import Text

from xdiff_cli.findings.feature_index import Example
from xdiff_cli.safe_text import inert

# Shade from a dark neutral (no activation) to a warm orange (the feature's s_max).
_COLD = (40, 40, 48)
_HOT = (255, 140, 0)


def activation_color(act: float, max_act: float) -> Color:
    """Background colour for a token firing at `act`, scaled by the feature's `max_act`."""
    level = 0.0 if max_act <= 0 else min(1.0, max(0.0, act / max_act))
    r, g, b = (round(c + (h - c) * level) for c, h in zip(_COLD, _HOT, strict=True))
    return Color.from_rgb(r, g, b)


def shade_example(example: Example, max_act: float) -> Text:
    """The example's text; tokens that fire get a background, the firing token is bold+underlined."""
    text = Text(inert(example.text.replace("\n", "⏎")))
    for start, end, act in example.token_acts:
        if act <= 0 or end <= start:
            continue
        level = act / max_act if max_act > 0 else 0.0
        fg = Color.from_rgb(0, 0, 0) if level > 0.55 else None
        text.stylize(Style(bgcolor=activation_color(act, max_act), color=fg), start, end)
    text.stylize(Style(bold=True, underline=True), example.start, example.end)
    return text
