"""`xdiff harvest A B`: pull and harvest on their own (parse, run the stages, print).

Also the split harvest: `--shard I/N` harvests one part, `--merge` joins the parts, and under
torchrun each rank harvests one part and rank 0 merges them (xdiff_cli/data/parts.py).
"""

from __future__ import annotations

import typer

from xdiff_cli.run.settings import TRUST_REMOTE_CODE_HELP, cli_options

HARVEST_SETTINGS = (
    "corpus", "tokens", "store", "layer_a", "layer_b", "context_length", "harvest_batch_size", "eval_fraction",
    "quant", "device", "seed", "allow_pickle_weights",
)


@cli_options(*HARVEST_SETTINGS)
def harvest(
    model_a: str | None = typer.Argument(None, help="Model A: hub id (org/name[@rev]), local dir, or tiny:NAME."),
    model_b: str | None = typer.Argument(None, help="Model B: hub id (org/name[@rev]), local dir, or tiny:NAME."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    name: str | None = typer.Option(None, "--name", help="Name of the new run (default: a timestamp)."),
    run_id: str | None = typer.Option(None, "--run", help="Continue (resume) the harvest of this existing run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    shard: str | None = typer.Option(
        None, "--shard", help="Harvest only part I of N (0-based, e.g. 0/4) into the run; join the parts with --merge."
    ),
    merge: bool = typer.Option(False, "--merge", help="Join the parts harvested with --shard into the run's store."),
    *,
    options: dict,
) -> None:
    """Harvest token-aligned activations of two models into a run's activation store.

    Creates a new run (or continues `--run ID`); rerunning after an interruption resumes
    from the last complete shard. The models are pulled first (the run's pull stage).
    Under `torchrun --nproc-per-node N -m xdiff_cli -- harvest ...` each rank harvests one
    part and rank 0 merges them.
    """
    from xdiff_cli.console import console
    from xdiff_cli.data.parts import Part
    from xdiff_cli.dfc import distributed
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.run import stages

    part = Part.parse(shard) if shard is not None else None  # bad values fail before anything loads
    if merge and part is not None:
        raise XdiffError("--merge joins the parts; --shard harvests one of them", "use one or the other")
    if options.get("store") and (part is not None or merge or distributed.launched()):
        raise XdiffError("--store uses a store harvested elsewhere: there is nothing to split or merge",
                         "drop --shard/--merge (and run it as one process)")
    dist = distributed.init_from_env(cuda=False) if distributed.launched() and not merge else None
    if dist is not None and part is not None:
        raise XdiffError("under torchrun the parts come from RANK/WORLD_SIZE", "drop --shard")
    main = dist is None or dist.is_main
    if not main:
        console.quiet = True
    split = part is not None or dist is not None or merge  # several processes may name one run
    run = _the_run(model_a, model_b, name, run_id, options, join=split, merge=merge) if main else None
    if dist is not None:
        from xdiff_cli.run.runs import load_run

        run = load_run(dist.broadcast_object(run.id if main else None))
    console.print(f"run [bold]{run.id}[/]  {run.dir}")
    ctx = stages.StageContext(progress=not quiet and main, trust_remote_code=trust_remote_code, dist=dist, merge=merge)
    if part is not None:
        _harvest_one_part(run, ctx, part)
        return
    if not main:
        stages.run_rank_stage(run, "harvest", ctx)  # rank 0 holds the lock and marks (see there)
        return
    # One process, `--merge`, or rank 0 of a torchrun world (the stage runs for the world).
    stages.run_stages(run, ctx, first="harvest" if merge else None, through="harvest", rerun=("harvest",))

    store = run.open_store()
    manifest = store.manifest
    console.print(f"activation store: {store.location}")
    merged = f" merged from {manifest['merged_parts']} parts" if manifest.get("merged_parts") else ""
    console.print(
        f"{store.n_tokens:,} aligned token pairs{merged} (layer {manifest['layer_a']} of A, {manifest['layer_b']} of B), "
        f"aligned fraction {manifest['aligned_fraction']:.1%}, "
        f"train/eval tokens {store.split('train').n_tokens:,}/{store.split('eval').n_tokens:,}"
    )


def _the_run(model_a, model_b, name, run_id, options, *, join: bool, merge: bool):  # noqa: ANN001, ANN202 -> Run
    """`--run ID`, or a new run from the models and options.

    With `join` (a part, a rank, a merge), `--name` of a run with the same settings is joined
    rather than refused: every part of a split harvest names the same run. `--merge --name N`
    without models joins run N."""
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.run.runs import Run, load_run
    from xdiff_cli.run.settings import RunSettings

    if run_id is not None:
        if model_a or model_b or options:
            raise XdiffError("--run continues an existing run with its recorded settings", "drop the other arguments")
        return load_run(run_id)
    if merge and name and not (model_a or model_b or options):
        return load_run(name)
    if not model_a or not model_b:
        raise XdiffError("harvest needs two models", "xdiff harvest MODEL_A MODEL_B [--corpus ...] (or --run ID)")
    settings = RunSettings(model_a=model_a, model_b=model_b).updated(**options).validate()
    from xdiff_cli.data.corpus import check_corpus

    check_corpus(settings.corpus)  # fail before loading any model
    if not join or name is None:
        return Run.create(settings, name)
    try:
        return Run.create(settings, name)
    except (XdiffError, FileExistsError):
        pass
    # Another part (a SLURM array task, another machine) created it: join it if it is the same harvest.
    run = load_run(name)
    if run.settings.to_dict() != settings.to_dict():
        raise XdiffError(f"run {name!r} exists with other settings", "use the same arguments for every part, or another --name")
    return run


def _harvest_one_part(run, ctx, part) -> None:  # noqa: ANN001 - Run, StageContext, parts.Part
    """`--shard I/N`: pull (once per run), then harvest this part only.

    The pull stage runs through the stage runner under the run lock; parts that start
    together wait for the one pulling. The part itself holds only its own lock
    (`harvest.harvest_part`), so the parts of a run can be harvested at the same time; the
    harvest stage is marked done by `--merge`."""
    import time

    from xdiff_cli.console import console, err_console
    from xdiff_cli.data.harvest import harvest_part
    from xdiff_cli.locks import LockBusy
    from xdiff_cli.run import stages
    waiting = False
    while not run.stage_done("pull"):
        try:
            stages.run_stages(run, ctx, through="pull")
        except LockBusy as exc:
            if not waiting:
                err_console.print(f"[dim]waiting for the pull: {exc.message}[/]")
                waiting = True
            time.sleep(2)
        run = run.reload()
    path = harvest_part(run, ctx, part)
    from xdiff_cli.atomic import read_json

    n = read_json(path / "manifest.json", "part manifest")["n_tokens"]
    console.print(f"part {part.spec}: {n:,} aligned token pairs in {path}")
    console.print(f"when every part is done: xdiff harvest --merge --run {run.id}")


def register(app: typer.Typer) -> None:
    app.command("harvest")(harvest)
