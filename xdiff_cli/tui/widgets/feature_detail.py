"""The detail pane: a feature's statistics, activation histogram and shaded top examples."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from xdiff_cli.console import sparkline
from xdiff_cli.feature_index import Feature
from xdiff_cli.safe_text import inert
from xdiff_cli.tui.widgets.example_text import shade_example
from xdiff_cli.tui.widgets.feature_table import feature_flags, format_frequency

N_EXAMPLES = 10


def describe_partition(feature: Feature) -> str:
    if feature.partition == "a":
        return "A-exclusive"
    if feature.partition == "b":
        return "B-exclusive"
    return "shared"


def stats_table(feature: Feature) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("partition", describe_partition(feature))
    table.add_row("rank", str(feature.rank))
    table.add_row("frequency", f"{format_frequency(feature.frequency)} ({feature.n_fires} fires)")
    table.add_row("s_max", f"{feature.max_activation:.3f} (mean {feature.mean_activation:.3f})")
    table.add_row("R (A share)", f"{feature.rel_norm:.3f}")
    table.add_row("|dA|, |dB|", f"{feature.dec_norm_a:.3f}, {feature.dec_norm_b:.3f}")
    if feature.dec_cos is not None:
        table.add_row("cos(dA, dB)", f"{feature.dec_cos:.3f}")
    top = f" (top {feature.top_token!r} {feature.top_token_share:.0%})" if feature.top_token else ""
    types = "token type" if feature.n_distinct_tokens == 1 else "token types"
    table.add_row("breadth", f"{feature.n_distinct_tokens} {types}{top}")
    flags = feature_flags(feature)
    if flags:
        table.add_row("flags", {"dead": "dead: never fires", "tok": "token artifact", "cand": "candidate"}[flags])
    return table


def histogram_text(feature: Feature) -> Text:
    counts = feature.histogram.get("counts") or []
    edges = feature.histogram.get("edges") or []
    if not counts or sum(counts) == 0:
        return Text("histogram: (no activations)", style="dim")
    text = Text("activations ")
    text.append(sparkline(counts), style="orange1")
    if edges:
        text.append(f"  {edges[0]:.1f}…{edges[-1]:.1f}", style="dim")
    return text


class FeatureDetail(VerticalScroll):
    """Shows one feature; `view` picks whose tokens ('a' or 'b') the examples are cut by."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self.feature: Feature | None = None
        self.view = "a"

    def compose(self) -> ComposeResult:
        yield Static("Select a feature to see its statistics and top examples.", id="detail-stats")
        yield Static("", id="detail-histogram")
        yield Static("", id="detail-examples-title")
        yield Static("", id="detail-examples")

    def show(self, feature: Feature | None, view: str | None = None) -> None:
        self.feature = feature
        if feature is None:
            self.border_title = "feature"
            self.query_one("#detail-stats", Static).update("No feature matches.")
            for part in ("#detail-histogram", "#detail-examples-title", "#detail-examples"):
                self.query_one(part, Static).update("")
            return
        self.view = view if view in ("a", "b") and feature.partition == "shared" else feature.own_view
        label = f" — {inert(feature.label, one_line=True)}" if feature.label else ""
        self.border_title = f"feature {feature.id} · {describe_partition(feature)}{label}"
        self.query_one("#detail-stats", Static).update(stats_table(feature))
        self.query_one("#detail-histogram", Static).update(histogram_text(feature))
        self.query_one("#detail-examples-title", Static).update(self._examples_title(feature))
        self.query_one("#detail-examples", Static).update(self._examples(feature))
        self.scroll_home(animate=False)

    def _examples_title(self, feature: Feature) -> Text:
        title = Text(f"top examples · model {self.view.upper()} tokens", style="bold")
        if feature.partition == "shared":
            title.append("  (v: switch A/B)", style="dim")
        return title

    def _examples(self, feature: Feature) -> Text:
        examples = feature.examples_for(self.view)[:N_EXAMPLES]
        if not examples:
            return Text("no examples: this feature never fired on the analysed tokens", style="dim")
        out = Text()
        for i, example in enumerate(examples):
            if i:
                out.append("\n")
            out.append(f"{example.activation:6.2f} ", style="dim")
            out.append_text(shade_example(example, feature.max_activation))
        return out
