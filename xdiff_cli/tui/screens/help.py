"""The `?` help screen: what each key does."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

INTRO = (
    "Features come from the run's crosscoder: A-exclusive and B-exclusive features can only be "
    "written by one model, shared ones by both. R = |dA| / (|dA| + |dB|)."
)
FEATURE_KEYS = (
    ("1 2 3 4", "A-exclusive · B-exclusive · shared · all (tabs: live/total features)"),
    ("/", "search the words at and next to the firing token; esc clears it"),
    ("o", "cycle the sort (rank, id, freq, s_max, R, score); or click a header"),
    ("home end", "first / last feature in the list"),
    ("v", "show a shared feature's examples in A's or B's tokens"),
    ("x", "sample weaker firings (lower activation bands) of the selected feature"),
    ("s", "steer the selected feature in a chat"),
    ("r", "switch run"),
    ("ctrl+p", "command palette (go to feature N, switch run, …)"),
    ("q", "quit"),
)
STEER_KEYS = (
    ("enter", "generate the unsteered and the steered answer side by side"),
    ("↑ ↓", "change α by 1 (default +4); + and - too, outside the prompt"),
    ("ctrl+o", "shared features: steer both models (default, as `xdiff steer`), only A, or only B"),
    ("esc", "stop generating; again to go back"),
)
STEER_NOTE = (
    "The steered model adds α · s_max · d to its residual stream at the crosscoder's layer, "
    "at every position: α = 1 is the feature's strongest natural activation."
)


def help_renderable() -> Group:
    def keys(title: str, rows: tuple[tuple[str, str], ...]) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold orange1", min_width=8)
        table.add_column()
        table.add_row(Text(title, style="bold"), "")
        for key, what in rows:
            table.add_row(key, what)
        return table

    return Group(
        Text.assemble(("xdiff browse", "bold"), ("   esc, ? or q closes this help", "dim")), Text(INTRO), Text(""), keys("feature list", FEATURE_KEYS), Text(""),
        keys("steering chat", STEER_KEYS), Text(""), Text(STEER_NOTE, style="dim"),
    )


class HelpScreen(ModalScreen):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box") as box:
            box.border_title = "help"
            box.border_subtitle = "esc closes"
            yield Static(help_renderable(), id="help-text")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss()
