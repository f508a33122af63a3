"""One side of the steering chat: a titled, scrolling pane that text streams into."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from xdiff_cli.safe_text import inert


def printable(text: str) -> str:
    """Model output with control characters shown as their Unicode pictures (␝), not sent raw."""
    return inert(text)


class StreamPane(VerticalScroll):
    """A bordered pane whose body grows token by token (`append`), scrolled to the end."""

    def __init__(self, title: str, *, id: str | None = None, classes: str = "") -> None:  # noqa: A002
        super().__init__(id=id, classes=f"stream-pane {classes}".strip())
        self.border_title = title
        self.text = ""

    def compose(self) -> ComposeResult:
        yield Static("", classes="stream-body", markup=False)

    def reset(self, title: str | None = None) -> None:
        if title is not None:
            self.border_title = title
        self.text = ""
        self.query_one(".stream-body", Static).update("")

    def append(self, piece: str) -> None:
        self.text += piece
        self.query_one(".stream-body", Static).update(printable(self.text))
        self.scroll_end(animate=False)

    def set_text(self, text: str) -> None:
        self.text = text
        self.query_one(".stream-body", Static).update(printable(text))
