"""The steering scale α: a number box that ↑/↓ nudge by 1, clamped to ±MAX_SCALE."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input

MAX_SCALE = 10.0  # DESIGN: the paper steered with α in [-4, 4], up to ±10


def format_scale(value: float) -> str:
    return f"{value:+g}"


class ScaleInput(Input):
    BINDINGS = [
        Binding("up", "nudge(1)", "α+1", show=False),
        Binding("down", "nudge(-1)", "α-1", show=False),
    ]

    def __init__(self, value: float, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(format_scale(value), id=id, restrict=r"[-+0-9.]*", max_length=6)

    @property
    def scale(self) -> float | None:
        """The typed value, or None when it is not a number within ±MAX_SCALE."""
        try:
            value = float(self.value)
        except ValueError:
            return None
        return value if abs(value) <= MAX_SCALE else None

    def nudge(self, delta: float) -> None:
        current = self.scale if self.scale is not None else 0.0
        self.value = format_scale(max(-MAX_SCALE, min(MAX_SCALE, current + delta)))

    def action_nudge(self, delta: float) -> None:
        self.nudge(delta)
