"""`xdiff run`: pull → harvest → train → analyse, planned, resumable, summarised.

The stages live in their own modules (hub/loading, harvest, training, analysis); this module
decides the settings (defaults < hardware profile or preset < explicit options), picks or
creates the run directory, prints a plan, runs each unfinished stage and marks it in
`run.json`, and summarises the result. The CLI (`commands/run.py`) only parses and prints.

Stage marks: "running" before a stage, "done" after it returns, "failed" (with the error)
when it raises, "interrupted" on Ctrl-C. Re-running the same command resumes the newest run
with identical settings at its first stage not "done"; each stage resumes its own partial
work (harvest shards, training checkpoints).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdiff_cli import paths
from xdiff_cli.errors import XdiffError
from xdiff_cli.presets import Preset, apply_preset, load_preset, match_preset
from xdiff_cli.runs import STAGES, Run, list_runs
from xdiff_cli.settings import RunSettings

TINY_SCHEME = "tiny:"
TINY_BUILD_ORDER = ("llama", "qwen3", "gptoss")  # build order fixes each tiny model's seed

# Without a preset, the defaults are sized to what this machine can finish.
CPU_PROFILE = {"tokens": 50_000, "context_length": 256, "dict_size": 4096, "k": 32, "steps": 2000,
               "batch_size": 512, "lr": 3e-4}
GPU_PROFILE = {"tokens": 2_000_000, "steps": 20_000}

# Rough sustained throughputs for the time estimates (FLOP/s); estimates, not promises.
CPU_FLOPS_PER_CORE = 8e9
GPU_FLOPS = 150e12
# Fixed costs measured on the tiny preset (2 CPU cores): per harvested token, per train step.
HARVEST_TOKEN_OVERHEAD_S = {False: 5e-4, True: 5e-5}
TRAIN_STEP_OVERHEAD_S = {False: 0.05, True: 0.005}
STORE_BYTES_PER_VALUE = 2  # activations are stored in bf16/fp16
DISK_HEADROOM = 1.10


# --------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------


@dataclass
class Hardware:
    device: str  # "cuda" or "cpu": what `--device auto` resolves to
    cpu_count: int
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None

    @property
    def has_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        if self.has_gpu:
            return f"{self.gpu_name} ({self.gpu_memory_bytes / 2**30:.0f} GiB)"
        return f"CPU only ({self.cpu_count} cores)"

    @property
    def flops(self) -> float:
        return GPU_FLOPS if self.has_gpu else CPU_FLOPS_PER_CORE * self.cpu_count


def detect_hardware() -> Hardware:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", cpus, props.name, int(props.total_memory))
    return Hardware("cpu", cpus)


# --------------------------------------------------------------------------------------
# Settings: defaults < hardware profile (no preset) or preset < explicit options
# --------------------------------------------------------------------------------------


@dataclass
class ResolvedSettings:
    settings: RunSettings
    preset: Preset | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resolve_settings(
    model_a: str | None,
    model_b: str | None,
    *,
    preset_name: str | None = None,
    options: dict[str, Any] | None = None,
    hardware: Hardware | None = None,
) -> ResolvedSettings:
    """The run's settings from models, an optional preset and the explicit CLI options."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    notes: list[str] = []
    warnings: list[str] = []
    if (model_a is None) != (model_b is None):
        raise XdiffError("pass two models (xdiff run MODEL_A MODEL_B), or none with --preset NAME")
    if preset_name:
        preset = load_preset(preset_name)
    elif model_a and model_b:
        preset = match_preset(model_a, model_b)
        if preset:
            notes.append(f"preset {preset.name!r} picked because the models match it (explicit options win)")
    else:
        raise XdiffError("no models given", "pass two models (xdiff run MODEL_A MODEL_B) or --preset NAME")
    model_a = model_a or preset.model_a
    model_b = model_b or preset.model_b

    settings = RunSettings(model_a=model_a, model_b=model_b)
    if preset is not None:
        settings = apply_preset(settings, preset)
    else:
        hardware = hardware or detect_hardware()
        profile = GPU_PROFILE if hardware.has_gpu else CPU_PROFILE
        settings = dataclasses.replace(settings, **profile)
        overridden = sorted(set(profile) - set(options))
        if overridden:
            where = "this GPU" if hardware.has_gpu else "a CPU-only machine"
            notes.append(
                f"no preset for this pair: defaults sized for {where} "
                f"({', '.join(f'{k}={profile[k]}' for k in overridden)}); options override them"
            )
    settings = settings.updated(**options).validate()
    # A GPU asked for but absent is a user error now, before any planning touches CUDA.
    from xdiff_cli.loading import resolve_device

    resolve_device(settings.device)
    if _same_model(settings.model_a, settings.model_b):
        warnings.append("model A and model B are the same: expect no exclusive features (allowed, e.g. as a control)")
    return ResolvedSettings(settings, preset, notes, warnings)


def _same_model(a: str, b: str) -> bool:
    if a.startswith(TINY_SCHEME) or b.startswith(TINY_SCHEME):
        return a == b
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return a.strip().lower() == b.strip().lower()


# --------------------------------------------------------------------------------------
# Models: `tiny:NAME`, local dirs and hub ids
# --------------------------------------------------------------------------------------


def tiny_model_dir(spec: str) -> Path:
    """Build (once, offline) and return the tiny model named by `tiny:NAME`."""
    from xdiff_cli.tiny import build_tiny_models

    name = spec[len(TINY_SCHEME) :]
    if name not in TINY_BUILD_ORDER:
        raise XdiffError(f"unknown tiny model {spec!r}", f"choose one of {', '.join('tiny:' + n for n in TINY_BUILD_ORDER)}")
    # Build every model up to this one so each keeps the seed the test fixtures give it.
    names = TINY_BUILD_ORDER[: TINY_BUILD_ORDER.index(name) + 1]
    root = paths.cache_root() / "tiny-models"
    if not (root / name / "planted.json").is_file():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one quiet build, not a bar per shard
    return build_tiny_models(root, names=names)[name]


@dataclass
class ModelFacts:
    """What the plan needs to know about a model, read from its config (no weights)."""

    spec: str
    folder: Path | None = None  # a local dir holding at least config.json
    d_model: int | None = None
    n_layers: int | None = None
    n_params: float | None = None
    weight_bytes: int | None = None

    def layer(self, requested: int | None) -> int | None:
        if requested is not None:
            return requested
        return None if self.n_layers is None else self.n_layers // 2


def _config_facts(spec: str, folder: Path) -> ModelFacts:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    d_model, n_layers = text.get("hidden_size"), text.get("num_hidden_layers")
    weight_bytes = _weight_bytes(folder)
    if weight_bytes:
        n_params = weight_bytes / _bytes_per_param(text.get("torch_dtype") or text.get("dtype"))
    elif d_model and n_layers:
        n_params = 12 * n_layers * d_model**2 + 2 * text.get("vocab_size", 32_000) * d_model
    else:
        n_params = None
    return ModelFacts(spec, folder, d_model, n_layers, n_params, weight_bytes)


def _weight_bytes(folder: Path) -> int | None:
    for index in folder.glob("*.safetensors.index.json"):
        try:
            return int(json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_size"])
        except (KeyError, ValueError, TypeError, json.JSONDecodeError):
            continue
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _bytes_per_param(dtype: str | None) -> float:
    return {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}.get(str(dtype), 2.0)


def model_facts(spec: str) -> ModelFacts:
    """Facts from config.json: local dirs read directly, hub ids via a metadata-only fetch."""
    try:
        if spec.startswith(TINY_SCHEME):
            return _config_facts(spec, tiny_model_dir(spec))
        from xdiff_cli.hub import fetch_metadata

        return _config_facts(spec, fetch_metadata(spec))
    except XdiffError:
        return ModelFacts(spec)  # unknown until pulled; pull reports the real problem
    except (OSError, ValueError, json.JSONDecodeError):
        return ModelFacts(spec)


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    settings: RunSettings
    preset: Preset | None
    hardware: Hardware
    model_a: ModelFacts
    model_b: ModelFacts
    precision: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    memory: Any = None  # planner.MemoryPlan when the configs were reachable

    @property
    def dict_size(self) -> int | None:
        if self.settings.dict_size is not None:
            return self.settings.dict_size
        if self.model_a.d_model and self.model_b.d_model:
            return 32 * (self.model_a.d_model + self.model_b.d_model) // 2
        return None

    @property
    def disk_bytes(self) -> int | None:
        """Activation store size: tokens × (d_A + d_B) values in 16-bit."""
        return store_bytes(self.settings.tokens, self.model_a.d_model, self.model_b.d_model)

    def time_seconds(self) -> dict[str, float | None]:
        """Rough compute-bound estimates per stage (downloads not included)."""
        s, flops = self.settings, self.hardware.flops
        out: dict[str, float | None] = {"pull": None, "harvest": None, "train": None, "analyze": None}
        if self.model_a.n_params and self.model_b.n_params:
            # Forward passes of both models; ~1.5x for tokens lost to alignment and padding.
            # Plus a per-token cost (tokenising, aligning, writing) that dominates for small models.
            per_token = HARVEST_TOKEN_OVERHEAD_S[self.hardware.has_gpu]
            compute = 1.5 * 2 * (self.model_a.n_params + self.model_b.n_params) * s.tokens / flops
            out["harvest"] = compute + per_token * s.tokens
        if self.dict_size and self.model_a.d_model and self.model_b.d_model:
            width = self.model_a.d_model + self.model_b.d_model
            step_overhead = TRAIN_STEP_OVERHEAD_S[self.hardware.has_gpu]
            out["train"] = s.steps * (6 * s.batch_size * self.dict_size * width / flops + step_overhead)
            eval_tokens = s.tokens * s.eval_fraction
            out["analyze"] = 4 * eval_tokens * self.dict_size * width / flops + 5
        return out


def store_bytes(tokens: int, d_a: int | None, d_b: int | None) -> int | None:
    if not d_a or not d_b:
        return None
    # Same accounting as harvest.estimate_bytes: 16-bit activations + five int64 per pair.
    return int(tokens * ((d_a + d_b) * STORE_BYTES_PER_VALUE + 5 * 8))


def memory_plan(settings: RunSettings, hardware: Hardware, a: ModelFacts, b: ModelFacts) -> Any:
    """The planner's precision choice for this pair (None when a config is not reachable yet)."""
    if a.folder is None or b.folder is None:
        return None
    from xdiff_cli import planner

    device = settings.device if settings.device != "auto" else hardware.device
    return planner.plan_memory(
        [planner.footprint_from_dir(a.folder, _short(a.spec)), planner.footprint_from_dir(b.folder, _short(b.spec))],
        quant=settings.quant,
        device="cuda" if device.startswith("cuda") else "cpu",
        dict_size=settings.dict_size,
        batch_size=settings.batch_size,
        harvest_batch_size=settings.harvest_batch_size,
        context_length=settings.context_length,
    )


def _short(spec: str) -> str:
    return spec.rstrip("/").split("/")[-1] or spec


def make_plan(resolved: ResolvedSettings, hardware: Hardware | None = None) -> Plan:
    """Everything known before downloading weights; raises when the models cannot fit."""
    hardware = hardware or detect_hardware()
    settings = resolved.settings
    facts_a, facts_b = model_facts(settings.model_a), model_facts(settings.model_b)
    notes, warnings = list(resolved.notes), list(resolved.warnings)
    memory = memory_plan(settings, hardware, facts_a, facts_b)
    if memory is None:
        precision = settings.quant if settings.quant != "auto" else "decided after download"
        notes.append("model configs not reachable yet: precision and estimates are settled after the pull")
    else:
        memory.check()
        precision = ", ".join(dict.fromkeys(m.label for m in memory.models)) + f" ({memory.dtype})"
        notes += memory.notes
        if settings.dict_size is None and memory.dict_size != planner_default_dict_size(facts_a, facts_b):
            settings = dataclasses.replace(settings, dict_size=memory.dict_size)
    return Plan(settings, resolved.preset, hardware, facts_a, facts_b, precision, notes, warnings, memory)


def planner_default_dict_size(a: ModelFacts, b: ModelFacts) -> int | None:
    if not a.d_model or not b.d_model:
        return None
    return 32 * (a.d_model + b.d_model) // 2


def check_inputs(plan: Plan, run_dir: Path | None = None, done_store_bytes: int = 0) -> None:
    """Cheap checks that must fail before anything heavy: corpus, layers, disk."""
    from xdiff_cli.corpus import check_corpus

    check_corpus(plan.settings.corpus)
    for side, facts, layer in (("a", plan.model_a, plan.settings.layer_a), ("b", plan.model_b, plan.settings.layer_b)):
        if layer is not None and facts.n_layers is not None and not 0 <= layer < facts.n_layers:
            raise XdiffError(
                f"--layer-{side} {layer} is out of range for {facts.spec}", f"choose 0..{facts.n_layers - 1}"
            )
    needed = plan.disk_bytes
    if needed is not None:
        check_disk(run_dir or paths.runs_root(), needed - done_store_bytes)


def free_disk_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(path: Path, needed_bytes: int) -> None:
    free = free_disk_bytes(path)
    if needed_bytes * DISK_HEADROOM > free:
        raise XdiffError(
            f"not enough disk for the activation store: needs ~{format_bytes(needed_bytes)}, "
            f"{format_bytes(free)} free under {path}",
            "lower --tokens, free space, or point XDIFF_HOME at a bigger disk",
        )


# --------------------------------------------------------------------------------------
# Run selection: resume the newest identical unfinished run, or create one
# --------------------------------------------------------------------------------------


def _settings_of(run: Run) -> dict[str, Any] | None:
    try:
        return run.settings.to_dict()
    except XdiffError:
        return None  # recorded by another xdiff version; never resume into it


def is_complete(run: Run) -> bool:
    return all(run.stage_done(stage) for stage in STAGES)


def find_run(settings: RunSettings, *, name: str | None = None, new: bool = False) -> Run | None:
    """The run to continue: `--name`'s run if it exists, else the newest with identical settings.

    `new` never continues an existing run. A named run with other settings is an error, not
    a silent overwrite."""
    if new:
        return None
    wanted = settings.to_dict()
    if name is not None:
        run_dir = paths.runs_root() / name
        if not (run_dir / "run.json").is_file():
            return None
        run = Run.load(run_dir)
        recorded = _settings_of(run) or {}
        differing = sorted(k for k, v in wanted.items() if recorded.get(k) != v)
        if differing:
            raise XdiffError(
                f"run {name!r} exists with different settings ({', '.join(differing)})",
                "pick another --name, or `xdiff rm` it first",
            )
        return run
    for run in list_runs():
        if _settings_of(run) == wanted:
            return run
    return None


def create_run(plan: Plan, name: str | None = None, command: list[str] | None = None) -> Run:
    """A new run directory whose run.json records everything needed to reproduce it."""
    run = Run.create(plan.settings, name)
    run.record["preset"] = plan.preset.name if plan.preset else None
    run.record["command"] = command
    run.record["hardware"] = dataclasses.asdict(plan.hardware)
    run.record["precision"] = plan.precision
    run.save()
    return run


def first_unfinished_stage(run: Run) -> str | None:
    for stage in STAGES:
        if not run.stage_done(stage):
            return stage
    return None


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


@dataclass
class StageContext:
    """What one `xdiff run` invocation carries between stages."""

    plan: Plan
    progress: bool = True
    token: str | None = None


def pull_stage(run: Run, ctx: StageContext) -> None:
    """Resolve/download both models, plan their precision, record where and how they load."""
    settings = run.settings
    fetched = {side: fetch(spec, settings, ctx.token) for side, spec in (("a", settings.model_a), ("b", settings.model_b))}
    facts = {side: _config_facts(spec, folder) for side, (spec, folder, _, _) in fetched.items()}
    memory = memory_plan(settings, ctx.plan.hardware, facts["a"], facts["b"]).check()
    device = settings.device if settings.device != "auto" else ctx.plan.hardware.device
    for index, side in enumerate(("a", "b")):
        spec, folder, repo_id, revision = fetched[side]
        run.set_model(side, {
            "spec": spec, "path": str(folder), "repo_id": repo_id, "revision": revision,
            "quant": memory.models[index].quant, "dtype": memory.dtype, "device": device,
            "d_model": facts[side].d_model, "n_layers": facts[side].n_layers,
            "layer": facts[side].layer(settings.layer_a if side == "a" else settings.layer_b),
        })


def fetch(spec: str, settings: RunSettings, token: str | None) -> tuple[str, Path, str | None, str]:
    """(spec, local dir, repo id, revision) for `tiny:NAME`, a local dir or a hub id."""
    if spec.startswith(TINY_SCHEME):
        return spec, tiny_model_dir(spec), None, "local"
    from xdiff_cli.hub import fetch_model

    fetched = fetch_model(
        spec,
        allow_pickle_weights=settings.allow_pickle_weights,
        token=token,
        trust_remote_code=settings.trust_remote_code,
    )
    return spec, Path(fetched.path), fetched.repo_id, fetched.revision


def harvest_stage(run: Run, ctx: StageContext) -> None:
    """Load both models (only now), harvest aligned activations, then free them."""
    from xdiff_cli.harvest import harvest_run
    from xdiff_cli.loading import load_model  # quiet: it turns transformers' weight bars off

    models = run.record.get("models", {})
    if "a" not in models or "b" not in models:
        raise XdiffError(f"run {run.id} has no pulled models", "rerun with --restart-from pull")
    loaded = []  # harvest checks the disk itself, with the exact widths, before its first shard
    try:
        for side in ("a", "b"):
            info = models[side]
            loaded.append(load_model(
                Path(info["path"]), quant=info.get("quant", "none"), device=info.get("device", "auto"),
                dtype=info.get("dtype"), trust_remote_code=run.settings.trust_remote_code,
            ))
        harvest_run(run, loaded[0], loaded[1], progress=ctx.progress)
    finally:
        loaded.clear()
        free_accelerator_memory()


def train_stage(run: Run, ctx: StageContext) -> None:
    from xdiff_cli.training import train_run

    train_run(run, progress=ctx.progress)


def analyze_stage(run: Run, ctx: StageContext) -> None:
    from xdiff_cli.analysis import analyze_run

    analyze_run(run, progress=ctx.progress)


STAGE_FUNCTIONS = {"pull": pull_stage, "harvest": harvest_stage, "train": train_stage, "analyze": analyze_stage}
STAGE_TITLES = {
    "pull": "pull models",
    "harvest": "harvest aligned activations",
    "train": "train the crosscoder",
    "analyze": "analyse features",
}


def free_accelerator_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_stage(run: Run, stage: str, ctx: StageContext) -> None:
    """Run one stage with its status recorded: running → done | failed | interrupted."""
    run.mark_stage(stage, "running")
    try:
        STAGE_FUNCTIONS[stage](run, ctx)
    except KeyboardInterrupt:
        run.mark_stage(stage, "interrupted")
        raise
    except BaseException as exc:
        run.mark_stage(stage, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    run.mark_stage(stage, "done")


def execute(run: Run, ctx: StageContext, on_stage: Any = None) -> list[str]:
    """Run every unfinished stage in order; returns the stages it ran.

    `on_stage(index, stage)` is called before each (the CLI prints a header there)."""
    ran = []
    for index, stage in enumerate(STAGES):
        if run.stage_done(stage) and not _redo_if_corrupt(run, stage):
            continue
        if on_stage is not None:
            on_stage(index, stage)
        run_stage(run, stage, ctx)
        ran.append(stage)
    return ran


def _redo_if_corrupt(run: Run, stage: str) -> bool:
    """A done stage whose artifacts were damaged since is redone (with later stages), and says so."""
    from xdiff_cli.integrity import stage_problem

    problem = stage_problem(run, stage)
    if problem is None:
        return False
    from rich.markup import escape

    from xdiff_cli.console import err_console

    err_console.print(f"[yellow]note:[/] the {stage} output of run {run.id} is damaged ({escape(problem)}); redoing {stage}")
    if stage == "train":  # keep the checkpoints: training resumes from the last good one
        shutil.rmtree(Path(run.crosscoder_dir) / "final", ignore_errors=True)
        run.clear_stages_from(stage)
    else:
        restart_from(run, stage)
    return True


def stage_artifacts(run: Run) -> dict[str, list[Path]]:
    """What each stage writes in the run directory (pull writes only into the model cache)."""
    return {"pull": [], "harvest": [run.store_dir], "train": [run.crosscoder_dir], "analyze": [run.analysis_path]}


def restart_from(run: Run, stage: str) -> None:
    """Forget `stage` and every later one, artifacts included: the stages skip finished work
    (a trained `final/`, a valid analysis) so only deleting it makes them redo it."""
    if stage not in STAGES:
        raise XdiffError(f"unknown stage {stage!r} for --restart-from", f"choose one of {', '.join(STAGES)}")
    artifacts = stage_artifacts(run)
    for later in STAGES[STAGES.index(stage) :]:
        for path in artifacts[later]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    run.clear_stages_from(stage)


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
    from xdiff_cli.feature_index import FeatureIndex

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
    return Summary(run.id, run.dir, dict(run.record.get("metrics", {})), top_a, top_b, commands)


# --------------------------------------------------------------------------------------
# Runs as data (for `xdiff runs --json`)
# --------------------------------------------------------------------------------------


def run_info(run: Run) -> dict[str, Any]:
    """One run as JSON: id, models, created, stage, metrics, disk use."""
    settings = run.record.get("settings", {})
    return {
        "id": run.id,
        "dir": str(run.dir),
        "models": {"a": settings.get("model_a"), "b": settings.get("model_b")},
        "preset": run.record.get("preset"),
        "created": run.record.get("created"),
        "stage": run.current_stage,
        "complete": is_complete(run),
        "metrics": dict(run.record.get("metrics", {})),
        "disk_bytes": run.disk_bytes(),
    }


# --------------------------------------------------------------------------------------
# Formatting helpers (shared by the CLI and the plan)
# --------------------------------------------------------------------------------------


def format_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "unknown"
    if seconds < 60:
        return f"~{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"~{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:.1f} days"


def format_count(n: int | float | None) -> str:
    if n is None:
        return "?"
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            value = n / factor
            return f"{value:.0f}{suffix}" if value >= 100 or value == int(value) else f"{value:.1f}{suffix}"
    return str(int(n))
