"""Empty states: no runs yet, or a run that has not been analysed yet."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Middle
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from xdiff_cli.run.runs import Run


def no_runs_message() -> tuple[str, str]:
    return (
        "Nothing to browse",
        "No runs yet — create one with `xdiff run MODEL_A MODEL_B`\n"
        "(or `xdiff run --preset tiny` to try it on tiny models),\n"
        "then come back with `xdiff browse`.",
    )


def unanalysed_message(run: Run) -> tuple[str, str]:
    """What stage the run is at and which command finishes it."""
    stage = run.current_stage
    models = " vs ".join(run.models[s].spec if s in run.models else "?" for s in ("a", "b"))
    if stage.startswith(("analyze", "done")):
        how = "Finish it with `xdiff analyze` (or rerun `xdiff run`, which resumes)."
    else:
        how = "`xdiff run` resumes it where it stopped\n(or run the remaining stages, ending with `xdiff analyze`)."
    return (
        f"Run {run.id} is not analysed yet",
        f"Run {run.id} ({models}) is at stage: {stage}.\n{how}\nPress r to check again.",
    )


class EmptyStateScreen(Screen):
    """A centred message; `run` is set when the message is about an unfinished run."""

    BINDINGS = [
        Binding("r", "recheck", "Check again"),
        Binding("escape", "back", "Back", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, title: str, message: str, run: Run | None = None) -> None:
        super().__init__()
        self.title_text, self.message, self.run = title, message, run

    def compose(self) -> ComposeResult:
        yield Header()
        with Middle(), Center():
            yield Static(self.message, id="empty-message", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#empty-message", Static).border_title = self.title_text

    def action_recheck(self) -> None:
        if self.run is not None:
            self.app.open_run(self.run, replace=True)  # type: ignore[attr-defined]
        else:
            self.app.start()  # type: ignore[attr-defined]

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
