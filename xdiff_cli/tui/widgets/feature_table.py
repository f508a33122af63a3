"""The feature list: one row per feature, sortable by clicking a column header."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import DataTable

from xdiff_cli.feature_index import Feature

PARTITION_NAMES = {"a": "A", "b": "B", "shared": "A+B"}

# (column key, header, FeatureIndex sort key or None when the column cannot sort)
COLUMNS = (
    ("id", "id", "id"),
    ("partition", "part", None),
    ("rel_norm", "R", "rel_norm"),
    ("frequency", "freq", "frequency"),
    ("max_activation", "s_max", "max_activation"),
    ("breadth", "brd", None),
    ("flags", "flags", None),
)
VERDICT_SHORT = {"exclusive": "✓excl", "analogous": "≈anlg", "weak": "weak"}  # after `xdiff verify`
SORT_LABELS = {"rank": "rank", "id": "id", "frequency": "freq", "max_activation": "s_max", "rel_norm": "R"}


def feature_flags(feature: Feature) -> str:
    """Short markers: dead (never fires), tok (token artifact), cand (candidate)."""
    if not feature.alive:
        return "dead"
    if feature.token_artifact:
        return "tok"
    return "cand" if feature.candidate else ""


def format_frequency(frequency: float) -> str:
    return f"{frequency * 100:.2f}%" if frequency >= 0.0001 else ("0" if frequency == 0 else "<.01%")


class FeatureTable(DataTable):
    """Feature rows keyed by feature id; header clicks post `SortRequested`."""

    class SortRequested(Message):
        def __init__(self, sort: str) -> None:
            super().__init__()
            self.sort = sort

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.sort_key = "rank"

    def on_mount(self) -> None:
        for key, label, _ in COLUMNS:
            self.add_column(label, key=key)

    def show(self, features: list[Feature], sort_key: str) -> None:
        """Replace the rows, keeping the cursor on the same feature when it is still listed."""
        self.sort_key = sort_key
        selected = self.selected_feature_id
        self.clear()
        for f in features:
            flags = feature_flags(f)
            if f.verdict in VERDICT_SHORT and flags != "dead":
                flags = f"{flags} {VERDICT_SHORT[f.verdict]}".strip()
            self.add_row(
                Text(str(f.id), justify="right"),
                PARTITION_NAMES[f.partition],
                Text(f"{f.rel_norm:.2f}", justify="right"),
                Text(format_frequency(f.frequency), justify="right"),
                Text(f"{f.max_activation:.2f}", justify="right"),
                Text(str(f.n_distinct_tokens), justify="right"),
                Text(flags, style="dim" if flags == "dead" else ("yellow" if flags.startswith("tok") else "")),
                key=str(f.id),
            )
        if selected is not None and str(selected) in self.rows:
            self.move_cursor(row=self.get_row_index(str(selected)), animate=False)

    @property
    def selected_feature_id(self) -> int | None:
        if self.row_count == 0:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return int(row_key.value) if row_key.value is not None else None

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        sort = next((s for key, _, s in COLUMNS if key == event.column_key.value), None)
        if sort:
            self.post_message(self.SortRequested(sort))
