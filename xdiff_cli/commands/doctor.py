"""`xdiff doctor`: each check printed as soon as it is done."""

from __future__ import annotations

import typer


def doctor() -> None:
    """Check Python, torch, CUDA, the hub, 4-bit support, HF token and disk space."""
    from rich.markup import escape

    from xdiff_cli.console import console
    from xdiff_cli.doctor import DoctorReport, iter_checks

    report = DoctorReport()
    width = 20
    for check in iter_checks():
        report.checks.append(check)
        mark = "[green]ok[/]  " if check.ok else ("[red]FAIL[/]" if check.required else "[yellow]--[/]  ")
        console.print(f"{mark} {escape(check.name):<{width}} {escape(check.detail)}")
    if not report.usable:
        console.print("[red]xdiff cannot run here: fix the FAIL lines above.[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
