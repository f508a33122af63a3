"""The feature list: one row per feature, sortable by clicking a column header.

Its columns are `feature_columns.LIST_COLUMNS`, the same as `xdiff features`: a column
added there (a verdict, a label) appears here too.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from xdiff_cli.findings.feature_columns import LIST_COLUMNS
from xdiff_cli.findings.feature_index import Feature

SORT_LABELS = {"rank": "rank", "id": "id", "frequency": "freq", "max_activation": "s_max", "rel_norm": "R",
               "score": "score"}
_STYLES = {"partition": {"A": "bold cyan", "B": "bold magenta", "A+B": ""}}


def _cell(column, feature: Feature) -> Text:  # noqa: ANN001 - FeatureColumn
    value = column.value(feature)
    style = _STYLES.get(column.key, {}).get(value, "")
    if column.key == "why":
        style = "dim" if not feature.alive else ("yellow" if feature.token_artifact else "")
    return Text(value, style=style, justify=column.justify, no_wrap=True, overflow="ellipsis")


class FeatureTable(DataTable):
    """Feature rows keyed by feature id; header clicks post `SortRequested`."""

    BINDINGS = [
        Binding("home", "first_row", "First", show=False),
        Binding("end", "last_row", "Last", show=False),
    ]

    class SortRequested(Message):
        def __init__(self, sort: str) -> None:
            super().__init__()
            self.sort = sort

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.sort_key = "rank"

    def on_mount(self) -> None:
        for column in LIST_COLUMNS:
            self.add_column(column.header, key=column.key, width=column.width)

    def show(self, features: list[Feature], sort_key: str, keep_selection: bool = True) -> None:
        """Replace the rows; the cursor stays on the same feature when it is still listed and
        `keep_selection`, else it goes to the first row (a new sort starts at the top)."""
        self.sort_key = sort_key
        selected = self.selected_feature_id if keep_selection else None
        self.clear()
        for feature in features:
            self.add_row(*(_cell(c, feature) for c in LIST_COLUMNS), key=str(feature.id))
        if selected is not None and str(selected) in self.rows:
            self.move_cursor(row=self.get_row_index(str(selected)), animate=False)
        else:
            self.move_cursor(row=0, animate=False)
            self.scroll_home(animate=False)

    @property
    def selected_feature_id(self) -> int | None:
        if self.row_count == 0:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return int(row_key.value) if row_key.value is not None else None

    def action_first_row(self) -> None:
        self.move_cursor(row=0, animate=False)

    def action_last_row(self) -> None:
        self.move_cursor(row=max(0, self.row_count - 1), animate=False)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        sort = next((c.sort for c in LIST_COLUMNS if c.key == event.column_key.value), None)
        if sort:
            self.post_message(self.SortRequested(sort))
