"""`xdiff browse`: the Textual app. Picks the starting screen from the runs on disk."""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding

from xdiff_cli.errors import XdiffError
from xdiff_cli.run.runs import Run, list_runs, load_run
from xdiff_cli.tui.commands import XdiffCommands
from xdiff_cli.tui.screens.empty_state import EmptyStateScreen, no_runs_message, unanalysed_message
from xdiff_cli.tui.screens.help import HelpScreen
from xdiff_cli.tui.screens.run_picker import RunPickerScreen


class XdiffApp(App):
    """Browse a run's exclusive features and steer them. `run_id` skips the run picker."""

    CSS_PATH = "app.tcss"
    TITLE = "xdiff"
    COMMANDS = App.COMMANDS | {XdiffCommands}
    BINDINGS = [
        Binding("question_mark", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", show=False),
    ]

    def __init__(
        self, run_id: str | None = None, trust_remote_code: bool = False, search_debounce: float | None = None
    ) -> None:
        super().__init__()
        self.run_id = run_id
        self.trust_remote_code = trust_remote_code  # from `xdiff browse --trust-remote-code` only
        self.search_debounce = search_debounce  # None: the screen's default; tests pass 0
        self.user_error: XdiffError | None = None  # re-raised by `xdiff browse` after the screen is gone

    def _handle_exception(self, error: Exception) -> None:
        """A user error met while browsing (a damaged analysis file) ends the app with that
        one line and exit code 1, not Textual's traceback."""
        if isinstance(error, XdiffError):
            self.user_error = error
            self.exit(return_code=1)
            return
        super()._handle_exception(error)

    def on_mount(self) -> None:
        self.start()

    def start(self) -> None:
        """Show the screen the runs on disk call for: empty state, picker, or the run itself."""
        if self.run_id is not None:
            self.open_run(load_run(self.run_id), replace=True)
            return
        runs = list_runs()
        if not runs:
            self._replace_top(EmptyStateScreen(*no_runs_message()))
        elif len(runs) == 1:
            self.open_run(runs[0], replace=True)
        else:
            self._replace_top(RunPickerScreen())

    def _replace_top(self, screen) -> None:  # noqa: ANN001 - any Screen
        if len(self.screen_stack) > 1:
            self.switch_screen(screen)
        else:
            self.push_screen(screen)

    def open_run(self, run: Run, replace: bool = False) -> None:
        """The feature browser for `run`, or an empty state saying what the run still needs.

        From the run picker the run opens on top (Esc returns to the picker)."""
        from xdiff_cli.findings.feature_index import FeatureIndex
        from xdiff_cli.tui.screens.features import FeaturesScreen

        run = Run.load(run.dir)  # re-read: the pipeline may have moved on since it was listed
        if not run.complete or not run.analysis_path.is_file():
            screen = EmptyStateScreen(*unanalysed_message(run), run=run)
        else:
            try:
                options = {} if self.search_debounce is None else {"search_debounce": self.search_debounce}
                screen = FeaturesScreen(run, FeatureIndex.open(run.analysis_path), **options)
            except XdiffError as exc:
                screen = EmptyStateScreen(f"Run {run.id} cannot be opened", str(exc), run=run)
        if not replace and isinstance(self.screen, RunPickerScreen):
            self.push_screen(screen)
        else:
            self._replace_top(screen)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_switch_run(self) -> None:
        if any(isinstance(s, RunPickerScreen) for s in self.screen_stack):
            while not isinstance(self.screen, RunPickerScreen):
                self.pop_screen()
            return
        self.push_screen(RunPickerScreen())
