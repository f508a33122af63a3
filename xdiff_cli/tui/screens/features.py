"""The main screen: partition tabs, a searchable sortable feature list and a detail pane.

The list's state lives in reactive attributes (`partition`, `sort`, `search`); changing one
re-queries the index. Token effects for the detail pane are computed in a thread worker.
"""

from __future__ import annotations

from typing import Any

from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input, Static, Tab, Tabs

from xdiff_cli.findings.feature_index import FeatureIndex
from xdiff_cli.run.runs import Run
from xdiff_cli.safe_text import inert
from xdiff_cli.tui.widgets.feature_detail import FeatureDetail
from xdiff_cli.tui.widgets.feature_table import SORT_LABELS, FeatureTable

PARTITIONS = ("a", "b", "shared", "all")
PARTITION_TABS = {"a": "A-exclusive", "b": "B-exclusive", "shared": "Shared", "all": "All"}
SORT_CYCLE = ("rank", "id", "frequency", "max_activation", "rel_norm", "score")
SEARCH_DEBOUNCE_S = 0.25  # tests pass search_debounce=0 to query on every keystroke
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
        Binding("x", "weaker_examples", "Weaker", show=False),
        Binding("s", "steer", "Steer"),
        Binding("r", "app.switch_run", "Runs"),
        Binding("question_mark", "app.help", "Help"),
        Binding("escape", "leave_search", "Back", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    partition: reactive[str] = reactive("a", init=False)
    sort: reactive[str] = reactive("rank", init=False)
    search: reactive[str] = reactive("", init=False)

    def __init__(self, run: Run, index: FeatureIndex, search_debounce: float = SEARCH_DEBOUNCE_S) -> None:
        super().__init__()
        self.run, self.index = run, index
        self.search_debounce = search_debounce
        self.blocks = index.block_counts()
        # Open on the first exclusive block whose best-ranked feature is alive (never a page of dead ones).
        self.set_reactive(FeaturesScreen.partition, self._opening_partition())
        self._search_timer: Timer | None = None
        self._shown_feature_id: int | None = None
        self._effects: dict[int, dict[str, Any]] = {}  # feature id -> token effects, computed once

    def tab_label(self, partition: str) -> str:
        """'A-exclusive 2/26': live (ever fires) of all features in the block."""
        if partition == "all":
            live = sum(c["live"] for c in self.blocks.values())
            total = sum(c["total"] for c in self.blocks.values())
        else:
            live, total = self.blocks[partition]["live"], self.blocks[partition]["total"]
        return f"{PARTITION_TABS[partition]} {live}/{total}"

    def model_names(self) -> str:
        names = []
        for side in ("a", "b"):
            info = self.run.record.models.get(side)
            name = (info and (info.repo_id or info.spec)) or getattr(self.run.settings, f"model_{side}")
            names.append(f"{side.upper()} {inert(str(name), one_line=True)}")  # run.json text: inert
        return " vs ".join(names)

    # --- layout ------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield Tabs(
            *(Tab(self.tab_label(p), id=f"tab-{p}") for p in PARTITIONS),
            id="partition-tabs",
            active=f"tab-{self.partition}",
        )
        with Horizontal(id="search-row"):
            yield Input(placeholder="search examples…  (/)", id="search", compact=True)
            yield Static("", id="list-status")
        with Horizontal(id="browser"):
            yield FeatureTable(id="feature-table")
            yield FeatureDetail(id="feature-detail")
        yield Footer()

    def _opening_partition(self) -> str:
        """The first exclusive tab whose best-ranked feature is alive, else "all" (ranked:
        live candidates first), so the browser never opens on a page of dead features."""
        for partition in ("a", "b"):
            top = self.index.features(partition=partition, sort="rank", limit=1)
            if top and top[0].alive:
                return partition
        return "all"

    def on_resize(self, event: events.Resize) -> None:
        # Below NARROW_WIDTH the detail pane goes under the list instead of beside it.
        self.set_class(event.size.width < NARROW_WIDTH, "narrow")

    def on_mount(self) -> None:
        self.sub_title = f"{self.run.id} · {self.model_names()}"
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

    def watch_partition(self) -> None:
        self.refresh_features()

    def watch_sort(self) -> None:
        self.refresh_features(keep_selection=False)  # a new order starts at its top

    def watch_search(self) -> None:
        self.refresh_features()

    def refresh_features(self, keep_selection: bool = True) -> None:
        search = self.search or None
        features = self.index.features(partition=self.partition, sort=self.sort, limit=LIST_LIMIT, search=search)
        self.table.show(features, self.sort, keep_selection=keep_selection)
        matching = self.index.count_matching(self.partition, search)
        shown = f"{len(features)} of {matching}" if len(features) != matching else f"{matching}"
        live = sum(1 for f in features if f.alive)
        status = f"{shown} features ({live} live) · by {SORT_LABELS[self.sort]}"
        if search:
            status += f" · matching {search!r}"
        self.query_one("#list-status", Static).update(status)
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
            self.query_one("#search", Input).value = ""
            with self.prevent(Tabs.TabActivated):
                self.query_one(Tabs).active = f"tab-{feature.partition}"
            self.set_reactive(FeaturesScreen.search, "")
            self.set_reactive(FeaturesScreen.partition, feature.partition)
            self.refresh_features()
        if str(feature_id) not in self.table.rows:
            self.set_reactive(FeaturesScreen.partition, feature.partition)
            self.set_reactive(FeaturesScreen.sort, "id")
            self.refresh_features()
        self.table.move_cursor(row=self.table.get_row_index(str(feature_id)), animate=False)
        self.table.focus()
        self.show_selected()

    @on(Tabs.TabActivated, "#partition-tabs")
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        self.partition = (event.tab.id or "tab-all").removeprefix("tab-")

    @on(DataTable.RowHighlighted, "#feature-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_selected()

    @on(FeatureTable.SortRequested)
    def _sort_requested(self, event: FeatureTable.SortRequested) -> None:
        self.sort = event.sort

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        # Debounce: query once the user pauses typing, not on every keystroke.
        if self._search_timer is not None:
            self._search_timer.stop()
        if self.search_debounce <= 0:
            self._apply_search(event.value)
            return
        self._search_timer = self.set_timer(self.search_debounce, lambda: self._apply_search(event.value))

    @on(Input.Submitted, "#search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self._apply_search(event.value)
        self.table.focus()

    def _apply_search(self, value: str) -> None:
        self.search = value.strip()

    # --- token effects (worker) ------------------------------------------------------
    @on(FeatureDetail.EffectsWanted)
    def _effects_wanted(self, event: FeatureDetail.EffectsWanted) -> None:
        feature = event.feature
        if feature.id in self._effects:
            self.detail.effects = self._effects[feature.id]
            return
        from xdiff_cli.findings.token_effects import sides_reading, unavailable_reason

        reasons = {side: unavailable_reason(self.run, side) for side in sides_reading(feature.partition)}
        if all(reasons.values()):  # nothing to compute: say why at once, no worker
            self._effects_ready(feature.id, reasons)
            return
        self.compute_effects(feature.id, feature.partition)

    @work(thread=True, exclusive=True, group="token-effects")
    def compute_effects(self, feature_id: int, partition: str) -> None:
        from xdiff_cli.findings.token_effects import effects_for_run

        try:
            effects: dict[str, Any] = effects_for_run(self.run, feature_id, partition)
        except Exception as exc:  # noqa: BLE001 - a failed lookup must not take the UI down
            effects = {side: f"unavailable: {exc}" for side in (("a", "b") if partition == "shared" else (partition,))}
        self.app.call_from_thread(self._effects_ready, feature_id, effects)

    def action_weaker_examples(self) -> None:
        feature = self.detail.feature
        if feature is None or not feature.alive:
            self.notify("Select a feature that fires first.", severity="warning")
            return
        self.detail.quantiles = "sampling weaker firings over the held-out tokens…"
        self.compute_quantiles(feature.id, feature.max_activation)

    @work(thread=True, exclusive=True, group="quantiles")
    def compute_quantiles(self, feature_id: int, s_max: float) -> None:
        from xdiff_cli.errors import XdiffError
        from xdiff_cli.findings.quantile_examples import quantile_examples_for_run

        try:
            result: Any = quantile_examples_for_run(self.run, feature_id, s_max)
        except XdiffError as exc:
            result = f"unavailable: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failed lookup must not take the UI down
            result = f"unavailable: {type(exc).__name__}: {exc}"
        self.app.call_from_thread(self._quantiles_ready, feature_id, result)

    def _quantiles_ready(self, feature_id: int, result: Any) -> None:
        if self.detail.feature is not None and self.detail.feature.id == feature_id:
            self.detail.quantiles = result

    def _effects_ready(self, feature_id: int, effects: dict[str, Any]) -> None:
        self._effects[feature_id] = effects
        if self.detail.feature is not None and self.detail.feature.id == feature_id:
            self.detail.effects = effects

    # --- actions -------------------------------------------------------------------
    def action_partition(self, partition: str) -> None:
        self.query_one(Tabs).active = f"tab-{partition}"

    def action_focus_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_leave_search(self) -> None:
        """Esc: clear an active search first (in the box or not), then leave the box, then go
        back to the run picker when the run was opened from it."""
        search = self.query_one("#search", Input)
        if search.value or self.search:
            if self._search_timer is not None:
                self._search_timer.stop()
            search.value = ""
            self._apply_search("")
            self.table.focus()
        elif search.has_focus:
            self.table.focus()
        elif len(self.app.screen_stack) > 2:  # opened from the run picker: back to it
            self.app.pop_screen()

    def action_cycle_sort(self) -> None:
        self.sort = SORT_CYCLE[(SORT_CYCLE.index(self.sort) + 1) % len(SORT_CYCLE)] if self.sort in SORT_CYCLE \
            else SORT_CYCLE[0]

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
