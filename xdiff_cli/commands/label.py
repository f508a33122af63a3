"""`xdiff label`: automatic, scored explanations of a run's features (see `xdiff_cli/findings/label.py`)."""

from __future__ import annotations

import json

import typer

LABEL_HELP = (
    "Label a run's features with a short explanation and score it.\n\n"
    "An explainer model reads each feature's strongest windows plus windows from lower "
    "activation quantiles (firing tokens marked with activation levels) and answers a label "
    "(<= 8 words) and a one-sentence description. The label is then scored by detection: "
    "held-out windows the explainer never saw, half activating and half not, are put to the "
    "scorer (\"does this feature fire here?\"); the label_score is the AUC of its P(yes). The same "
    "texts scored with another feature's label give the chance baseline (shuffled AUC).\n\n"
    "Backends: a local chat model (--model SPEC: hub id, local directory, or anything "
    "`xdiff run` accepts; default {default}) or an OpenAI-compatible server (--endpoint URL "
    "--model NAME; API key from ${key_env} or $OPENAI_API_KEY, never stored). Greedy/temperature 0. "
    "Resumable: labels are saved one feature at a time, and every answer is cached in the run "
    "directory (label_cache.sqlite), so a re-run sends no request already answered."
)


def label(
    run_id: str | None = typer.Option(None, "--run", help="Run id (default: newest)."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="Label the top N features of the partition."),
    partition: str = typer.Option("candidates", "--partition", "-p", help="a, b, candidates or all."),
    model: str | None = typer.Option(None, "--model", "-m", help="Local model spec, or the endpoint's model name."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1."),
    api_key_env: str = typer.Option("XDIFF_LABEL_API_KEY", "--api-key-env", help="Environment variable holding the API key."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (local model and activations)."),
    force: bool = typer.Option(False, "--force", help="Label again features this model already labelled."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
) -> None:
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.findings.label import PARTITIONS

    if partition not in PARTITIONS:
        raise XdiffError(f"unknown partition {partition!r}", "use a, b, candidates or all")
    if endpoint and not model:
        raise XdiffError("--endpoint needs --model NAME (the model the server should use)")
    run = pick_run(run_id, needs="analyze")
    summary = label_with_progress(run, model=model, endpoint=endpoint, partition=partition, limit=limit,
                                  device=device, api_key_env=api_key_env, force=force, show=not as_json)
    if as_json:
        typer.echo(json.dumps(summary.to_json(), ensure_ascii=False))


def label_with_progress(run, *, show: bool = True, **options):  # noqa: ANN001, ANN201 - Run -> LabelSummary
    """Label a run with a progress bar (features done, requests sent); print the results."""
    from xdiff_cli.console import console, err_console, stage_progress
    from xdiff_cli.findings.label import label_run

    with stage_progress("features", show_fields="{task.fields[requests]} requests") as progress:
        task = progress.add_task("label", total=None, requests=0)

        def on_start(n: int) -> None:
            err_console.print(f"[dim]labelling {n} features of run {run.id} ({options.get('partition')})[/]")
            progress.update(task, total=n)

        def on_feature(result, requests: int) -> None:  # noqa: ANN001 - LabelResult
            progress.update(task, advance=1, requests=requests)

        summary = label_run(run, on_start=on_start, on_feature=on_feature, **options)
        progress.update(task, completed=progress.tasks[0].total)
    if show:
        console.print(summary_table(summary))
        console.print(summary_line(summary))
    return summary


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def summary_line(summary) -> str:  # noqa: ANN001 - label.LabelSummary
    return (
        f"{summary.labelled} labelled, {summary.malformed} unlabelled (malformed replies), "
        f"{summary.skipped} already done; {summary.requests} requests sent in {summary.seconds:.1f} s. "
        f"Mean detection AUC {_fmt(summary.mean_auc)} vs shuffled labels {_fmt(summary.mean_shuffled_auc)} "
        f"(balanced accuracy {_fmt(summary.mean_balanced_accuracy)} vs "
        f"{_fmt(summary.mean_shuffled_balanced_accuracy)})."
    )


def summary_table(summary):  # noqa: ANN001, ANN201 - LabelSummary -> rich Table
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"labels by {summary.model}", title_justify="left", header_style="bold")
    table.add_column("id", justify="right")
    table.add_column("label")
    table.add_column("AUC", justify="right")
    table.add_column("shuffled", justify="right")
    table.add_column("bal. acc", justify="right")
    for r in summary.results:
        text = Text(r.label) if r.label else Text(f"({r.status.replace('_', ' ')})", style="dim")
        table.add_row(str(r.feature_id), text, _fmt(r.auc), _fmt(r.shuffled_auc), _fmt(r.balanced_accuracy))
    return table


def register(app: typer.Typer) -> None:
    from xdiff_cli.findings.label import DEFAULT_LOCAL_MODEL

    app.command("label", help=LABEL_HELP.format(default=DEFAULT_LOCAL_MODEL, key_env="XDIFF_LABEL_API_KEY"))(label)
