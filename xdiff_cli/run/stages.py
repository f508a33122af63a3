"""The stage table and the one stage runner.

Every way of running a stage — `xdiff run`, `xdiff harvest`, `xdiff train`, `xdiff analyze`
and the TUI — goes through `run_stage`/`run_stages` here, so marking (running → done |
failed | interrupted), resuming (skip what is done) and restarting (delete a stage's
artifacts and every later stage's) happen in one place, under the run's lock.

Adding a stage is one new module with a function `my_stage(run: Run, ctx: StageContext)`
plus one `Stage(...)` line in `STAGES` (see docs/ARCHITECTURE.md, "Adding a stage"). The
function is imported only when the stage runs, so this module stays import-light.

A stage function reads its inputs from the run (`run.settings`, `run.models`, earlier
stages' artifacts), writes its artifacts under `run.dir`, may record metrics with
`run.set_metrics`, and never marks itself: the runner does, after it returns.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xdiff_cli import paths
from xdiff_cli.errors import XdiffError

if TYPE_CHECKING:
    from xdiff_cli.run.runs import Run


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # the header `xdiff run` prints
    function: str  # "module:function", called as function(run, ctx)
    artifacts: tuple[str, ...]  # paths under the run dir it writes; deleted when it restarts
    command: str  # the command that (re)runs it alone; "{run}" is the run id

    def load(self) -> Callable[[Run, StageContext], Any]:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


# The pipeline, in order. One line per stage.
STAGES: tuple[Stage, ...] = (
    Stage("pull", "pull models", "xdiff_cli.models.pull:pull_stage", (), "xdiff harvest --run {run}"),
    Stage("harvest", "harvest aligned activations", "xdiff_cli.data.harvest:harvest_stage", ("activations",),
          "xdiff harvest --run {run}"),
    Stage("train", "train the crosscoder", "xdiff_cli.dfc.training:train_stage", ("crosscoder",),
          "xdiff train --run {run}"),
    Stage("analyze", "analyse features", "xdiff_cli.findings.analysis:analyze_stage", ("analysis.sqlite",),
          "xdiff analyze --run {run}"),
    # Evidence goes into analysis.sqlite (redone with analyze); verify/ holds the probe fit
    # and the null run, and deleting it makes verify recompute.
    Stage("verify", "verify candidates (transfer probe)", "xdiff_cli.findings.verify:verify_stage", ("verify",),
          "xdiff verify --run {run}"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
# A run is complete (browsable, "done" in `xdiff runs`) once analysed; later stages add
# evidence. `xdiff run` still runs every stage in the table.
COMPLETE_THROUGH = "analyze"
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise XdiffError(f"unknown stage {name!r}", f"choose one of {', '.join(STAGE_NAMES)}") from None


def stage_command(name: str, run_id: str) -> str:
    return stage(name).command.format(run=run_id)


def stages_through(name: str | None) -> tuple[str, ...]:
    """Every stage up to and including `name` (all of them for None)."""
    if name is None:
        return STAGE_NAMES
    return STAGE_NAMES[: STAGE_NAMES.index(stage(name).name) + 1]


def missing_stage(is_done: Callable[[str], bool], through: str | None) -> str | None:
    """The first stage up to `through` (None: the last) that is not done, or None."""
    for name in stages_through(through):
        if not is_done(name):
            return name
    return None


@dataclass
class StageContext:
    """What the command running the stages knows that the run record must not decide.

    `trust_remote_code` comes only from the current command line: a run.json saying so
    never enables custom model code by itself."""

    progress: bool = True
    token: str | None = None
    trust_remote_code: bool = False
    hardware: Any = None  # hardware.Hardware; detected on first use when None
    plan: Any = None  # plan.Plan of this `xdiff run`, when there is one
    dist: Any = None  # distributed.Dist when this process is one rank of a torchrun world
    merge: bool = False  # harvest: join the parts harvested with --shard instead of harvesting


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------


def run_stage(run: Run, name: str, ctx: StageContext) -> None:
    """Run one stage with its status recorded: running → done | failed | interrupted."""
    function = stage(name).load()
    with run.lock():
        run.mark_stage(name, "running")
        try:
            function(run, ctx)
        except KeyboardInterrupt:
            run.mark_stage(name, "interrupted")
            raise
        except BaseException as exc:
            run.mark_stage(name, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        run.mark_stage(name, "done")


def run_stages(
    run: Run,
    ctx: StageContext,
    *,
    first: str | None = None,
    through: str | None = None,
    rerun: Iterable[str] = (),
    on_stage: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Run every unfinished stage from `first` to `through` (all when None), in order;
    returns those run.

    Stages before `first` are this command's inputs: they must be done and sound, else the
    error names the stage and the command that (re)makes it. A done stage whose artifacts
    were damaged since is redone. Stages in `rerun` run even when done (they resume or return
    at once when their artifacts are complete). `on_stage(index, name)` is called before
    each (the CLI prints a header)."""
    rerun = set(rerun)
    names = stages_through(through)
    start = names.index(stage(first).name) if first is not None else 0
    ran = []
    with run.lock():
        for name in names[:start]:
            _require_sound(run, name)
        for index, name in enumerate(names):
            if index < start:
                continue
            if run.stage_done(name) and name not in rerun and not redo_if_damaged(run, name):
                continue
            if on_stage is not None:
                on_stage(index, name)
            run_stage(run, name, ctx)
            ran.append(name)
    return ran


def run_rank_stage(run: Run, name: str, ctx: StageContext) -> None:
    """A non-zero rank's share of stage `name` under torchrun (`ctx.dist`).

    Rank 0 runs the stage through `run_stages` like a single process: it holds the run lock
    for the whole world and is the only one that marks the stage. The other ranks call the
    same stage function here, with neither: the lock is an flock held per process, so a second
    rank asking for it would fail at once (or, waiting, deadlock with rank 0 waiting for that
    rank at a collective), and `run.json` must have one writer. The stage function keeps the
    ranks in step itself (barriers, collectives) and writes shared files on rank 0 only."""
    if ctx.dist is None or ctx.dist.is_main:
        raise ValueError("run_rank_stage is for the non-zero ranks of a torchrun world")
    stage(name).load()(run, ctx)


def _require_sound(run: Run, name: str) -> None:
    if not run.stage_done(name):
        raise XdiffError(f"run {run.id}: stage {name} has not finished", f"run `{stage_command(name, run.id)}`")
    from xdiff_cli.integrity import stage_problem

    problem = stage_problem(run, name)
    if problem is not None:
        raise XdiffError(f"the {name} output of run {run.id} is damaged ({problem})",
                         f"run `{stage_command(name, run.id)}` to redo it")


def redo_if_damaged(run: Run, name: str) -> bool:
    """A stage recorded done whose artifacts were damaged since is forgotten (with every later
    stage) so it runs again, and the user is told; False when its artifacts are sound."""
    from xdiff_cli.integrity import stage_problem

    problem = stage_problem(run, name)
    if problem is None:
        return False
    from rich.markup import escape

    from xdiff_cli.console import err_console

    err_console.print(f"[yellow]note:[/] the {name} output of run {run.id} is damaged ({escape(problem)}); redoing {name}")
    if name == "train":  # keep the checkpoints: training resumes from the last sound one
        shutil.rmtree(run.crosscoder_dir / "final", ignore_errors=True)
        run.forget_stages(list(STAGE_NAMES[STAGE_NAMES.index(name) :]))
    else:
        restart_from(run, name)
    return True


def restart_from(run: Run, name: str) -> None:
    """Forget `name` and every later stage, artifacts included: stages skip finished work
    (a trained `final/`, a valid analysis), so only deleting it makes them redo it."""
    later = STAGE_NAMES[STAGE_NAMES.index(stage(name).name) :]
    with run.lock():
        for each in later:
            for relative in stage(each).artifacts:
                path = paths.contained(run.dir, run.dir / relative)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        run.forget_stages(list(later))
