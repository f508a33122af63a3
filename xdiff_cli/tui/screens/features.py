"""The main screen: partition tabs, a searchable sortable feature list and a detail pane."""

from __future__ import annotations

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input, Static, Tab, Tabs

from xdiff_cli.feature_index import FeatureIndex
from xdiff_cli.runs import Run
from xdiff_cli.tui.widgets.feature_detail import FeatureDetail
from xdiff_cli.tui.widgets.feature_table import SORT_LABELS, FeatureTable

PARTITIONS = ("a", "b", "shared", "all")
PARTITION_TABS = {"a": "A-exclusive", "b": "B-exclusive", "shared": "Shared", "all": "All"}
SORT_CYCLE = ("rank", "id", "frequency", "max_activation", "rel_norm")
SEARCH_DEBOUNCE_S = 0.25
NARROW_WIDTH = 100
LIST_LIMIT = 2000  # a DataTable of 100k rows is slow to build; search narrows further


class FeaturesScreen(Screen):
    BINDINGS = [
        Binding("1", "partition('a')", "A-only", show=False),
        Binding("2", "partition('b')", "B-only", show=False),
        Binding("3", "partition('shared')", "Shared", show=False),
        Binding("4", "partition('all')", "All", show=False),
        Binding("slash", "focus_search", "Search"),
        Binding("o", "cycle_sort", "Sort"),
        Binding("v", "toggle_view", "A/B view"),
        Binding("s", "steer", "Steer"),
        Binding("r", "app.switch_run", "Runs"),
        Binding("question_mark", "app.help", "Help"),
        Binding("escape", "leave_search", "Back", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, run: Run, index: FeatureIndex) -> None:
        super().__init__()
        self.run, self.index = run, index
        self.partition = "a"
        self.sort = "rank"
        self.search = ""
        self._search_timer: Timer | None = None
        self._shown_feature_id: int | None = None

    def _tab_label(self, partition: str) -> str:
        """'A-exclusive 26', or once verified 'A-exclusive 4 live/26' (features firing on held-out text)."""
        total = self.index.count(partition)
        if partition == "all" or not self.index.verified:
            return f"{PARTITION_TABS[partition]} {total}"
        return f"{PARTITION_TABS[partition]} {self.index.live_counts()[partition]} live/{total}"

    # --- layout ------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield Tabs(
            *(Tab(self._tab_label(p), id=f"tab-{p}") for p in PARTITIONS),
            id="partition-tabs",
        )
        with Horizontal(id="search-row"):
            yield Input(placeholder="search examples…  (/)", id="search", compact=True)
            yield Static("", id="list-status")
        with Horizontal(id="browser"):
            yield FeatureTable(id="feature-table")
            yield FeatureDetail(id="feature-detail")
        yield Footer()

    def on_resize(self, event: events.Resize) -> None:
        # Below NARROW_WIDTH the detail pane goes under the list instead of beside it.
        self.set_class(event.size.width < NARROW_WIDTH, "narrow")

    def on_mount(self) -> None:
        self.sub_title = self.run.id
        self.set_class(self.app.size.width < NARROW_WIDTH, "narrow")
        self.refresh_features()
        self.query_one(FeatureTable).focus()

    def on_unmount(self) -> None:
        self.index.close()

    # --- the list ------------------------------------------------------------------
    @property
    def table(self) -> FeatureTable:
        return self.query_one(FeatureTable)

    @property
    def detail(self) -> FeatureDetail:
        return self.query_one(FeatureDetail)

    def refresh_features(self) -> None:
        features = self.index.features(
            partition=self.partition, sort=self.sort, limit=LIST_LIMIT, search=self.search or None
        )
        self.table.show(features, self.sort)
        total = self.index.count(self.partition)
        shown = f"{len(features)} of {total}" if len(features) != total else f"{total}"
        search = " · matching" if self.search else ""
        self.query_one("#list-status", Static).update(
            f"{shown} features · by {SORT_LABELS[self.sort]}{search}"
        )
        self.show_selected()

    def show_selected(self) -> None:
        feature_id = self.table.selected_feature_id
        if feature_id == self._shown_feature_id and feature_id is not None:
            return
        self._shown_feature_id = feature_id
        self.detail.show(None if feature_id is None else self.index.feature(feature_id))

    def select_feature(self, feature_id: int) -> None:
        """Jump to a feature (from the command palette), widening the list if it is hidden."""
        feature = self.index.feature(feature_id)
        if self.search or self.partition not in ("all", feature.partition):
            self.search = ""
            self.query_one("#search", Input).value = ""
            self.partition = feature.partition
            self.query_one(Tabs).active = f"tab-{feature.partition}"
            self.refresh_features()
        if str(feature_id) not in self.table.rows:
            self.partition, self.sort = feature.partition, "id"
            self.refresh_features()
        self.table.move_cursor(row=self.table.get_row_index(str(feature_id)), animate=False)
        self.table.focus()
        self.show_selected()

    @on(Tabs.TabActivated, "#partition-tabs")
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        partition = (event.tab.id or "tab-all").removeprefix("tab-")
        if partition != self.partition:
            self.partition = partition
            self.refresh_features()

    @on(DataTable.RowHighlighted, "#feature-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_selected()

    @on(FeatureTable.SortRequested)
    def _sort_requested(self, event: FeatureTable.SortRequested) -> None:
        self.sort = event.sort
        self.refresh_features()

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        # Debounce: query once the user pauses typing, not on every keystroke.
        if self._search_timer is not None:
            self._search_timer.stop()
        self._search_timer = self.set_timer(SEARCH_DEBOUNCE_S, lambda: self._apply_search(event.value))

    @on(Input.Submitted, "#search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self._apply_search(event.value)
        self.table.focus()

    def _apply_search(self, value: str) -> None:
        value = value.strip()
        if value != self.search:
            self.search = value
            self.refresh_features()

    # --- actions -------------------------------------------------------------------
    def action_partition(self, partition: str) -> None:
        self.query_one(Tabs).active = f"tab-{partition}"

    def action_focus_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_leave_search(self) -> None:
        search = self.query_one("#search", Input)
        if search.has_focus:
            self.table.focus()
        elif len(self.app.screen_stack) > 2:  # opened from the run picker: back to it
            self.app.pop_screen()

    def action_cycle_sort(self) -> None:
        self.sort = SORT_CYCLE[(SORT_CYCLE.index(self.sort) + 1) % len(SORT_CYCLE)]
        self.refresh_features()

    def action_toggle_view(self) -> None:
        feature = self.detail.feature
        if feature is not None and feature.partition == "shared":
            self.detail.show(feature, "b" if self.detail.view == "a" else "a")

    def action_steer(self) -> None:
        feature = self.detail.feature
        if feature is None:
            self.notify("Select a feature to steer first.", severity="warning")
            return
        if not feature.alive:
            self.notify(f"Feature {feature.id} never fires, so it has no s_max to steer with.", severity="warning")
            return
        from xdiff_cli.tui.screens.steer import SteerScreen

        self.app.push_screen(SteerScreen(self.run, feature, view=self.detail.view))
