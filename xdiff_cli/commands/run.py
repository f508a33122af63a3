"""`xdiff run`, `xdiff runs`, `xdiff rm`, `xdiff presets`: parse, call `pipeline`, print."""

from __future__ import annotations

import sys

import typer

from xdiff_cli.run.settings import TRUST_REMOTE_CODE_HELP, cli_options

_STAGE_CHOICES = "pull, harvest, train, analyze or verify"


RUN_SETTINGS = (
    "corpus", "tokens", "store", "layer_a", "layer_b", "context_length", "dict_size", "k", "exclusive_frac", "arch",
    "steps", "batch_size", "lr", "precision", "quant", "device", "seed", "allow_pickle_weights",
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
    label: bool = typer.Option(False, "--label", help="Then label the top 20 candidates (as `xdiff label`)."),
    label_model: str | None = typer.Option(None, "--label-model", help="Labeller for --label (see `xdiff label --model`)."),
    label_endpoint: str | None = typer.Option(
        None, "--label-endpoint", help="OpenAI-compatible URL for --label (see `xdiff label --endpoint`)."
    ),
    null: str | None = typer.Option(
        None, "--null", metavar="MODEL",
        help="Null control: MODEL against itself (same text, seed + 1); every exclusive feature is a false positive.",
    ),
    *,
    options: dict,
) -> None:
    """Pull two models, harvest aligned activations, train a DFC, analyse: one resumable run.

    Re-running the same command resumes the newest run with identical settings where it
    stopped (Ctrl-C is safe). `xdiff run --preset tiny` needs no network.
    """
    from xdiff_cli import paths
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.run import pipeline, stages
    from xdiff_cli.run import plan as planning
    from xdiff_cli.run.hardware import detect_hardware

    if null is not None:
        if model_a is not None or model_b is not None:
            raise XdiffError("--null takes the one model to compare with itself", "drop the positional models")
        model_a = model_b = null
        options = {**options, "seed": (options.get("seed") or 0) + 1}
    if restart_from is not None and restart_from not in stages.STAGE_NAMES:
        raise XdiffError(f"unknown stage {restart_from!r} for --restart-from", f"choose {_STAGE_CHOICES}")
    hardware = detect_hardware()
    resolved = planning.resolve_settings(model_a, model_b, preset_name=preset, options=options, hardware=hardware)
    for warning in resolved.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    plan = planning.make_plan(resolved, hardware, check=not dry_run)
    existing = pipeline.find_run(plan.settings, name=name, new=new)
    done_store = paths.dir_bytes(existing.store_dir) if existing is not None else 0
    if not dry_run:
        planning.check_inputs(plan, done_store_bytes=done_store)
    else:  # bad inputs still fail; a disk too small for the plan is a warning beside the plan
        planning.check_inputs(plan, done_store_bytes=plan.disk_bytes or 0)
        try:
            paths.check_free_space(paths.runs_root(), (plan.disk_bytes or 0) - done_store, "the activation store")
        except XdiffError as exc:
            plan.warnings.append(str(exc))
    print_plan(plan)
    for warning in [w for w in plan.warnings if w not in resolved.warnings]:
        console.print(f"[yellow]warning:[/] {warning}")
    infeasible = feasibility_warning(plan)
    if infeasible:
        console.print(f"[yellow]warning:[/] {infeasible}")
    if dry_run:
        return
    if existing is not None and stages.missing_stage(existing.stage_done, None) is None and restart_from is None:
        console.print(f"\nrun [bold]{existing.id}[/] with these settings is already complete "
                      f"(--new starts another, --restart-from STAGE redoes part of it)")
        print_summary(pipeline.summarize(existing))
        if label:
            label_after_run(existing, model=label_model, endpoint=label_endpoint)
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
    print_verify_summary(run_)
    if label:
        label_after_run(run_, model=label_model, endpoint=label_endpoint)


def label_after_run(run_, *, model: str | None, endpoint: str | None) -> None:  # noqa: ANN001 - runs.Run
    """`xdiff run --label`: the optional label stage, after analysis (resumable, cached)."""
    from xdiff_cli.commands.label import label_with_progress

    label_with_progress(run_, model=model, endpoint=endpoint, partition="candidates", limit=20,
                        device=run_.settings.device or "auto")


FEASIBLE_SECONDS = 2 * 24 * 3600  # more compute than this on this machine is "not feasible here"


def feasibility_warning(plan) -> str | None:  # noqa: ANN001 - pipeline.Plan
    """A plain warning when the plan's compute estimate is days on this machine (e.g. 100M
    tokens of an 8B pair on a CPU), with the estimate and what to change."""
    from xdiff_cli.run.formatting import format_duration

    known = [v for v in plan.time_seconds().values() if v is not None]
    if not known or sum(known) <= FEASIBLE_SECONDS:
        return None
    s = plan.settings
    return (f"{s.tokens:,} token pairs of this pair is not feasible here: {format_duration(sum(known))} "
            f"of compute on {plan.hardware.describe()} — use a GPU (`xdiff plan {s.model_a} {s.model_b} "
            f"--gpu-memory 24` shows the fit), fewer --tokens/--steps, or a smaller pair (`--preset small`)")


def print_verify_summary(run) -> None:  # noqa: ANN001 - runs.Run
    from xdiff_cli.commands.verify import summary_lines
    from xdiff_cli.console import console
    from xdiff_cli.findings.verify import verify_meta

    meta = verify_meta(run.analysis_path) if run.analysis_path.is_file() else None
    for line in summary_lines(run.id, meta) if meta else []:
        console.print(line, highlight=False)


def print_plan(plan) -> None:  # noqa: ANN001 - pipeline.Plan
    from rich.markup import escape
    from rich.table import Table

    from xdiff_cli.console import console
    from xdiff_cli.run.formatting import format_bytes, format_count, format_duration

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
    if s.store:  # harvested elsewhere: its manifest says what it holds
        table.add_row("store", f"{escape(s.store)} (harvested elsewhere, streamed through the cache)")
    else:
        table.add_row("corpus", s.corpus)
        table.add_row("tokens", f"{s.tokens:,} aligned pairs (context {s.context_length})")
    dict_size = plan.dict_size
    n_ex = plan.n_exclusive
    dictionary = f"{dict_size:,} features" if dict_size else "32 x mean width"
    if s.arch == "dfc" and dict_size:
        dictionary += f" ({n_ex:,} A-only, {n_ex:,} B-only, {dict_size - 2 * n_ex:,} shared)"
    table.add_row("dictionary", f"{s.arch}: {dictionary}, k={s.k}")
    precision = f", {s.precision}" if s.precision != "auto" else ""
    table.add_row("training", f"{s.steps:,} steps x batch {s.batch_size}, lr {s.lr:g}, seed {s.seed}{precision}")
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
    analysis = summary.run_dir / "analysis.sqlite"
    if analysis.is_file():  # dead exclusive features must not hide behind one overall percentage
        from xdiff_cli.commands.analyze import live_counts_line
        from xdiff_cli.findings.feature_index import FeatureIndex

        index = FeatureIndex.open(analysis)
        try:
            console.print(live_counts_line(index.block_counts()))
        finally:
            index.close()
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

    from xdiff_cli.console import console
    from xdiff_cli.run import pipeline
    from xdiff_cli.run.formatting import format_bytes
    from xdiff_cli.run.runs import scan_runs
    from xdiff_cli.safe_text import inert

    infos = [pipeline.run_info(r) for r in scan_runs()]
    if as_json:
        typer.echo(json.dumps(infos, indent=2))
        return
    if not infos:
        console.print("no runs yet — start one with `xdiff run MODEL_A MODEL_B` (or `xdiff run --preset tiny`)")
        return
    from rich import box

    # ids and numbers never wrap or truncate. Below 100 columns the creation time (the id
    # starts with it by default) makes room and the models go under the run's id, where a
    # model id fits whole beside the stage and numbers.
    narrow = console.width < 100
    columns = ("id", "models", "created", "stage", "FVE A/B", "disk")
    if narrow:
        columns = ("id", "stage", "FVE A/B", "disk")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for col in columns:
        table.add_column("id / models" if narrow and col == "id" else col, justify="right" if col == "disk" else "left",
                         no_wrap=col != "models" and not (narrow and col == "id"), overflow="fold",
                         min_width=12 if col == "models" else None)
    for info in infos:
        m = info["metrics"]
        fve_a, fve_b = m.get("eval_fve_a", m.get("fve_a")), m.get("eval_fve_b", m.get("fve_b"))
        fve = f"{fve_a:.3f}/{fve_b:.3f}" if fve_a is not None and fve_b is not None else "-"
        # Model names come from run.json (any text a user or a tool wrote): inert, and no markup.
        models = (escape(inert(f"{info['models']['a']}", one_line=True)) + "\nvs "
                  + escape(inert(f"{info['models']['b']}", one_line=True))) if "error" not in info \
            else escape(inert(info["error"], one_line=True))
        cells = {"id": info["id"], "models": models, "created": (info["created"] or "")[:19].replace("T", " "),
                 "stage": info["stage"], "FVE A/B": fve, "disk": format_bytes(info["disk_bytes"])}
        if narrow:
            cells["id"] = f"{info['id']}\n A " + models.replace("\nvs ", "\n B ") if "error" not in info \
                else f"{info['id']}\n {models}"
        table.add_row(*(cells[c] for c in columns))
    console.print(table)


def rm(
    run_id: str = typer.Argument(..., metavar="RUN", help="The run to delete (see `xdiff runs`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a run and every artifact in its directory (also a run whose run.json is corrupt)."""
    from xdiff_cli import paths
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.run.formatting import format_bytes
    from xdiff_cli.run.runs import remove_run, run_dir_for

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
    from xdiff_cli.run.presets import list_presets

    found = list_presets()
    if as_json:
        typer.echo(json.dumps([
            {"name": p.name, "model_a": p.model_a, "model_b": p.model_b, "description": p.description,
             "hardware": p.hardware, "settings": p.settings}
            for p in found
        ], indent=2))
        return
    table = Table()
    longest_id = max((len(m) + 3 for p in found for m in (p.model_a, p.model_b)), default=10)
    table.add_column("name", no_wrap=True, min_width=max((len(p.name) for p in found), default=4))
    # Model ids are never cut: below this width the description goes under the models.
    stacked = console.width < 3 * longest_id
    table.add_column("models" + (" / description" if stacked else ""), overflow="fold", min_width=longest_id)
    if not stacked:
        table.add_column("description", overflow="fold")
    for p in found:
        models = f"{p.model_a}\nvs {p.model_b}"
        if stacked:
            table.add_row(p.name, f"{escape(models)}\n[dim]{escape(p.description)}[/dim]")
        else:
            table.add_row(p.name, escape(models), escape(p.description))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("runs")(runs)
    app.command("rm")(rm)
    app.command("presets")(presets)


def _dead_blocks_text(metrics: dict, prefix: str = "") -> str:
    from xdiff_cli.console import dead_blocks_text

    return dead_blocks_text(metrics, prefix)
