"""`xdiff run`, `xdiff runs`, `xdiff rm`, `xdiff presets`: parse, call `pipeline`, print."""

from __future__ import annotations

import sys

import typer

from xdiff_cli.settings import TRUST_REMOTE_CODE_HELP, cli_options

_STAGE_CHOICES = "pull, harvest, train or analyze"


RUN_SETTINGS = (
    "corpus", "tokens", "layer_a", "layer_b", "context_length", "dict_size", "k", "exclusive_frac", "arch",
    "steps", "batch_size", "lr", "quant", "device", "seed", "allow_pickle_weights",
)


@cli_options(*RUN_SETTINGS)
def run(
    model_a: str | None = typer.Argument(None, help="Model A: hub id (org/name[@rev]), local dir, or tiny:NAME."),
    model_b: str | None = typer.Argument(None, help="Model B: hub id (org/name[@rev]), local dir, or tiny:NAME."),
    preset: str | None = typer.Option(None, "--preset", help="Settings (and models) from presets/NAME.toml."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    name: str | None = typer.Option(None, "--name", help="Run id (default: a timestamp). Reusing it resumes."),
    restart_from: str | None = typer.Option(
        None, "--restart-from", help=f"Redo this stage and every later one ({_STAGE_CHOICES})."
    ),
    new: bool = typer.Option(False, "--new", help="Start a new run even if an identical one exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
    *,
    options: dict,
) -> None:
    """Pull two models, harvest aligned activations, train a DFC, analyse: one resumable run.

    Re-running the same command resumes the newest run with identical settings where it
    stopped (Ctrl-C is safe). `xdiff run --preset tiny` needs no network.
    """
    from xdiff_cli import paths, pipeline, stages
    from xdiff_cli import plan as planning
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.hardware import detect_hardware

    if restart_from is not None and restart_from not in stages.STAGE_NAMES:
        raise XdiffError(f"unknown stage {restart_from!r} for --restart-from", f"choose {_STAGE_CHOICES}")
    hardware = detect_hardware()
    resolved = planning.resolve_settings(model_a, model_b, preset_name=preset, options=options, hardware=hardware)
    for warning in resolved.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    plan = planning.make_plan(resolved, hardware)
    existing = pipeline.find_run(plan.settings, name=name, new=new)
    done_store = paths.dir_bytes(existing.store_dir) if existing is not None else 0
    planning.check_inputs(plan, done_store_bytes=done_store)
    print_plan(plan)
    if dry_run:
        return
    if existing is not None and existing.complete and restart_from is None:
        console.print(f"\nrun [bold]{existing.id}[/] with these settings is already complete "
                      f"(--new starts another, --restart-from STAGE redoes part of it)")
        print_summary(pipeline.summarize(existing))
        return
    run_ = existing or pipeline.create_run(plan, name, command=["xdiff", *sys.argv[1:]])
    with run_.lock():
        if restart_from is not None:
            stages.restart_from(run_, restart_from)
        if existing is not None:
            stage = stages.missing_stage(run_.stage_done, None)
            console.print(f"\n[bold]resuming[/] run [bold]{run_.id}[/] at stage [bold]{stage}[/]")
        else:
            console.print(f"\nnew run [bold]{run_.id}[/]")
        console.print(f"directory: {run_.dir}")

        def header(index: int, stage: str) -> None:
            title = stages.stage(stage).title
            console.rule(f"[bold][{index + 1}/{len(stages.STAGES)}] {title}", align="left")

        ctx = stages.StageContext(trust_remote_code=trust_remote_code, hardware=hardware, plan=plan)
        stages.run_stages(run_, ctx, on_stage=header)
    console.rule("[bold]done", align="left")
    print_summary(pipeline.summarize(run_))


def print_plan(plan) -> None:  # noqa: ANN001 - pipeline.Plan
    from rich.table import Table

    from xdiff_cli.console import console
    from xdiff_cli.formatting import format_bytes, format_count, format_duration

    s = plan.settings
    table = Table(show_header=False, box=None, pad_edge=False, title="[bold]plan", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if plan.preset is not None:
        table.add_row("preset", f"{plan.preset.name} — {plan.preset.description}")
    for side, facts, layer in (("A", plan.model_a, s.layer_a), ("B", plan.model_b, s.layer_b)):
        shape = ""
        if facts.d_model:
            params = f"{format_count(facts.n_params)} params, " if facts.n_params else ""
            shape = f"  ({params}d={facts.d_model}, {facts.n_layers} layers)"
        chosen = facts.layer(layer)
        table.add_row(f"model {side}", f"{facts.spec}{shape}")
        table.add_row(f"layer {side}", "middle (after pull)" if chosen is None else str(chosen))
    table.add_row("hardware", plan.hardware.describe() + (f", --device {s.device}" if s.device != "auto" else ""))
    table.add_row("precision", plan.precision)
    table.add_row("corpus", s.corpus)
    table.add_row("tokens", f"{s.tokens:,} aligned pairs (context {s.context_length})")
    dict_size = plan.dict_size
    n_ex = plan.n_exclusive
    dictionary = f"{dict_size:,} features" if dict_size else "32 x mean width"
    if s.arch == "dfc" and dict_size:
        dictionary += f" ({n_ex:,} A-only, {n_ex:,} B-only, {dict_size - 2 * n_ex:,} shared)"
    table.add_row("dictionary", f"{s.arch}: {dictionary}, k={s.k}")
    table.add_row("training", f"{s.steps:,} steps x batch {s.batch_size}, lr {s.lr:g}, seed {s.seed}")
    table.add_row("disk", f"{format_bytes(plan.disk_bytes)} of activations")
    times = plan.time_seconds()
    known = {k: v for k, v in times.items() if v is not None}
    if known:
        total = sum(known.values())
        parts = ", ".join(f"{k} {format_duration(v)}" for k, v in known.items())
        table.add_row("time (rough)", f"{format_duration(total)} + downloads ({parts})")
    console.print(table)
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")


def print_summary(summary) -> None:  # noqa: ANN001 - pipeline.Summary
    from rich.markup import escape
    from rich.table import Table

    from xdiff_cli.console import console
    from xdiff_cli.safe_text import inert

    m = summary.metrics

    def fmt(key: str, pct: bool = False) -> str:
        value = m.get(key)
        if value is None:
            return "?"
        return f"{100 * value:.1f}%" if pct else f"{value:.3f}"

    console.print(
        f"[bold]run {summary.run_id}[/]  FVE A {fmt('eval_fve_a') if 'eval_fve_a' in m else fmt('fve_a')}"
        f"  FVE B {fmt('eval_fve_b') if 'eval_fve_b' in m else fmt('fve_b')}"
        f"  L0 {fmt('eval_l0') if 'eval_l0' in m else fmt('l0')}  dead {fmt('dead_fraction', pct=True)}"
        + _dead_blocks_text(m)
    )
    for title, lines in (("only in model A", summary.top_a), ("only in model B", summary.top_b)):
        table = Table(title=f"[bold]top features {title}", title_justify="left", box=None)
        for col in ("id", "top token", "freq", "example"):
            table.add_column(col)
        for line in lines:
            table.add_row(str(line.id), escape(repr(line.top_token or "")), f"{line.frequency:.4f}",
                          escape(inert(line.snippet or "", one_line=True)))
        if not lines:
            table.add_row("-", "(none alive)", "", "")
        console.print(table)
    console.print(f"directory: {summary.run_dir}")
    console.print("[bold]next:[/]")
    for command in summary.next_commands:
        console.print(f"  {escape(command)}")


def runs(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List runs, newest first: id, models, created, stage, metrics, disk use."""
    import json

    from rich.markup import escape
    from rich.table import Table

    from xdiff_cli import pipeline
    from xdiff_cli.console import console
    from xdiff_cli.formatting import format_bytes
    from xdiff_cli.runs import scan_runs

    infos = [pipeline.run_info(r) for r in scan_runs()]
    if as_json:
        typer.echo(json.dumps(infos, indent=2))
        return
    if not infos:
        console.print("no runs yet — start one with `xdiff run MODEL_A MODEL_B` (or `xdiff run --preset tiny`)")
        return
    table = Table()
    for col in ("id", "models", "created", "stage", "FVE A/B", "disk"):
        table.add_column(col, justify="right" if col == "disk" else "left")
    for info in infos:
        m = info["metrics"]
        fve_a, fve_b = m.get("eval_fve_a", m.get("fve_a")), m.get("eval_fve_b", m.get("fve_b"))
        fve = f"{fve_a:.3f}/{fve_b:.3f}" if fve_a is not None and fve_b is not None else "-"
        models = f"{info['models']['a']}\nvs {info['models']['b']}" if "error" not in info else escape(info["error"])
        table.add_row(info["id"], models, (info["created"] or "")[:19].replace("T", " "), info["stage"], fve,
                      format_bytes(info["disk_bytes"]))
    console.print(table)


def rm(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run to delete (see `xdiff runs`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a run and every artifact in its directory (also a run whose run.json is corrupt)."""
    from xdiff_cli import paths
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.formatting import format_bytes
    from xdiff_cli.runs import remove_run, run_dir_for

    run_dir = run_dir_for(run_id)
    if not run_dir.is_dir():
        raise XdiffError(f"no run named {run_id!r}", "list runs with `xdiff runs`")
    if not yes:
        if not sys.stdin.isatty():
            raise XdiffError(f"not deleting run {run_id} without confirmation", "pass --yes")
        if not typer.confirm(f"delete run {run_id} ({format_bytes(paths.dir_bytes(run_dir))}) at {run_dir}?"):
            raise typer.Exit(1)
    removed = remove_run(run_id)
    console.print(f"deleted {removed}")


def presets(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List model-pair presets (`xdiff run --preset NAME`)."""
    import json

    from rich.markup import escape
    from rich.table import Table

    from xdiff_cli.console import console
    from xdiff_cli.presets import list_presets

    found = list_presets()
    if as_json:
        typer.echo(json.dumps([
            {"name": p.name, "model_a": p.model_a, "model_b": p.model_b, "description": p.description,
             "hardware": p.hardware, "settings": p.settings}
            for p in found
        ], indent=2))
        return
    table = Table()
    for col in ("name", "models", "description"):
        table.add_column(col)
    for p in found:
        table.add_row(p.name, f"{p.model_a}\nvs {p.model_b}", escape(p.description))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("runs")(runs)
    app.command("rm")(rm)
    app.command("presets")(presets)


def _dead_blocks_text(metrics: dict, prefix: str = "") -> str:
    from xdiff_cli.console import dead_blocks_text

    return dead_blocks_text(metrics, prefix)
