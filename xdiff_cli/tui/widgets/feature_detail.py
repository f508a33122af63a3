"""The detail pane: a feature's statistics, shaded top examples, activation histogram and the
output tokens it promotes and suppresses (Neuronpedia's feature page, in a terminal).

Order is chosen for an 80×24 terminal: two lines of statistics, then the examples (above
the fold), then the histogram and the token effects, which the user scrolls to. The token
effects need the model's unembedding; the pane posts `EffectsWanted` and the screen computes
them in a worker, then sets `effects`.
"""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from xdiff_cli.findings.feature_columns import format_activation, format_frequency, why
from xdiff_cli.findings.feature_index import Feature
from xdiff_cli.safe_text import inert
from xdiff_cli.tui.widgets.example_text import shade_example, shade_legend

N_EXAMPLES = 10
HIST_ROWS = 5
BLOCKS = " ▁▂▃▄▅▆▇█"


def describe_partition(feature: Feature) -> str:
    if feature.partition == "a":
        return "A-exclusive"
    if feature.partition == "b":
        return "B-exclusive"
    return "shared"


def stats_text(feature: Feature) -> Text:
    """Two lines: how often and how strongly it fires; where it writes and why it ranks there."""
    text = Text()
    text.append(f"{describe_partition(feature)}", style="bold")
    text.append(f" · rank {feature.rank} · fires on {format_frequency(feature.frequency)} of tokens "
                f"({feature.n_fires:,}) · s_max {format_activation(feature.max_activation)} "
                f"(mean {format_activation(feature.mean_activation)})\n")
    text.append(f"R {feature.rel_norm:.2f} (|dA| {feature.dec_norm_a:.2f}, |dB| {feature.dec_norm_b:.2f})")
    if feature.dec_cos is not None:
        text.append(f" · cos {feature.dec_cos:.2f}")
    if feature.top_token:
        text.append(f" · top word {feature.top_token.strip()!r} {feature.top_token_share:.0%}")
    text.append(" · ")
    if feature.token_artifact:
        text.append("token artifact: one word that A and B tokenise differently", style="yellow")
    else:
        text.append(why(feature), style="dim" if not feature.alive else "green")
    for name, value in evidence_rows(feature):  # `xdiff verify` evidence, once verified
        text.append(f"\n{name}: ", style="bold")
        text.append(value)
    return text


def evidence_rows(feature: Feature) -> list[tuple[str, Text | str]]:
    """`xdiff verify`'s verdict and probe numbers (nothing before the run is verified)."""
    if feature.verdict is None and feature.probe_r2 is None:
        return []
    rows: list[tuple[str, Text | str]] = []
    if feature.verdict is not None:
        style = {"exclusive": "bold green", "analogous": "yellow"}.get(feature.verdict, "dim")
        verdict = Text(feature.verdict, style=style)
        if feature.verdict_confidence:
            verdict.append(f" ({feature.verdict_confidence} confidence)", style="dim")
        rows.append(("verdict", verdict))
    if feature.verdict_reason:
        rows.append(("evidence", feature.verdict_reason))
    if feature.kl_own is not None:
        rows.append(("steer KL", f"own model {feature.kl_own:.3f}, other (mapped) {feature.kl_other:.3f} nats"))
    return rows


def histogram_text(feature: Feature, width: int = 48) -> Text:
    """Activation histogram with a log-scaled count axis (a few firings stay visible beside
    thousands), HIST_ROWS rows of eighth blocks, over the feature's log-spaced bins."""
    counts = list(feature.histogram.get("counts") or [])
    edges = list(feature.histogram.get("edges") or [])
    title = Text("activation histogram", style="bold")
    if not counts or sum(counts) == 0:
        return title + Text("  (never fires)", style="dim")
    title.append("  height: log₁₀(1 + count)", style="dim")
    counts, edges = _merged_bins(counts, edges, width)
    per_bin = max(1, min(4, width // max(1, len(counts))))
    heights = [math.log10(1 + c) for c in counts]
    top = max(heights)
    levels = [h / top * HIST_ROWS * 8 for h in heights]
    rows = []
    for row in range(HIST_ROWS - 1, -1, -1):
        line = ""
        for level in levels:
            fill = max(0.0, min(8.0, level - row * 8))
            cell = BLOCKS[round(fill)] if fill > 0 else " "
            line += cell * per_bin
        rows.append(line)
    out = Text()
    out.append_text(title)
    label_top = f" {max(counts):,}"
    for i, line in enumerate(rows):
        out.append("\n")
        out.append(line, style="orange1")
        if i == 0:
            out.append(label_top, style="dim")
    out.append("\n")
    axis_width = per_bin * len(counts)
    if len(edges) >= 2:
        left, right = format_activation(edges[0]), format_activation(edges[-1])
        out.append(left + " " * max(1, axis_width - len(left) - len(right)) + right, style="dim")
        out.append("  activation", style="dim")
    return out


def _merged_bins(counts: list, edges: list, width: int) -> tuple[list, list]:
    """Adjacent bins summed in groups until at most `width` remain (one column each)."""
    group = -(-len(counts) // max(1, width))
    if group <= 1:
        return counts, edges
    merged = [sum(counts[i : i + group]) for i in range(0, len(counts), group)]
    if len(edges) != len(counts) + 1:
        return merged, edges
    return merged, [edges[i] for i in range(0, len(counts), group)] + [edges[-1]]


def effects_text(effects: dict[str, Any] | None, feature: Feature) -> Text:
    """Tokens promoted / suppressed through each reading model's unembedding."""
    out = Text("output tokens it promotes / suppresses", style="bold")
    out.append("  (decoder · unembedding)", style="dim")
    if effects is None:
        out.append("\ncomputing…", style="dim")
        return out
    for side, value in effects.items():
        out.append(f"\nmodel {side.upper()}: ", style="bold")
        if isinstance(value, str):
            out.append(value, style="dim")
            continue
        out.append("+ ", style="green")
        out.append("  ".join(repr(tok) for tok, _ in value.promoted), style="green")
        out.append(f"\n{' ' * 9}− ", style="red")
        out.append("  ".join(repr(tok) for tok, _ in value.suppressed), style="red")
    return out


def quantiles_text(quantiles: Any, feature: Feature, view: str) -> Text:
    """Examples from below the top: a few random firings per activation band."""
    out = Text("weaker firings", style="bold")
    if quantiles is None:
        out.append("  x: sample examples from lower activation bands (one pass over the held-out tokens)",
                   style="dim")
        return out
    if isinstance(quantiles, str):
        out.append(f"\n{quantiles}", style="dim")
        return out
    for band in quantiles:
        out.append(f"\n{band.label} · {band.n_fires:,} firings", style="dim")
        for example in [e for e in band.examples if e.view == view]:
            out.append(f"\n{format_activation(example.activation):>5} ", style="dim")
            out.append_text(shade_example(example, feature.max_activation))
    return out


class FeatureDetail(VerticalScroll):
    """Shows one feature; `view` picks whose tokens ('a' or 'b') the examples are cut by."""

    class EffectsWanted(Message):
        """The pane shows `feature` and has no token effects for it yet."""

        def __init__(self, feature: Feature) -> None:
            super().__init__()
            self.feature = feature

    effects: reactive[dict[str, Any] | None] = reactive(None, init=False)
    # Lower-quantile examples: None = not asked for (x computes them), a string = computing
    # or why not, else a list of quantile_examples.QuantileBand.
    quantiles: reactive[Any] = reactive(None, init=False)

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self.feature: Feature | None = None
        self.view = "a"

    def compose(self) -> ComposeResult:
        yield Static("Select a feature to see its statistics and top examples.", id="detail-stats")
        yield Static("", id="detail-examples-title")
        yield Static("", id="detail-examples")
        yield Static("", id="detail-histogram")
        yield Static("", id="detail-effects")
        yield Static("", id="detail-quantiles")

    def show(self, feature: Feature | None, view: str | None = None) -> None:
        changed = feature is None or self.feature is None or feature.id != self.feature.id
        self.feature = feature
        if feature is None:
            self.border_title = "feature"
            self.query_one("#detail-stats", Static).update("No feature matches.")
            for part in ("#detail-histogram", "#detail-examples-title", "#detail-examples", "#detail-effects",
                         "#detail-quantiles"):
                self.query_one(part, Static).update("")
            return
        self.view = view if view in ("a", "b") and feature.partition == "shared" else feature.own_view
        label = f" — {inert(feature.label, one_line=True)}" if feature.label else ""
        if feature.label_score is not None:
            label += f" (AUC {feature.label_score:.2f})"
        self.border_title = f"feature {feature.id} · {describe_partition(feature)}{label}"
        self.query_one("#detail-stats", Static).update(stats_text(feature))
        self.query_one("#detail-examples-title", Static).update(self._examples_title(feature))
        self.query_one("#detail-examples", Static).update(self._examples(feature))
        self.query_one("#detail-histogram", Static).update(histogram_text(feature))
        if changed:
            self.scroll_home(animate=False)
            self.set_reactive(FeatureDetail.effects, None)
            self.set_reactive(FeatureDetail.quantiles, None)
            self.query_one("#detail-effects", Static).update(effects_text(None, feature))
            self.post_message(self.EffectsWanted(feature))
        self.query_one("#detail-quantiles", Static).update(quantiles_text(self.quantiles, feature, self.view))

    def watch_quantiles(self, quantiles: Any) -> None:
        if self.feature is not None:
            self.query_one("#detail-quantiles", Static).update(quantiles_text(quantiles, self.feature, self.view))

    def watch_effects(self, effects: dict[str, Any] | None) -> None:
        if self.feature is not None:
            self.query_one("#detail-effects", Static).update(effects_text(effects, self.feature))

    def _examples_title(self, feature: Feature) -> Text:
        title = Text()
        title.append(f"top examples · model {self.view.upper()} tokens", style="bold")
        if feature.partition == "shared":
            title.append("  (v: switch A/B)", style="dim")
        if feature.alive:
            title.append("  ")
            title.append_text(shade_legend())
        return title

    def _examples(self, feature: Feature) -> Text:
        examples = feature.examples_for(self.view)[:N_EXAMPLES]
        if not examples:
            return Text("no examples: this feature never fired on the analysed tokens", style="dim")
        out = Text()
        for i, example in enumerate(examples):
            if i:
                out.append("\n")
            out.append(f"{format_activation(example.activation):>5} ", style="dim")
            out.append_text(shade_example(example, feature.max_activation))
        return out
