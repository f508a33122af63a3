"""Helpers the command modules share: which run a command works on, and saying so."""

from __future__ import annotations

from typing import Any

RUN_HELP = "Run id (default: the newest run that has what this command needs)."


def pick_run(run_id: str | None, needs: str) -> Any:  # -> runs.Run
    """`--run`'s run, or the newest one with `needs` done, named on stderr when a person is
    watching (stdout stays clean for --json; captured output stays one error line). A run
    missing a stage fails naming it and the command that makes it."""
    from xdiff_cli.run.runs import resolve_run

    run = resolve_run(run_id, needs=needs)
    if run_id is None and _stderr_is_terminal():
        from rich.console import Console
        from rich.markup import escape

        what = {"analyze": "analysed", "train": "trained", "harvest": "harvested"}.get(needs, needs)
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[dim]using run {escape(run.id)} (the newest {what} run; --run picks another)[/]"
        )
    return run


def _stderr_is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()
