"""`xdiff browse`: open the Textual TUI over a run's features (and its steering chat)."""

from __future__ import annotations

import typer

from xdiff_cli.run.settings import TRUST_REMOTE_CODE_HELP


def register(app: typer.Typer) -> None:
    @app.command()
    def browse(
        run: str | None = typer.Option(None, "--run", help="Run id to open (default: pick among runs, or the only one)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    ) -> None:
        """Browse exclusive and shared features, their top examples, and steer them in a chat."""
        from xdiff_cli.run.runs import load_run
        from xdiff_cli.tui.app import XdiffApp

        if run is not None:
            load_run(run)  # an unknown id is a one-line error, before the screen takes over
        app = XdiffApp(run_id=run, trust_remote_code=trust_remote_code)
        app.run()
        if app.user_error is not None:
            raise app.user_error
        if app.return_code:
            raise typer.Exit(app.return_code)
