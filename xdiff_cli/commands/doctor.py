"""`xdiff doctor`."""

from __future__ import annotations

import typer


def doctor() -> None:
    """Check Python, torch, CUDA, 4-bit support, HF token and disk space."""
    from rich.table import Table

    from xdiff_cli.console import console
    from xdiff_cli.doctor import run_doctor

    report = run_doctor()
    table = Table(show_header=False, box=None)
    for check in report.checks:
        mark = "[green]ok[/]" if check.ok else ("[red]FAIL[/]" if check.required else "[yellow]--[/]")
        table.add_row(mark, check.name, check.detail)
    console.print(table)
    if not report.usable:
        console.print("[red]xdiff cannot run here: fix the FAIL lines above.[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
