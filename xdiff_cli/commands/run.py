"""Commands for this stage (registered by `register`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Nothing yet: this stage's commands land with its issue."""
