"""Run directories: one per `xdiff run`, holding every artifact and a `run.json`.

Layout of `<XDIFF_HOME>/runs/<run_id>/`:

    run.json          settings, models (resolved revisions), versions, stage status, metrics
    activations/      ActivationStore (harvest)
    crosscoder/       checkpoints/, final/ (model.safetensors + config.json), metrics.jsonl (train)
    analysis.sqlite   FeatureIndex database (analyse)
    report.html/.md   (report)

A stage is done only when `run.json` says so; that mark is written after the stage's
artifacts are complete, so a crash in between redoes the stage instead of trusting it.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli import __version__, paths
from xdiff_cli.atomic import read_json, write_json
from xdiff_cli.errors import XdiffError
from xdiff_cli.settings import RunSettings

STAGES = ("pull", "harvest", "train", "analyze")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"xdiff": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "bitsandbytes", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class Run:
    """A run directory and its `run.json` record."""

    dir: Path
    record: dict[str, Any]

    # --- identity and paths ---------------------------------------------------------
    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def json_path(self) -> Path:
        return self.dir / "run.json"

    @property
    def store_dir(self) -> Path:
        return self.dir / "activations"

    @property
    def crosscoder_dir(self) -> Path:
        return self.dir / "crosscoder"

    @property
    def analysis_path(self) -> Path:
        return self.dir / "analysis.sqlite"

    @property
    def settings(self) -> RunSettings:
        return RunSettings.from_dict(self.record["settings"])

    # --- creation and loading -------------------------------------------------------
    @classmethod
    def create(cls, settings: RunSettings, name: str | None = None) -> Run:
        root = paths.ensure_dir(paths.runs_root())
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_id = name or f"{stamp}-{secrets.token_hex(2)}"
        if not _ID_RE.match(run_id):
            raise XdiffError(f"invalid run name {run_id!r}", "use letters, digits, '.', '_' and '-'")
        run_dir = root / run_id
        if run_dir.exists():
            raise XdiffError(f"run {run_id!r} already exists", "pick another --name, or `xdiff rm` it first")
        run_dir.mkdir(parents=True)
        record = {
            "id": run_id,
            "created": _now(),
            "settings": settings.to_dict(),
            "models": {},
            "stages": {},
            "metrics": {},
            "versions": _versions(),
        }
        run = cls(run_dir, record)
        run.save()
        return run

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        record = read_json(Path(run_dir) / "run.json", "run record")
        if not isinstance(record, dict) or "id" not in record or "settings" not in record:
            raise XdiffError(f"run record at {run_dir}/run.json is corrupt", "delete the run with `xdiff rm`")
        return cls(Path(run_dir), record)

    def save(self) -> None:
        write_json(self.json_path, self.record)

    # --- stages ---------------------------------------------------------------------
    def stage_done(self, stage: str) -> bool:
        return self.record.get("stages", {}).get(stage, {}).get("status") == "done"

    def mark_stage(self, stage: str, status: str, **info: Any) -> None:
        """Record a stage's status ('running', 'done', 'failed') with extra info."""
        entry = {"status": status, "updated": _now(), **info}
        self.record.setdefault("stages", {})[stage] = entry
        self.save()

    def clear_stages_from(self, stage: str) -> None:
        """Forget `stage` and every later one (for --restart-from)."""
        if stage not in STAGES:
            raise XdiffError(f"unknown stage {stage!r}", f"choose one of {', '.join(STAGES)}")
        for later in STAGES[STAGES.index(stage) :]:
            self.record.get("stages", {}).pop(later, None)
        self.save()

    @property
    def current_stage(self) -> str:
        """The first stage not done, or 'done'."""
        for stage in STAGES:
            if not self.stage_done(stage):
                status = self.record.get("stages", {}).get(stage, {}).get("status")
                return f"{stage} ({status})" if status else stage
        return "done"

    def set_model(self, side: str, info: dict[str, Any]) -> None:
        self.record.setdefault("models", {})[side] = info
        self.save()

    def set_metrics(self, **metrics: Any) -> None:
        self.record.setdefault("metrics", {}).update(metrics)
        self.save()

    def disk_bytes(self) -> int:
        return paths.dir_bytes(self.dir)


def list_runs() -> list[Run]:
    """All readable runs, newest first (corrupt ones are skipped, not fatal)."""
    root = paths.runs_root()
    if not root.is_dir():
        return []
    runs = []
    for run_dir in root.iterdir():
        if (run_dir / "run.json").is_file():
            try:
                runs.append(Run.load(run_dir))
            except XdiffError:
                continue
    runs.sort(key=lambda r: (r.record.get("created", ""), r.id), reverse=True)
    return runs


def resolve_run(run_id: str | None) -> Run:
    """The run named `run_id`, or the newest run when it is None."""
    if run_id is None:
        runs = list_runs()
        if not runs:
            raise XdiffError("no runs yet", "start one with `xdiff run MODEL_A MODEL_B` (or `--preset tiny`)")
        return runs[0]
    run_dir = paths.runs_root() / run_id
    if not _ID_RE.match(run_id) or not (run_dir / "run.json").is_file():
        raise XdiffError(f"no run named {run_id!r}", "list runs with `xdiff runs`")
    return Run.load(run_dir)


def remove_run(run_id: str) -> Path:
    run = resolve_run(run_id)
    shutil.rmtree(run.dir)
    return run.dir
