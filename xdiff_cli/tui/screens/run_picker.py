"""Pick a run when there are several: newest first, with models, date and status."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from xdiff_cli.run.runs import Run, list_runs


def run_models(run: Run) -> str:
    a = run.models["a"].spec if "a" in run.models else run.settings.model_a or "?"
    b = run.models["b"].spec if "b" in run.models else run.settings.model_b or "?"
    return f"{a} vs {b}"


def run_date(run: Run) -> str:
    created = run.record.created
    return created[:16].replace("T", " ")


def run_status(run: Run) -> str:
    stage = run.current_stage
    return "analysed" if stage == "done" else stage


class RunPickerScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "Open", show=True),
        Binding("escape", "back", "Back", show=False),
        Binding("question_mark", "app.help", "Help"),
        Binding("q", "app.quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Choose a run (newest first)", id="picker-title")
        yield DataTable(id="run-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.runs = {run.id: run for run in list_runs()}
        table = self.query_one("#run-table", DataTable)
        table.add_columns("run", "models", "created", "status")
        for run in self.runs.values():
            table.add_row(run.id, run_models(run), run_date(run), run_status(run), key=run.id)
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.app.open_run(self.runs[event.row_key.value])  # type: ignore[attr-defined]

    def action_open(self) -> None:
        table = self.query_one("#run-table", DataTable)
        if table.row_count:
            row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
            self.app.open_run(self.runs[row_key.value])  # type: ignore[attr-defined]

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
