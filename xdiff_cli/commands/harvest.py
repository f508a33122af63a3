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
) -> None:
    """Harvest token-aligned activations of two models into a run's activation store.

    Creates a new run (or continues `--run ID`); rerunning after an interruption resumes
    from the last complete shard.
    """
    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.runs import Run, resolve_run
    from xdiff_cli.settings import RunSettings

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


def _load_models(run):  # noqa: ANN001, ANN202 - Run -> (LoadedModel, LoadedModel)
    """Load both models of a run, recording where they came from (reused when already pulled)."""
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
            path, quant=info.get("quant", settings.quant), device=info.get("device", settings.device),
            dtype=info.get("dtype"), trust_remote_code=settings.trust_remote_code,
        )
        info = {**info, "quant": model.quant, "device": model.device, "dtype": model.dtype}
        run.set_model(side, info)
        loaded.append(model)
    return loaded[0], loaded[1]


def register(app: typer.Typer) -> None:
    app.command("harvest")(harvest)
