"""Shared rich console and progress-bar factory so every stage looks the same."""

from __future__ import annotations

import datetime
import os
import time

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


# Without a terminal (a log file, nohup, CI) rich draws the bars only when they stop; a plain
# line per unfinished task this often keeps a long stage visible there.
PLAIN_LOG_SECONDS = float(os.environ.get("XDIFF_PROGRESS_LOG_SECONDS", "60"))


class StageProgress(Progress):
    """A Progress whose decoration goes first when the terminal is narrow.

    Columns marked optional (spinner, bar, percentage, elapsed time) are dropped, widest
    first, until the rest fits, so the step count and the ETA are never cut. Without a
    terminal it prints a plain status line every `PLAIN_LOG_SECONDS`."""

    def __init__(self, *columns, optional: list[int], unit: str = "it", **kwargs) -> None:  # noqa: ANN002, ANN003
        self.all_columns = list(columns)
        self.optional = optional  # indices into all_columns, in the order they are dropped
        self.unit = unit
        self._last_plain_log = time.monotonic()
        super().__init__(*columns, **kwargs)

    def update(self, task_id, **kwargs) -> None:  # noqa: ANN001, ANN003 - rich's signature
        super().update(task_id, **kwargs)
        self._plain_log_if_due()

    def advance(self, task_id, advance: float = 1) -> None:  # noqa: ANN001 - rich's signature
        super().advance(task_id, advance)
        self._plain_log_if_due()

    def _plain_log_if_due(self) -> None:
        if self.console.is_terminal or self.disable or time.monotonic() - self._last_plain_log < PLAIN_LOG_SECONDS:
            return
        self._last_plain_log = time.monotonic()
        for task in self.tasks:
            if not task.finished and task.visible:
                self.console.print(plain_status(task, self.unit), markup=False, highlight=False)

    def columns_for_width(self, width: int) -> list:
        from rich.measure import Measurement

        options = self.console.options.update(width=10_000)

        def needed(columns: list) -> int:
            widest = 0
            for task in self.tasks:
                cells = [c(task) if callable(c) else c for c in columns]
                widest = max(widest, sum(Measurement.get(self.console, options, cell).maximum for cell in cells)
                             + len(cells) - 1)
            return widest

        keep = list(range(len(self.all_columns)))
        for drop in [None, *self.optional]:
            if drop is not None:
                keep.remove(drop)
            columns = [self.all_columns[i] for i in keep]
            if needed(columns) <= width:
                break
        return columns

    def make_tasks_table(self, tasks):  # noqa: ANN001, ANN201 - rich's signature
        if hasattr(self, "live"):  # rich renders once inside __init__, before `live` exists
            self.columns = tuple(self.columns_for_width(self.console.width))
        return super().make_tasks_table(tasks)


def plain_status(task, unit: str) -> str:  # noqa: ANN001 - a rich Task
    """'harvest: 1,234/20,000 (6%) 1.2k tok/s ETA 0:03:10' for logs without a terminal."""
    done = f"{task.completed:,.0f}"
    if task.total:
        done += f"/{task.total:,.0f} ({task.percentage:.0f}%)"
    rate = RateColumn(unit).render(task).plain
    eta = task.time_remaining
    eta_text = f" ETA {datetime.timedelta(seconds=round(eta))}" if eta is not None else ""
    return f"{task.description}: {done} {rate}{eta_text}"


def stage_progress(
    unit: str = "it", *, transient: bool = False, show_fields: str = "", console: Console | None = None
) -> Progress:
    """A progress bar with count, rate, elapsed time and ETA.

    `show_fields` is a rich format string over task fields, e.g.
    "loss {task.fields[loss]:.3f}", shown after the bar. On a narrow terminal the bar,
    spinner, percentage and elapsed time give way before the numbers do.
    """
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if show_fields:
        columns.append(TextColumn(show_fields))
    # Dropped in this order: the bar, the elapsed time, the percentage, the spinner.
    return StageProgress(*columns, optional=[2, 6, 4, 0], unit=unit, console=console or err_console,
                         transient=transient)


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
