"""`xdiff harvest A B`: pull and harvest on their own (parse, run the stages, print)."""

from __future__ import annotations

import typer

from xdiff_cli.settings import TRUST_REMOTE_CODE_HELP, cli_options

HARVEST_SETTINGS = (
    "corpus", "tokens", "layer_a", "layer_b", "context_length", "harvest_batch_size", "eval_fraction",
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
    *,
    options: dict,
) -> None:
    """Harvest token-aligned activations of two models into a run's activation store.

    Creates a new run (or continues `--run ID`); rerunning after an interruption resumes
    from the last complete shard. The models are pulled first (the run's pull stage).
    """
    from xdiff_cli import stages
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.runs import Run, load_run
    from xdiff_cli.settings import RunSettings

    if run_id is not None:
        if model_a or model_b or options:
            raise XdiffError("--run continues an existing run with its recorded settings", "drop the other arguments")
        run = load_run(run_id)
    else:
        if not model_a or not model_b:
            raise XdiffError("harvest needs two models", "xdiff harvest MODEL_A MODEL_B [--corpus ...] (or --run ID)")
        settings = RunSettings(model_a=model_a, model_b=model_b).updated(**options).validate()
        from xdiff_cli.corpus import check_corpus

        check_corpus(settings.corpus)  # fail before loading any model
        run = Run.create(settings, name)
    console.print(f"run [bold]{run.id}[/]  {run.dir}")
    ctx = stages.StageContext(progress=not quiet, trust_remote_code=trust_remote_code)
    stages.run_stages(run, ctx, through="harvest", rerun=("harvest",))

    from xdiff_cli.store import ActivationStore

    store = ActivationStore.open(run.store_dir)
    manifest = store.manifest
    console.print(f"activation store: {store.dir}")
    console.print(
        f"{store.n_tokens:,} aligned token pairs (layer {manifest['layer_a']} of A, {manifest['layer_b']} of B), "
        f"aligned fraction {manifest['aligned_fraction']:.1%}, "
        f"train/eval tokens {store.split('train').n_tokens:,}/{store.split('eval').n_tokens:,}"
    )


def register(app: typer.Typer) -> None:
    app.command("harvest")(harvest)
