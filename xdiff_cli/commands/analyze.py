"""`xdiff analyze`, `xdiff features`, `xdiff report`: read a trained crosscoder's findings."""

from __future__ import annotations

import typer

from xdiff_cli.commands.common import RUN_HELP
from xdiff_cli.ranking import RANKING_HELP

TABLE_DEFAULT_LIMIT = 25
SNIPPET_WIDTH = 56


def analyze(
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    force: bool = typer.Option(False, "--force", help="Recompute even if the run is already analysed."),
) -> None:
    """Analyse a trained run: feature statistics, top examples, ranking (writes analysis.sqlite)."""
    from xdiff_cli import stages
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.console import console
    from xdiff_cli.feature_index import FeatureIndex

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
    console.print(features_table(index, index.features(limit=10), title="top 10 by default ranking"))
    index.close()


def features(
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    partition: str = typer.Option("all", "--partition", "-p", help="a, b, shared or all."),
    sort: str = typer.Option(
        "rank", "--sort", help="rank (default ranking), frequency, max_activation, rel_norm, score or id."
    ),
    limit: int | None = typer.Option(
        None, "--limit", "-n", min=1, help=f"Show at most N features (table default {TABLE_DEFAULT_LIMIT}; JSON: all)."
    ),
    search: str | None = typer.Option(None, "--search", "-s", help="Only features whose top examples contain TEXT."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list (with examples) instead of a table."),
    examples: int = typer.Option(20, "--examples", min=0, help="Examples per feature in --json output."),
) -> None:
    """List a run's features, most worth a look first."""
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.feature_index import FeatureIndex

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

        total = index.count(partition)
        title = f"run {run.id}: {len(rows)} of {total} features" + (f" matching {search!r}" if search else "")
        title += _dead_blocks_text(index.meta.get("summary", {}), prefix="dead: ")
        console.print(features_table(index, rows, title=title))
    finally:
        index.close()


features.__doc__ = f"List a run's features, most worth a look first.\n\n{RANKING_HELP}\n\n" + (
    "Columns: R is the relative decoder norm |dA|/(|dA|+|dB|) (1 = writes only to A); breadth is the "
    "number of distinct word types the feature fires on; flags: ★ candidate difference, "
    "⚠ tokenization artifact, ✝ dead. The A/B decoder cosine (in --json as dec_cos) is only defined "
    "when the two models have the same width; it is null otherwise."
)


def report(
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    out: str | None = typer.Option(None, "--out", "-o", help="Output file (default: report.html/.md in the run dir)."),
    fmt: str = typer.Option("html", "--format", "-f", help="html (self-contained) or md."),
    top: int = typer.Option(10, "--top", min=1, help="Exclusive features shown per model."),
) -> None:
    """Write a self-contained report (models, settings, metrics, top exclusive features)."""
    from pathlib import Path

    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.report import write_report

    if fmt not in ("html", "md"):
        raise XdiffError(f"unknown report format {fmt!r}", "use html or md")
    run = pick_run(run_id, needs="analyze")
    path = write_report(run, Path(out) if out else None, fmt=fmt, top=top)
    console.print(f"report written to {path}")


# --- rendering ----------------------------------------------------------------------------

PARTITION_STYLE = {"a": "bold cyan", "b": "bold magenta", "shared": "dim"}


def flags_for(feature) -> str:  # noqa: ANN001 - feature_index.Feature
    if not feature.alive:
        return "✝"
    return ("★" if feature.candidate else "") + ("⚠" if feature.token_artifact else "")


def snippet(example, width: int = SNIPPET_WIDTH):  # noqa: ANN001, ANN201 - Example -> rich Text
    """One line of an example's text around the firing token, the token highlighted."""
    from rich.text import Text

    from xdiff_cli.safe_text import inert

    text = inert(example.text.replace("\n", " ").replace("\t", " "))
    start, end = example.start, example.end
    token_len = end - start
    before = max(0, width - token_len - 12)
    lo = max(0, start - before)
    hi = min(len(text), end + max(0, width - (end - lo)))
    line = Text(("…" if lo > 0 else "") + text[lo:hi] + ("…" if hi < len(text) else ""))
    offset = 1 if lo > 0 else 0
    line.stylize("bold black on yellow", start - lo + offset, end - lo + offset)
    return line


def features_table(index, rows, title: str = ""):  # noqa: ANN001, ANN201 - FeatureIndex, [Feature] -> Table
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", header_style="bold", expand=False)
    table.add_column("id", justify="right")
    table.add_column("model")
    table.add_column("R", justify="right")
    table.add_column("freq", justify="right")
    table.add_column("max act", justify="right")
    table.add_column("breadth", justify="right")
    table.add_column("flags")
    table.add_column("top example", no_wrap=True, overflow="ellipsis", max_width=SNIPPET_WIDTH + 2)
    for feature in rows:
        top = index.examples(feature.id, view=feature.own_view, limit=1)
        example = snippet(top[0]) if top else Text("—", style="dim")
        if feature.label:
            from xdiff_cli.safe_text import inert

            example = Text(f"[{inert(feature.label, one_line=True)}] ", style="yellow") + example
        table.add_row(
            str(feature.id),
            Text(feature.partition.upper() if feature.partition != "shared" else "shared",
                 style=PARTITION_STYLE[feature.partition]),
            f"{feature.rel_norm:.2f}",
            f"{feature.frequency:.2e}" if feature.frequency else "0",
            f"{feature.max_activation:.3g}",
            str(feature.n_distinct_tokens),
            flags_for(feature),
            example,
        )
    return table


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)
    app.command("features", help=features.__doc__)(features)
    app.command("report")(report)


def _dead_blocks_text(metrics: dict, prefix: str = "") -> str:
    from xdiff_cli.console import dead_blocks_text

    return dead_blocks_text(metrics, prefix)
