"""Shared rich console and progress-bar factory so every stage looks the same."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class RateColumn(TextColumn):
    """Items per second with a unit, e.g. '1.2k tok/s'."""

    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task):  # noqa: ANN001 - rich's signature
        from rich.text import Text

        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if speed >= factor:
                return Text(f"{speed / factor:.1f}{suffix} {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


def stage_progress(unit: str = "it", *, transient: bool = False, show_fields: str = "") -> Progress:
    """A progress bar with count, rate, elapsed time and ETA.

    `show_fields` is a rich format string over task fields, e.g.
    "loss {task.fields[loss]:.3f}", shown after the bar.
    """
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if show_fields:
        columns.append(TextColumn(show_fields))
    return Progress(*columns, console=err_console, transient=transient)


SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values) -> str:  # noqa: ANN001 - any sequence of numbers
    """Unicode sparkline of a sequence of non-negative numbers."""
    values = [float(v) for v in values]
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARK_BLOCKS[0] * len(values)
    return "".join(SPARK_BLOCKS[min(len(SPARK_BLOCKS) - 1, int(v / top * (len(SPARK_BLOCKS) - 1) + 0.5))] for v in values)


def dead_blocks_text(metrics: dict, prefix: str = "") -> str:
    """" (A-only 4%, B-only 8%, shared 1%)": dead share per block, held-out when analysed."""
    parts = []
    for key, name in (("a", "A-only"), ("b", "B-only"), ("shared", "shared")):
        value = metrics.get(f"eval_dead_{key}", metrics.get(f"dead_{key}"))
        if value is not None:
            parts.append(f"{name} {100 * value:.0f}%")
    return f" ({prefix}{', '.join(parts)})" if parts else ""
