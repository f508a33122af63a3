"""Run directories: one per run, holding every artifact and a typed `run.json` record.

Layout of `<XDIFF_HOME>/runs/<run_id>/`:

    run.json          RunRecord: settings, models (resolved revisions), versions, stage status, metrics
    .lock             held (flock) by the process working on the run; names that process
    activations/      ActivationStore (harvest)
    crosscoder/       checkpoints/, final/ (model.safetensors + config.json), metrics.jsonl (train)
    analysis.sqlite   FeatureIndex database (analyse)
    report.html/.md   (report)

`run.json` is read and validated here only (`RunRecord.from_json`); everything else gets the
typed record. A stage is done only when the record says so; that mark is written by the
stage runner (`stages.py`) after the stage's artifacts are complete.

Run ids become directory names, so every id is validated (`run_dir_for`) before it is joined
to the runs root, and the result is checked to stay inside it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdiff_cli import __version__, paths
from xdiff_cli.atomic import read_json, write_json
from xdiff_cli.errors import XdiffError
from xdiff_cli.run.settings import RunSettings
from xdiff_cli.run.stages import COMPLETE_THROUGH, STAGE_NAMES, missing_stage, stage_command

STATUSES = ("running", "done", "failed", "interrupted")


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


# --------------------------------------------------------------------------------------
# Ids and paths
# --------------------------------------------------------------------------------------


validate_id = paths.validate_id  # one home: xdiff_cli/paths.py


def run_dir_for(run_id: str) -> Path:
    """The directory of run `run_id`, validated and contained in the runs root."""
    root = paths.runs_root()
    return paths.contained(root, root / validate_id(run_id))


# --------------------------------------------------------------------------------------
# The typed record
# --------------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    """One model of a run as `pull` resolved it: where it is and how it loads here."""

    spec: str
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    quant: str | None = None
    dtype: str | None = None
    device: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    layer: int | None = None

    @classmethod
    def from_json(cls, data: Any) -> ModelRecord:
        if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
            raise ValueError("a model entry needs a 'spec'")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StageStatus:
    status: str  # one of STATUSES
    updated: str = ""
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # extra facts a stage records

    @classmethod
    def from_json(cls, data: Any) -> StageStatus:
        if not isinstance(data, dict) or data.get("status") not in STATUSES:
            raise ValueError(f"a stage entry needs a status in {STATUSES}")
        extra = {k: v for k, v in data.items() if k not in ("status", "updated", "error")}
        return cls(data["status"], str(data.get("updated", "")), data.get("error"), extra)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "updated": self.updated, **self.info}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class RunRecord:
    """Everything `run.json` holds, validated once on load."""

    id: str
    created: str
    settings: RunSettings
    models: dict[str, ModelRecord] = field(default_factory=dict)
    stages: dict[str, StageStatus] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    preset: str | None = None
    command: list[str] | None = None
    hardware: dict[str, Any] | None = None
    precision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer versions, kept as they are

    @classmethod
    def from_json(cls, data: Any) -> RunRecord:
        """The record, or ValueError/XdiffError saying what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if not isinstance(data.get("id"), str):
            raise ValueError("no run id")
        if not isinstance(data.get("settings"), dict):
            raise ValueError("no settings")
        for key in ("models", "stages", "metrics", "versions"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"{key!r} is not an object")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            id=validate_id(data["id"]),
            created=str(data.get("created", "")),
            settings=RunSettings.from_dict(data["settings"]),
            models={side: ModelRecord.from_json(m) for side, m in data.get("models", {}).items()},
            stages={name: StageStatus.from_json(s) for name, s in data.get("stages", {}).items()},
            metrics=dict(data.get("metrics", {})),
            versions=dict(data.get("versions", {})),
            preset=data.get("preset"),
            command=data.get("command"),
            hardware=data.get("hardware"),
            precision=data.get("precision"),
            extra={k: v for k, v in data.items() if k not in names},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "id": self.id,
            "created": self.created,
            "settings": self.settings.to_dict(),
            "models": {side: m.to_json() for side, m in self.models.items()},
            "stages": {name: s.to_json() for name, s in self.stages.items()},
            "metrics": self.metrics,
            "versions": self.versions,
            "preset": self.preset,
            "command": self.command,
            "hardware": self.hardware,
            "precision": self.precision,
        }


# --------------------------------------------------------------------------------------
# A run directory
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run directory and its typed `run.json` record."""

    dir: Path
    record: RunRecord

    # --- identity and paths ---------------------------------------------------------
    @property
    def id(self) -> str:
        return self.record.id

    @property
    def settings(self) -> RunSettings:
        return self.record.settings

    @property
    def models(self) -> dict[str, ModelRecord]:
        return self.record.models

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.metrics

    @property
    def json_path(self) -> Path:
        return self.dir / "run.json"

    @property
    def lock_path(self) -> Path:
        return self.dir / ".lock"

    @property
    def store_dir(self) -> Path:
        return self.dir / "activations"

    @property
    def store_location(self) -> str:
        """Where the run's activation store is read from: `settings.store` (a URL or directory
        harvested elsewhere) or the run's own activations/."""
        return self.settings.store or str(self.store_dir)

    def open_store(self):  # noqa: ANN201 - data.store.ActivationStore (imported lazily)
        from xdiff_cli.data.store import open_store

        return open_store(self.store_location)

    @property
    def crosscoder_dir(self) -> Path:
        return self.dir / "crosscoder"

    @property
    def analysis_path(self) -> Path:
        return self.dir / "analysis.sqlite"

    # --- creation and loading -------------------------------------------------------
    @classmethod
    def create(cls, settings: RunSettings, name: str | None = None) -> Run:
        paths.ensure_dir(paths.runs_root())
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_id = name or f"{stamp}-{secrets.token_hex(2)}"
        run_dir = run_dir_for(run_id)
        if run_dir.exists():
            raise XdiffError(f"run {run_id!r} already exists", "pick another --name, or `xdiff rm` it first")
        run_dir.mkdir(parents=True)
        run = cls(run_dir, RunRecord(id=run_id, created=_now(), settings=settings, versions=_versions()))
        run.save()
        return run

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        raw = read_json(Path(run_dir) / "run.json", "run record")
        try:
            record = RunRecord.from_json(raw)
        except (ValueError, TypeError, XdiffError) as exc:
            raise XdiffError(
                f"run record at {run_dir}/run.json is corrupt ({exc})", f"delete the run with `xdiff rm {Path(run_dir).name}`"
            ) from exc
        return cls(Path(run_dir), record)

    def save(self) -> None:
        write_json(self.json_path, self.record.to_json())

    def reload(self) -> Run:
        return Run.load(self.dir)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of this run; a second command fails naming the process holding it."""
        from xdiff_cli.locks import exclusive

        with exclusive(self.lock_path, f"run {self.id}"):
            yield

    # --- stages ---------------------------------------------------------------------
    def stage_status(self, stage: str) -> str | None:
        entry = self.record.stages.get(stage)
        return entry.status if entry else None

    def stage_done(self, stage: str) -> bool:
        return self.stage_status(stage) == "done"

    def mark_stage(self, stage: str, status: str, *, error: str | None = None, **info: Any) -> None:
        """Record a stage's status ('running', 'done', 'failed', 'interrupted')."""
        if status not in STATUSES:
            raise ValueError(f"unknown stage status {status!r}")
        self.record.stages[stage] = StageStatus(status, _now(), error, info)
        self.save()

    def forget_stages(self, stages: list[str]) -> None:
        for stage in stages:
            self.record.stages.pop(stage, None)
        self.save()

    @property
    def current_stage(self) -> str:
        """The first stage not done (with its status), or 'done'."""
        stage = missing_stage(self.stage_done, COMPLETE_THROUGH)
        if stage is None:
            return "done"
        status = self.stage_status(stage)
        return f"{stage} ({status})" if status else stage

    @property
    def complete(self) -> bool:
        return missing_stage(self.stage_done, COMPLETE_THROUGH) is None

    def set_model(self, side: str, info: ModelRecord | dict[str, Any]) -> None:
        self.record.models[side] = info if isinstance(info, ModelRecord) else ModelRecord.from_json(info)
        self.save()

    def set_metrics(self, **metrics: Any) -> None:
        self.record.metrics.update(metrics)
        self.save()

    def drop_metrics(self, prefix: str) -> None:
        """Forget the metrics whose names start with `prefix` (they describe a replaced artifact)."""
        self.record.metrics = {k: v for k, v in self.record.metrics.items() if not k.startswith(prefix)}
        self.save()

    def update_settings(self, settings: RunSettings) -> None:
        self.record.settings = settings
        self.save()

    def disk_bytes(self) -> int:
        return paths.dir_bytes(self.dir)


@dataclass
class CorruptRun:
    """A run directory whose run.json cannot be read: listed as corrupt, removable."""

    dir: Path
    error: str

    @property
    def id(self) -> str:
        return self.dir.name

    def disk_bytes(self) -> int:
        return paths.dir_bytes(self.dir)


# --------------------------------------------------------------------------------------
# Finding runs
# --------------------------------------------------------------------------------------


def scan_runs() -> list[Run | CorruptRun]:
    """Every run directory, newest first; unreadable ones as CorruptRun (never an error)."""
    root = paths.runs_root()
    if not root.is_dir():
        return []
    runs: list[Run | CorruptRun] = []
    for run_dir in root.iterdir():
        if not run_dir.is_dir() or not paths.ID_RE.match(run_dir.name):
            continue
        if not (run_dir / "run.json").exists():
            continue
        try:
            runs.append(Run.load(run_dir))
        except XdiffError as exc:
            runs.append(CorruptRun(run_dir, str(exc)))
    runs.sort(key=lambda r: (r.record.created if isinstance(r, Run) else "", r.id), reverse=True)
    return runs


def list_runs() -> list[Run]:
    """All readable runs, newest first (corrupt ones are left out here; `scan_runs` shows them)."""
    return [r for r in scan_runs() if isinstance(r, Run)]


def load_run(run_id: str) -> Run:
    run_dir = run_dir_for(run_id)
    if not (run_dir / "run.json").is_file():
        raise XdiffError(f"no run named {run_id!r}", "list runs with `xdiff runs`")
    return Run.load(run_dir)


def resolve_run(run_id: str | None, *, needs: str | None = None) -> Run:
    """The run named `run_id`; by default the newest run that has `needs` done (every stage
    when `needs` is None, i.e. the newest analysed run), else the newest run.

    A named run missing a stage before `needs` fails naming that stage and the command that
    makes it."""
    if run_id is not None:
        run = load_run(run_id)
        if needs is not None:
            require(run, needs)
        return run
    runs = list_runs()
    if not runs:
        raise XdiffError("no runs yet", "start one with `xdiff run MODEL_A MODEL_B` (or `--preset tiny`)")
    for run in runs:
        if missing_stage(run.stage_done, needs) is None:
            return run
    if needs is None:
        return runs[0]
    require(runs[0], needs)  # names what the newest run lacks
    return runs[0]


def require(run: Run, needs: str) -> None:
    """Fail unless `needs` and every stage before it are done in `run`."""
    stage = missing_stage(run.stage_done, needs)
    if stage is not None:
        status = run.stage_status(stage)
        state = {"failed": "failed", "interrupted": "was interrupted", "running": "is running or was killed"}.get(
            status or "", "has not run"
        )
        what = {"analyze": "analysed", "train": "trained", "harvest": "harvested", "pull": "pulled"}.get(needs, needs)
        raise XdiffError(
            f"run {run.id} has not been {what} yet: stage {stage} {state}", f"run `{stage_command(stage, run.id)}`"
        )


def remove_run(run_id: str) -> Path:
    """Delete a run directory, readable or not; refuses while another process works on it."""
    from xdiff_cli.locks import exclusive

    run_dir = run_dir_for(run_id)
    if not run_dir.is_dir():
        raise XdiffError(f"no run named {run_id!r}", "list runs with `xdiff runs`")
    with exclusive(run_dir / ".lock", f"run {run_id}"):
        shutil.rmtree(run_dir)
    return run_dir


__all__ = [
    "STAGE_NAMES", "CorruptRun", "ModelRecord", "Run", "RunRecord", "StageStatus", "list_runs",
    "load_run", "remove_run", "require", "resolve_run", "run_dir_for", "scan_runs", "validate_id",
]
