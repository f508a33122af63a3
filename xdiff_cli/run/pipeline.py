"""`xdiff run` around the stages: which run to continue, what to record, how to summarise.

The plan lives in `plan.py`, the stages and their runner in `stages.py`, the run record in
`runs.py`. This module picks or creates the run directory for a plan (re-running the same
command resumes the newest run with identical settings) and turns a finished run into the
summary the CLI prints and the `xdiff runs --json` entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError
from xdiff_cli.run.plan import Plan
from xdiff_cli.run.runs import CorruptRun, Run, list_runs, load_run, run_dir_for
from xdiff_cli.run.settings import RunSettings

# --------------------------------------------------------------------------------------
# Run selection: resume the newest identical unfinished run, or create one
# --------------------------------------------------------------------------------------


def find_run(settings: RunSettings, *, name: str | None = None, new: bool = False) -> Run | None:
    """The run to continue: `--name`'s run if it exists, else the newest with identical settings.

    `new` never continues an existing run. A named run with other settings is an error, not
    a silent overwrite."""
    if name is not None:
        run_dir = run_dir_for(name)  # validates the name before any path is built from it
        if new or not (run_dir / "run.json").is_file():
            return None
        run = load_run(name)
        recorded, wanted = run.settings.to_dict(), settings.to_dict()
        differing = sorted(k for k, v in wanted.items() if recorded.get(k) != v)
        if differing:
            raise XdiffError(
                f"run {name!r} exists with different settings ({', '.join(differing)})",
                "pick another --name, or `xdiff rm` it first",
            )
        return run
    if new:
        return None
    for run in list_runs():
        if run.settings == settings:
            return run
    return None


def create_run(plan: Plan, name: str | None = None, command: list[str] | None = None) -> Run:
    """A new run directory whose run.json records everything needed to reproduce it."""
    run = Run.create(plan.settings, name)
    run.record.preset = plan.preset.name if plan.preset else None
    run.record.command = command
    run.record.hardware = dataclasses.asdict(plan.hardware)
    run.record.precision = plan.precision
    run.save()
    return run


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


@dataclass
class FeatureLine:
    id: int
    partition: str
    top_token: str | None
    snippet: str | None
    frequency: float
    max_activation: float


@dataclass
class Summary:
    run_id: str
    run_dir: Path
    metrics: dict[str, Any]
    top_a: list[FeatureLine]
    top_b: list[FeatureLine]
    next_commands: list[str]


def _snippet(text: str, start: int, end: int, width: int = 30) -> str:
    """The firing token in brackets with a little context either side, on one line."""
    left = text[max(0, start - width) : start].replace("\n", " ")
    right = text[end : end + width].replace("\n", " ")
    return f"…{left}[{text[start:end]}]{right}…"


def top_features(run: Run, partition: str, limit: int = 3) -> list[FeatureLine]:
    from xdiff_cli.findings.feature_index import FeatureIndex

    index = FeatureIndex.open(run.analysis_path)
    try:
        lines = []
        for feature in index.features(partition=partition, limit=limit, alive_only=True):
            examples = index.examples(feature.id, view=feature.own_view, limit=1)
            snippet = _snippet(examples[0].text, examples[0].start, examples[0].end) if examples else None
            lines.append(FeatureLine(feature.id, feature.partition, feature.top_token, snippet,
                                     feature.frequency, feature.max_activation))
        return lines
    finally:
        index.close()


def summarize(run: Run) -> Summary:
    top_a = top_features(run, "a") if run.analysis_path.is_file() else []
    top_b = top_features(run, "b") if run.analysis_path.is_file() else []
    feature = (top_b or top_a)[0].id if (top_b or top_a) else 0
    commands = [
        f"xdiff features --run {run.id} --partition b --limit 20",
        f"xdiff browse --run {run.id}",
        f'xdiff steer --run {run.id} --feature {feature} --scale 4 "Tell me a short story."',
    ]
    return Summary(run.id, run.dir, dict(run.metrics), top_a, top_b, commands)


# --------------------------------------------------------------------------------------
# Runs as data (for `xdiff runs --json`)
# --------------------------------------------------------------------------------------


def run_info(run: Run | CorruptRun) -> dict[str, Any]:
    """One run as JSON: id, models, created, stage, metrics, disk use (a corrupt run.json:
    stage "corrupt" and the reason under "error")."""
    if isinstance(run, CorruptRun):
        return {
            "id": run.id, "dir": str(run.dir), "models": {"a": None, "b": None}, "preset": None, "created": None,
            "stage": "corrupt", "complete": False, "metrics": {}, "disk_bytes": run.disk_bytes(), "error": run.error,
        }
    settings = run.settings
    return {
        "id": run.id,
        "dir": str(run.dir),
        "models": {"a": settings.model_a, "b": settings.model_b},
        "preset": run.record.preset,
        "created": run.record.created,
        "stage": run.current_stage,
        "complete": run.complete,
        "metrics": dict(run.metrics),
        "disk_bytes": run.disk_bytes(),
    }
