"""`xdiff harvest A B`: the harvest stage on its own (parse, call `harvest.harvest_run`, print)."""

from __future__ import annotations

import typer

from xdiff_cli.settings import help_for


def harvest(
    model_a: str | None = typer.Argument(None, help="Model A: hub id (org/name[@rev]), local dir, or tiny:NAME."),
    model_b: str | None = typer.Argument(None, help="Model B: hub id (org/name[@rev]), local dir, or tiny:NAME."),
    corpus: str | None = typer.Option(None, "--corpus", help=help_for("corpus")),
    tokens: int | None = typer.Option(None, "--tokens", help=help_for("tokens")),
    layer_a: int | None = typer.Option(None, "--layer-a", help=help_for("layer_a")),
    layer_b: int | None = typer.Option(None, "--layer-b", help=help_for("layer_b")),
    context_length: int | None = typer.Option(None, "--context-length", help=help_for("context_length")),
    batch_size: int | None = typer.Option(None, "--harvest-batch-size", help=help_for("harvest_batch_size")),
    eval_fraction: float | None = typer.Option(None, "--eval-fraction", help=help_for("eval_fraction")),
    quant: str | None = typer.Option(None, "--quant", help=help_for("quant")),
    device: str | None = typer.Option(None, "--device", help=help_for("device")),
    seed: int | None = typer.Option(None, "--seed", help=help_for("seed")),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=help_for("trust_remote_code")),
    name: str | None = typer.Option(None, "--name", help="Name of the new run (default: a timestamp)."),
    run_id: str | None = typer.Option(None, "--run", help="Continue (resume) the harvest of this existing run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    shard: str | None = typer.Option(
        None, "--shard", help="Harvest only part I of N (0-based, e.g. 0/4) into the run; join the parts with --merge."
    ),
    merge: bool = typer.Option(False, "--merge", help="Join the parts harvested with --shard into the run's store."),
) -> None:
    """Harvest token-aligned activations of two models into a run's activation store.

    Creates a new run (or continues `--run ID`); rerunning after an interruption resumes
    from the last complete shard. Under `torchrun --nproc-per-node N -m xdiff_cli harvest`
    each rank harvests one part and rank 0 merges them.
    """
    from xdiff_cli import distributed
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.runs import Run, resolve_run
    from xdiff_cli.settings import RunSettings

    if shard is not None or merge or distributed.launched():
        return _harvest_parts(
            model_a, model_b, name, run_id, shard, merge, quiet,
            {"corpus": corpus, "tokens": tokens, "layer_a": layer_a, "layer_b": layer_b,
             "context_length": context_length, "harvest_batch_size": batch_size, "eval_fraction": eval_fraction,
             "quant": quant, "device": device, "seed": seed, "trust_remote_code": trust_remote_code or None},
        )
    changes = {
        "corpus": corpus, "tokens": tokens, "layer_a": layer_a, "layer_b": layer_b,
        "context_length": context_length, "harvest_batch_size": batch_size, "eval_fraction": eval_fraction,
        "quant": quant, "device": device, "seed": seed, "trust_remote_code": trust_remote_code or None,
    }
    if run_id is not None:
        if model_a or model_b or any(v is not None for v in changes.values()):
            raise XdiffError("--run continues an existing run with its recorded settings", "drop the other arguments")
        run = resolve_run(run_id)
    else:
        if not model_a or not model_b:
            raise XdiffError("harvest needs two models", "xdiff harvest MODEL_A MODEL_B [--corpus ...] (or --run ID)")
        settings = RunSettings(model_a=model_a, model_b=model_b).updated(**changes).validate()
        from xdiff_cli.corpus import check_corpus

        check_corpus(settings.corpus)  # fail before loading any model
        run = Run.create(settings, name)
    console.print(f"run [bold]{run.id}[/]  {run.dir}")
    loaded_a, loaded_b = _load_models(run)
    from xdiff_cli.harvest import harvest_run

    store = harvest_run(run, loaded_a, loaded_b, progress=not quiet)
    manifest = store.manifest
    console.print(f"activation store: {store.dir}")
    console.print(
        f"{store.n_tokens:,} aligned token pairs (layer {manifest['layer_a']} of A, {manifest['layer_b']} of B), "
        f"aligned fraction {manifest['aligned_fraction']:.1%}, "
        f"train/eval shards {store.split('train').num_shards}/{store.split('eval').num_shards}"
    )


def _load_models(run, device=None):  # noqa: ANN001, ANN202 - Run -> (LoadedModel, LoadedModel)
    """Load both models of a run, recording where they came from (reused when already pulled).

    `device` overrides the recorded one (each torchrun rank loads onto its own GPU)."""
    from pathlib import Path

    from xdiff_cli.loading import load_model
    from xdiff_cli.pipeline import fetch

    settings = run.settings
    loaded = []
    for side, spec in (("a", settings.model_a), ("b", settings.model_b)):
        info = run.record.get("models", {}).get(side)
        if info and Path(info.get("path", "")).is_dir():
            path = Path(info["path"])
        else:
            _, path, repo_id, revision = fetch(spec, settings, token=None)
            info = {
                "spec": spec, "path": str(path), "repo_id": repo_id, "revision": revision,
                "quant": settings.quant, "device": settings.device,
            }
        model = load_model(
            path, quant=info.get("quant", settings.quant), device=device or info.get("device", settings.device),
            dtype=info.get("dtype"), trust_remote_code=settings.trust_remote_code,
        )
        info = {**info, "quant": model.quant, "device": model.device, "dtype": model.dtype}
        run.set_model(side, info)
        loaded.append(model)
    return loaded[0], loaded[1]


def _part_run(model_a, model_b, name, run_id, changes):  # noqa: ANN001, ANN202
    """The run a part harvests into: `--run ID`, or `--name` created by the first part to get there."""
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.runs import Run, resolve_run
    from xdiff_cli.settings import RunSettings

    if run_id is not None:
        if model_a or model_b or any(v is not None for v in changes.values()):
            raise XdiffError("--run continues an existing run with its recorded settings", "drop the other arguments")
        return resolve_run(run_id)
    if not model_a or not model_b:
        raise XdiffError("harvest needs two models", "xdiff harvest MODEL_A MODEL_B --name NAME --shard I/N (or --run ID)")
    settings = RunSettings(model_a=model_a, model_b=model_b).updated(**changes).validate()
    from xdiff_cli.corpus import check_corpus

    check_corpus(settings.corpus)
    try:
        return Run.create(settings, name)
    except (XdiffError, FileExistsError):
        if name is None:
            raise
    # Another part (a SLURM array task, another machine) created it: join it if it is the same harvest.
    run = resolve_run(name)
    if run.settings.to_dict() != settings.to_dict():
        raise XdiffError(f"run {name!r} exists with other settings", "use the same arguments for every part, or another --name")
    return run


def _harvest_parts(model_a, model_b, name, run_id, shard, merge, quiet, changes) -> None:  # noqa: ANN001
    """`--shard I/N`, `--merge`, or one rank under torchrun (rank 0 merges after a barrier)."""
    from xdiff_cli import distributed
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.harvest import harvest_run
    from xdiff_cli.parts import Part, merge_parts
    from xdiff_cli.runs import resolve_run

    part = Part.parse(shard) if shard is not None else None  # bad values fail before anything loads
    if merge and part is not None:
        raise XdiffError("--merge joins the parts; --shard harvests one of them", "use one or the other")
    dist = distributed.init_from_env(cuda=False) if distributed.launched() and not merge else None
    if dist is not None:
        if part is not None:
            raise XdiffError("under torchrun the parts come from RANK/WORLD_SIZE", "drop --shard")
        part = Part(dist.rank, dist.world)
        if not dist.is_main:
            console.quiet = True
    if merge:
        run = _part_run(model_a, model_b, name, run_id, changes) if (model_a or model_b) else resolve_run(run_id or name)
    elif dist is None or dist.is_main:
        run = _part_run(model_a, model_b, name, run_id, changes)
    if dist is not None:
        run = resolve_run(dist.broadcast_object(run.id if dist.is_main else None))
    console.print(f"run [bold]{run.id}[/]  {run.dir}")
    if not merge:
        device = None
        if dist is not None:
            import torch

            wanted = run.settings.device
            if torch.cuda.is_available() and wanted != "cpu":
                device = f"cuda:{dist.local_rank}"
        if dist is not None and not dist.is_main:
            dist.barrier()  # rank 0 downloads first; the others find the models in the cache
            run = resolve_run(run.id)
        loaded_a, loaded_b = _load_models(run, device=device)
        if dist is not None and dist.is_main:
            dist.barrier()
        path = harvest_run(run, loaded_a, loaded_b, progress=not quiet and (dist is None or dist.is_main), part=part)
        from xdiff_cli.store import ActivationStore

        n = ActivationStore.open(path).n_tokens
        console.print(f"part {part.spec}: {n:,} aligned token pairs in {path}")
        if dist is None:
            console.print(f"when every part is done: xdiff harvest --merge --run {run.id}")
            return
        dist.barrier()  # every part is complete
        if not dist.is_main:  # wait for rank 0's merge (and fail with it)
            error = dist.broadcast_object(None)
            if error:
                raise XdiffError(error)
            return
    try:
        store = merge_parts(run.store_dir, eval_fraction=run.settings.eval_fraction)
    except XdiffError as exc:
        if dist is not None:
            dist.broadcast_object(str(exc))
        raise
    run.set_metrics(aligned_fraction=store.manifest["aligned_fraction"], harvested_tokens=store.n_tokens)
    if dist is not None:
        dist.broadcast_object("")  # the merged store exists before any rank exits
    console.print(f"activation store: {store.dir}")
    console.print(
        f"{store.n_tokens:,} aligned token pairs merged from {store.manifest['merged_parts']} parts, "
        f"aligned fraction {store.manifest['aligned_fraction']:.1%}, "
        f"train/eval shards {store.split('train').num_shards}/{store.split('eval').num_shards}"
    )


def register(app: typer.Typer) -> None:
    app.command("harvest")(harvest)
