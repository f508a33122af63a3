"""`xdiff train`: the train stage on its own (parse, run the stage, print)."""

from __future__ import annotations

import typer

from xdiff_cli.commands.common import RUN_HELP
from xdiff_cli.run.settings import cli_options

# Settings whose change makes an existing crosscoder (and everything after it) stale.
TRAIN_SETTINGS = ("steps", "batch_size", "lr", "precision", "dict_size", "k", "exclusive_frac", "arch", "device", "seed")


@cli_options(*TRAIN_SETTINGS)
def train(
    run_id: str | None = typer.Option(None, "--run", help=RUN_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    *,
    options: dict,
) -> None:
    """Train the run's crosscoder on its harvested activations (resumes from the last checkpoint).

    Options given here replace the run's recorded settings; if they change an already trained crosscoder's settings, it is trained again from scratch.
    Under `torchrun --nproc-per-node N -m xdiff_cli -- train ...` the ranks train one crosscoder data-parallel.
    """
    from xdiff_cli.commands.common import pick_run
    from xdiff_cli.console import console
    from xdiff_cli.dfc import distributed
    from xdiff_cli.run import stages

    run = pick_run(run_id, needs="harvest")
    new = run.settings.updated(**options).validate()
    dist = None
    if distributed.launched():  # under torchrun: one rank of a data-parallel world (nccl on GPUs)
        import torch

        dist = distributed.init_from_env(cuda=new.device != "cpu" and torch.cuda.is_available())
    ctx = stages.StageContext(progress=not quiet and (dist is None or dist.is_main), dist=dist)
    if dist is not None and not dist.is_main:
        # Rank 0 records the settings, holds the lock and marks the stage; `training.train_stage`
        # makes this rank wait for it before reading the run.
        console.quiet = True
        stages.run_rank_stage(run, "train", ctx)
        return
    with run.lock():
        if new != run.settings:
            # The recorded crosscoder no longer matches the settings: retrain, and let analysis redo.
            run.update_settings(new)
            stages.restart_from(run, "train")
        stages.run_stages(run, ctx, first="train", through="train", rerun=("train",))
    m = run.metrics
    console.print(f"run [bold]{run.id}[/]  {run.dir}")
    console.print(
        f"FVE A {m.get('fve_a', float('nan')):.3f}  FVE B {m.get('fve_b', float('nan')):.3f}  "
        f"L0 {m.get('l0', float('nan')):.1f}  dead {m.get('dead_fraction', float('nan')):.1%}"
        + _dead_blocks_text(m)
    )
    console.print(f"crosscoder: {run.crosscoder_dir / 'final'}")
    console.print(f"checkpoints: {run.crosscoder_dir / 'checkpoints'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def _dead_blocks_text(metrics: dict, prefix: str = "") -> str:
    from xdiff_cli.console import dead_blocks_text

    return dead_blocks_text(metrics, prefix)
