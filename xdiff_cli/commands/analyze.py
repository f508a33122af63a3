"""`xdiff analyze`, `xdiff features`, `xdiff report`: read a trained crosscoder's findings."""

from __future__ import annotations

import os

import typer

from xdiff_cli.commands.common import RUN_HELP
from xdiff_cli.findings.ranking import RANKING_HELP

TABLE_DEFAULT_LIMIT = 25
SNIPPET_WIDTH = 56


def _partition_option(value: str) -> str:
    from xdiff_cli.findings.feature_columns import parse_partition

    try:
        return parse_partition(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _sort_option(value: str) -> str:
    from xdiff_cli.findings.feature_columns import parse_sort

    try:
        return parse_sort(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def analyze(
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    force: bool = typer.Option(False, "--force", help="Recompute even if the run is already analysed."),
) -> None:
    """Analyse a trained run: feature statistics, top examples, ranking (writes analysis.sqlite)."""
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.console import console
    from xdiff_cli.findings.feature_index import FeatureIndex
    from xdiff_cli.run import stages

    run = pick_run(run_id, needs="train")
    with run.lock():
        if force:
            stages.restart_from(run, "analyze")
        stages.run_stages(run, stages.StageContext(), first="analyze", through="analyze", rerun=("analyze",))
    path = run.analysis_path
    index = FeatureIndex.open(path)
    summary = index.meta.get("summary", {})
    console.print(
        f"analysed run [bold]{run.id}[/]: {summary.get('n_alive', '?')}/{summary.get('n_features', '?')} "
        f"features alive on {summary.get('n_tokens', '?'):,} held-out token pairs; "
        f"{summary.get('n_candidates', '?')} candidate differences, "
        f"{summary.get('n_token_artifacts', '?')} tokenization artifacts"
        + _dead_blocks_text(summary)
    )
    console.print(
        f"eval FVE  A {summary.get('eval_fve_a', float('nan')):.3f}  B {summary.get('eval_fve_b', float('nan')):.3f}"
        f"   → {path}"
    )
    console.print(live_counts_line(index.block_counts()))
    console.print(features_table(index, index.features(limit=10), title="top 10 by default ranking"),
                  width=terminal_width())
    index.close()


def features(
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    partition: str = typer.Option(
        "all", "--partition", "-p", callback=_partition_option, help="a, b, shared or all (any case)."
    ),
    sort: str = typer.Option(
        "rank", "--sort", callback=_sort_option,
        help="rank (default ranking), score, freq, s_max, R or id (the column names work too).",
    ),
    limit: int | None = typer.Option(
        None, "--limit", "-n", min=1, help=f"Show at most N features (table default {TABLE_DEFAULT_LIMIT}; JSON: all)."
    ),
    search: str | None = typer.Option(
        None, "--search", "-s",
        help="Only features whose top examples have TEXT at or next to the firing token, or whose `xdiff label` label contains it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list (with examples) instead of a table."),
    examples: int = typer.Option(20, "--examples", min=0, help="Examples per feature in --json output."),
) -> None:
    """List a run's features, most worth a look first."""
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.findings.feature_index import FeatureIndex

    run = pick_run(run_id, needs="analyze")
    index = FeatureIndex.open(run.analysis_path)
    try:
        if not as_json and limit is None:
            limit = TABLE_DEFAULT_LIMIT
        rows = index.features(partition=partition, sort=sort, limit=limit, search=search)
        if as_json:
            out = []
            for feature in rows:
                feature.examples = index.examples(feature.id, view=feature.own_view, limit=examples)
                out.append(feature.to_json(n_examples=examples))
            from xdiff_cli.safe_text import json_dumps

            typer.echo(json_dumps(out))
            return
        from xdiff_cli.console import console

        matching = index.count_matching(partition, search)
        title = f"run {run.id}: {len(rows)} of {matching} features"
        if search:
            title += f" matching {search!r} (of {index.count(partition)})"
        title += _dead_blocks_text(index.meta.get("summary", {}), prefix="dead: ")
        console.print(live_counts_line(index.block_counts()))
        console.print(features_table(index, rows, title=title), width=terminal_width())
        if len(rows) < matching:
            console.print(f"[dim]{matching - len(rows)} more: --limit {matching} shows all[/]")
    finally:
        index.close()


features.__doc__ = f"List a run's features, most worth a look first.\n\n{RANKING_HELP}\n\n" + (
    "Columns: model is the block (A-only, B-only or shared A+B); R is the relative decoder norm "
    "|dA|/(|dA|+|dB|) (1 = writes only to A); freq is the share of token pairs it fires on; s_max its "
    "largest activation; score the ranking score within its tier; why says what put it there (block, "
    "number of distinct words it fires on, tokenization artifact, dead). The A/B decoder cosine "
    "(in --json as dec_cos) is only defined when the two models have the same width; it is null otherwise. After `xdiff verify`, a verdict column (exclusive, analogous, weak, dead; * = a difference found in the shared block) and verified differences ranked first."
)


def report(
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    out: str | None = typer.Option(None, "--out", "-o", help="Output file (default: ./xdiff-report-RUN.html or .md)."),
    fmt: str = typer.Option("html", "--format", "-f", help="html (self-contained) or md."),
    top: int = typer.Option(10, "--top", min=1, help="Exclusive features shown per model."),
) -> None:
    """Write a self-contained report (models, settings, metrics, top exclusive features)."""
    from pathlib import Path

    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.findings.report import write_report

    if fmt not in ("html", "md"):
        raise XdiffError(f"unknown report format {fmt!r}", "use html or md")
    run = pick_run(run_id, needs="analyze")
    path = write_report(run, Path(out) if out else None, fmt=fmt, top=top)
    console.print(f"report written to {path}")


# --- rendering ----------------------------------------------------------------------------

PARTITION_STYLE = {"a": "bold cyan", "b": "bold magenta", "shared": "dim"}
MIN_EXAMPLE_WIDTH = 12  # narrower than this, the example column is left out


def live_counts_line(counts: dict[str, dict[str, int]]) -> str:
    """'live features: A-only 2 of 26 · B-only 20 of 26 · shared 180 of 204' (dead ones do not count)."""
    from xdiff_cli.findings.feature_columns import BLOCK_NAMES

    parts = [f"{BLOCK_NAMES[p]} {c['live']} of {c['total']}" for p, c in counts.items() if c["total"]]
    return "live features: " + " · ".join(parts)


def snippet(example, width: int = SNIPPET_WIDTH, max_act: float | None = None, mark: bool = False):  # noqa: ANN001, ANN201
    """One line of an example's text around the firing token, every token in it shaded by the
    feature's activation (relative to `max_act`, default the example's own) as in the TUI.
    `mark`: output without colour (a pipe): the firing token is put in «» instead."""
    from rich.text import Text

    from xdiff_cli.safe_text import inert
    from xdiff_cli.tui.widgets.example_text import shade_example

    text = inert(example.text.replace("\n", " ").replace("\t", " "))
    start, end = example.start, example.end
    if mark:
        text = f"{text[:start]}«{text[start:end]}»{text[end:]}"
        end += 2
    token_len = end - start
    before = max(0, min(width // 2, width - token_len - 4))
    lo = max(0, start - before)
    hi = min(len(text), end + max(0, width - (end - lo)))
    lo = max(0, min(lo, hi - width))  # the text ends early: use the room on the left
    if mark:
        return Text(("…" if lo > 0 else "") + text[lo:hi] + ("…" if hi < len(text) else ""))
    scale = example.activation if max_act is None else max_act
    line = Text("…" if lo > 0 else "")
    line.append_text(shade_example(example, scale, text=text[lo:hi], offset=lo))
    if hi < len(text):
        line.append("…")
    return line


VERDICT_STYLE = {"exclusive": "bold green", "analogous": "yellow", "weak": "dim", "dead": "dim red"}


def verdict_text(feature):  # noqa: ANN001, ANN201 - Feature -> rich Text
    from rich.text import Text

    if feature.verdict is None:
        return Text("—", style="dim")
    mark = "*" if feature.found_in_shared else ""
    return Text(feature.verdict + mark, style=VERDICT_STYLE.get(feature.verdict, ""))


def terminal_width() -> int:
    """COLUMNS read now, else the console's width. The shared console froze COLUMNS when it
    was created and clamps every print to it, so it follows the value read here."""
    from xdiff_cli.console import console

    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit():
        console.width = int(columns)
    return console.width


LABEL_WIDTH = 24  # the label column, when a run is labelled
VERDICT_WIDTH = 10  # the verdict column, when a run is verified


def features_table(index, rows, title: str = "", width: int | None = None):  # noqa: ANN001, ANN201
    """The feature list as a rich Table that fits `width` (default: the console's).

    Every `LIST_COLUMNS` column keeps its fixed width; the example column gets what is
    left and is dropped below MIN_EXAMPLE_WIDTH, so id and model are always visible."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from xdiff_cli.console import console
    from xdiff_cli.findings.feature_columns import LIST_COLUMNS
    from xdiff_cli.safe_text import inert

    width = width or terminal_width()
    plain = console.color_system is None  # piped: no shading, so the firing token is marked «»
    # `xdiff label` labels get their own column (with their detection AUC) once a listed row
    # has one; otherwise analysis' notes (e.g. tokenization artifacts) prefix the example.
    labelled = any(f.label_score is not None for f in rows)
    # The verdict already shows in the `why` column (feature_columns.why); a column of its own
    # only where there is room for it beside a readable example.
    verified = index.verified and (width or terminal_width()) >= 120
    fixed = sum(c.width + 1 for c in LIST_COLUMNS) + (LABEL_WIDTH + 1 if labelled else 0) + (VERDICT_WIDTH + 1 if verified else 0)
    example_width = width - fixed
    table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, padding=0, expand=False)
    for c in LIST_COLUMNS:
        table.add_column(c.header, justify=c.justify, width=c.width, no_wrap=True, overflow="ellipsis")
    if verified:
        table.add_column("verdict", width=VERDICT_WIDTH, no_wrap=True, overflow="ellipsis")
    if labelled:
        table.add_column("label (AUC)", width=LABEL_WIDTH, no_wrap=True, overflow="ellipsis")
    if example_width >= MIN_EXAMPLE_WIDTH:
        table.add_column("top example", no_wrap=True, overflow="ellipsis", width=example_width)
    for feature in rows:
        cells = [Text(c.value(feature), style=PARTITION_STYLE[feature.partition] if c.key == "partition" else "")
                 for c in LIST_COLUMNS]
        if verified:
            cells.append(verdict_text(feature))
        if labelled:
            score = f" ({feature.label_score:.2f})" if feature.label_score is not None else ""
            shown = inert(feature.label, one_line=True) if feature.label else "—"
            cells.append(Text(f"{shown}{score}", style="yellow" if feature.label else "dim"))
        if example_width >= MIN_EXAMPLE_WIDTH:
            top = index.examples(feature.id, view=feature.own_view, limit=1)
            example = snippet(top[0], example_width - 2, feature.max_activation, plain) if top else Text("—", style="dim")
            if feature.label and not labelled:
                example = Text(f"[{inert(feature.label, one_line=True)}] ", style="yellow") + example
            cells.append(example)
        table.add_row(*cells)
    return table


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)
    app.command("features", help=features.__doc__)(features)
    app.command("report")(report)


def _dead_blocks_text(metrics: dict, prefix: str = "") -> str:
    from xdiff_cli.console import dead_blocks_text

    return dead_blocks_text(metrics, prefix)
