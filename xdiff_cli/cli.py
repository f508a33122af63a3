"""The `xdiff` command line: parse, call the library, print. Nothing here computes.

Each command group lives in `xdiff_cli/commands/<name>.py` and exposes `register(app)`.
Command modules import only typer/rich at module level; torch and transformers are imported
inside the command bodies so `xdiff --help` stays instant.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from typer.core import TyperGroup

from xdiff_cli import __version__
from xdiff_cli.errors import XdiffError

# Order here is the order `xdiff --help` lists them: the main flow first, stages after.
COMMAND_MODULES = (
    "run",
    "browse",
    "steer",
    "analyze",
    "label",
    "verify",
    "models",
    "harvest",
    "train",
    "doctor",
)


class _State:
    debug: bool = os.environ.get("XDIFF_DEBUG", "") not in ("", "0")


def print_error(exc: XdiffError) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}")


class XdiffGroup(TyperGroup):
    """Turns user errors into one red line and exit code 1 (`--debug` keeps the traceback)."""

    def invoke(self, ctx):  # noqa: ANN001 - click's signature
        try:
            return super().invoke(ctx)
        except XdiffError as exc:
            if _State.debug:
                raise
            print_error(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if _State.debug:
                raise
            print_error(XdiffError("interrupted", "rerun the same command to resume where it stopped"))
            raise typer.Exit(130) from None


app = typer.Typer(
    name="xdiff",
    cls=XdiffGroup,
    help="Diff two LLMs of different architectures: find what one represents that the other does not.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Plain click help: typer's rich help imports rich.markdown and pygments (~0.5 s), and `xdiff
    # --help` must be instant. Plain help also reflows paragraphs and shows no <bool> on flags.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    if debug:
        _State.debug = True


for _name in COMMAND_MODULES:
    importlib.import_module(f"xdiff_cli.commands.{_name}").register(app)


def _take_debug_flag(argv: list[str]) -> list[str]:
    """`--debug` works anywhere on the line (`xdiff features --debug` too), not only first.

    Arguments after a bare `--` are left alone (they could be a prompt)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    if "--debug" in argv[:cut]:
        _State.debug = True
        return [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    return argv


def main() -> None:
    # The group handles user errors; this catches the ones raised while parsing.
    try:
        app(args=_take_debug_flag(sys.argv[1:]), prog_name="xdiff")
    except XdiffError as exc:
        if _State.debug:
            raise
        print_error(exc)
        sys.exit(1)
