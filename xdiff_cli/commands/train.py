"""`xdiff train`: the train stage on its own (parse, call `training.train_run`, print)."""

from __future__ import annotations

import typer

from xdiff_cli.settings import help_for

# Settings whose change makes an existing crosscoder (and everything after it) stale.
TRAIN_SETTINGS = ("steps", "batch_size", "lr", "dict_size", "k", "exclusive_frac", "arch", "device", "seed")


def train(
    run_id: str | None = typer.Option(None, "--run", help="Run to train (default: the newest)."),
    steps: int | None = typer.Option(None, "--steps", help=help_for("steps")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=help_for("batch_size")),
    lr: float | None = typer.Option(None, "--lr", help=help_for("lr")),
    dict_size: int | None = typer.Option(None, "--dict-size", help=help_for("dict_size")),
    k: int | None = typer.Option(None, "--k", help=help_for("k")),
    exclusive_frac: float | None = typer.Option(None, "--exclusive-frac", help=help_for("exclusive_frac")),
    arch: str | None = typer.Option(None, "--arch", help=help_for("arch")),
    device: str | None = typer.Option(None, "--device", help=help_for("device")),
    seed: int | None = typer.Option(None, "--seed", help=help_for("seed")),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train the run's crosscoder on its harvested activations (resumes from the last checkpoint).

    Options given here replace the run's recorded settings; if they change an already trained crosscoder's settings, it is trained again from scratch.
    """
    import shutil

    from xdiff_cli.console import console
    from xdiff_cli.errors import XdiffError
    from xdiff_cli.runs import resolve_run

    run = resolve_run(run_id)
    if not (run.store_dir / "manifest.json").is_file() or not run.stage_done("harvest"):
        from xdiff_cli.store import ActivationStore

        try:
            ActivationStore.open(run.store_dir)
        except XdiffError as exc:
            raise XdiffError(f"run {run.id} has no complete activation store", "run `xdiff harvest` first") from exc
    changes = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "dict_size": dict_size, "k": k,
        "exclusive_frac": exclusive_frac, "arch": arch, "device": device, "seed": seed,
    }
    old = run.settings
    new = old.updated(**changes).validate()
    if any(getattr(old, name) != getattr(new, name) for name in TRAIN_SETTINGS):
        # The recorded crosscoder no longer matches the settings: retrain, and let analysis redo.
        shutil.rmtree(run.crosscoder_dir, ignore_errors=True)
        run.clear_stages_from("train")
        run.record["settings"] = new.to_dict()
        run.save()
    console.print(f"run [bold]{run.id}[/]  {run.dir}")
    from xdiff_cli.training import train_run

    run.mark_stage("train", "running")
    try:
        result = train_run(run, progress=not quiet)
    except BaseException as exc:
        run.mark_stage("train", "failed" if isinstance(exc, Exception) else "interrupted", error=str(exc))
        raise
    run.mark_stage("train", "done")
    console.print(
        f"FVE A {result.fve_a:.3f}  FVE B {result.fve_b:.3f}  L0 {result.l0:.1f}  dead {result.dead_fraction:.1%}"
        + _dead_blocks_text(result.dead_blocks)
    )
    console.print(f"crosscoder: {result.final_dir}")
    console.print(f"checkpoints: {result.out_dir / 'checkpoints'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def _dead_blocks_text(metrics: dict, prefix: str = "") -> str:
    from xdiff_cli.console import dead_blocks_text

    return dead_blocks_text(metrics, prefix)
