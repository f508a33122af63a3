"""The `?` help screen: what each key does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# xdiff browse

Features come from the run's crosscoder: **A-exclusive** and **B-exclusive** features can
only be written by one model; **shared** ones by both. R = |dA| / (|dA| + |dB|).

| key | in the feature list |
|---|---|
| `1` `2` `3` `4` | A-exclusive · B-exclusive · shared · all |
| `/` | search the examples (filters as you type) |
| `o` | cycle the sort (rank, id, freq, s_max, R); or click a header |
| `v` | show a shared feature's examples in A's or B's tokens |
| `s` | steer the selected feature in a chat |
| `r` | switch run |
| `ctrl+p` | command palette (go to feature, switch run, …) |
| `q` | quit |

| key | in the steering chat |
|---|---|
| `enter` | generate unsteered and steered answers side by side |
| `+` `-` | change the scale α by 1 (or ↑ ↓ in the scale box) |
| `esc` | stop generating; again to go back |

The steered model adds α · s_max · d to its residual stream at the crosscoder's layer, at
every position: α = 1 is the feature's strongest natural activation.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(HELP)

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss()
