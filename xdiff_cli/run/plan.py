"""The plan of an `xdiff run`: settings resolved, models sized, time and disk estimated.

Settings: defaults < hardware profile (no preset) or preset < explicit options. The plan is
everything known before downloading weights (config.json only); `check_inputs` fails fast
on what would otherwise fail after minutes of work (corpus, layers, disk).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdiff_cli import paths
from xdiff_cli.data.store import estimate_bytes
from xdiff_cli.errors import XdiffError
from xdiff_cli.models.pull import TINY_SCHEME, ModelFacts, model_facts
from xdiff_cli.run.hardware import Hardware, detect_hardware
from xdiff_cli.run.presets import Preset, apply_preset, load_preset, match_preset
from xdiff_cli.run.settings import RunSettings, default_dict_size, exclusive_size

# Without a preset, the defaults are sized to what this machine can finish.
CPU_PROFILE = {"tokens": 50_000, "context_length": 256, "dict_size": 4096, "k": 32, "steps": 2000,
               "batch_size": 512, "lr": 3e-4}
GPU_PROFILE = {"tokens": 2_000_000, "steps": 20_000}

# Fixed costs at hardware.REFERENCE_CPU_FLOPS (scaled by Hardware.slowdown): per harvested
# token, per train step, per analysis, and per parameter to convert a GGUF (dequantise +
# save) or to load a model.
HARVEST_TOKEN_OVERHEAD_S = {False: 1.5e-4, True: 5e-5}
TRAIN_STEP_OVERHEAD_S = {False: 0.0144, True: 0.005}
ANALYZE_FIXED_S = 3.0
CONVERT_S_PER_PARAM = 1.5e-7
LOAD_S_PER_PARAM = 1e-8
HARVEST_TOKEN_WASTE = 1.3  # tokens fed per aligned token stored (padding, unaligned, outliers)
# Share of the measured matmul FLOP/s that harvest's forwards / the crosscoder's steps sustain.
# Harvest terms calibrated on benchmarks/real_pair.py (shared 2-core box); the per-token and
# per-step fixed costs and TRAIN_EFFICIENCY re-fitted on a quiet 2-core box with the sparse
# training step (tiny demo: 800 steps in 5.8 s, 7.3 ms/step; benchmarks/train_speed.py:
# ~0.4 of the measured matmul rate at d=256+256, F=8,192). Under heavy contention small
# steps run several times slower than this predicts.
HARVEST_EFFICIENCY = 1.0
TRAIN_EFFICIENCY = 0.3
# FLOPs of one sparse training step per (token × feature × width): the dense encoder forward
# (2) plus the top-k, the sparse encoder backward and the sparse decoder (~0.5); a dense step
# would be 6. Fitted on `xdiff run --preset smol-gemma` on a quiet 2-core box (1,000 steps
# × 512 at d=576+640, F=2,048: 57 s, i.e. 57 ms/step; the dense count estimated 150 s).
TRAIN_STEP_FLOPS_FACTOR = 2.5
# Analysis encodes the held-out split twice (statistics, then the example windows) and
# writes an SQLite index; verify makes two passes of about the same cost (fit, score).
ANALYZE_FLOPS_FACTOR = 8


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
    from xdiff_cli.run.hardware import resolve_device

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
            return default_dict_size(self.model_a.d_model, self.model_b.d_model)
        return None

    @property
    def n_exclusive(self) -> int:
        """Features in each exclusive block: the same rounding the trained crosscoder uses."""
        return exclusive_size(self.dict_size, self.settings.exclusive_frac, self.settings.arch) if self.dict_size else 0

    @property
    def disk_bytes(self) -> int | None:
        """Activation store size: tokens × (d_A + d_B) values in 16-bit (none for a store
        harvested elsewhere, `--store`: its shards stream through a bounded cache)."""
        if self.settings.store:
            return 0
        return store_bytes(self.settings.tokens, self.model_a.d_model, self.model_b.d_model)

    def time_seconds(self) -> dict[str, float | None]:
        """Per-stage estimates, scaled by the FLOP/s this machine measures now (downloads not
        included). Compute terms divide FLOPs by the measured matmul rate times how much of it
        each stage sustains; fixed per-token/per-step costs are the reference CPU's, slowed
        down by the same ratio. Calibrated on `benchmarks/real_pair.py` and the tiny demo."""
        s, flops, slow = self.settings, self.hardware.flops, self.hardware.slowdown
        out: dict[str, float | None] = {"pull": None, "harvest": None, "train": None, "analyze": None, "verify": None}
        conversions = [m.n_params for m in (self.model_a, self.model_b) if m.needs_conversion and m.n_params]
        if conversions:
            out["pull"] = sum(conversions) * CONVERT_S_PER_PARAM * slow
        flops_a = self.model_a.harvest_flops_per_token(s.layer_a)
        flops_b = self.model_b.harvest_flops_per_token(s.layer_b)
        if flops_a and flops_b and not s.store:
            # Truncated forwards of both models over every fed token (aligned, plus the ones
            # lost to alignment, padding and the store's outlier filter: HARVEST_TOKEN_WASTE),
            # plus a per-token cost (tokenising, aligning, writing) that dominates for tiny
            # models, plus loading both models.
            per_token = HARVEST_TOKEN_OVERHEAD_S[self.hardware.has_gpu] * slow
            compute = HARVEST_TOKEN_WASTE * (flops_a + flops_b) * s.tokens / (flops * HARVEST_EFFICIENCY)
            params = sum(m.n_params or 0 for m in (self.model_a, self.model_b))
            out["harvest"] = compute + per_token * s.tokens + params * LOAD_S_PER_PARAM * slow
        if self.dict_size and self.model_a.d_model and self.model_b.d_model:
            width = self.model_a.d_model + self.model_b.d_model
            step_overhead = TRAIN_STEP_OVERHEAD_S[self.hardware.has_gpu] * slow
            train_flops = flops * TRAIN_EFFICIENCY
            step_flops = TRAIN_STEP_FLOPS_FACTOR * s.batch_size * self.dict_size * width
            out["train"] = s.steps * (step_flops / train_flops + step_overhead)
            eval_tokens = s.tokens * s.eval_fraction
            out["analyze"] = ANALYZE_FLOPS_FACTOR * eval_tokens * self.dict_size * width / train_flops + ANALYZE_FIXED_S * slow
            out["verify"] = out["analyze"]  # benchmarks/README.md: verify takes 0.8–1.0× of analyse
        return out


def store_bytes(tokens: int, d_a: int | None, d_b: int | None) -> int | None:
    return estimate_bytes(tokens, d_a, d_b) if d_a and d_b else None


def memory_plan(settings: RunSettings, hardware: Hardware, a: ModelFacts, b: ModelFacts) -> Any:
    """The planner's precision choice for this pair (None when a config is not reachable yet)."""
    if a.folder is None or b.folder is None:
        return None
    from xdiff_cli.models import planner

    device = hardware.device_for(settings.device)
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


def make_plan(resolved: ResolvedSettings, hardware: Hardware | None = None, check: bool = True) -> Plan:
    """Everything known before downloading weights; raises when the models cannot fit
    (with `check=False`, for --dry-run, that becomes one of the plan's warnings)."""
    hardware = hardware or detect_hardware()
    settings = resolved.settings
    facts_a, facts_b = model_facts(settings.model_a), model_facts(settings.model_b)
    notes, warnings = list(resolved.notes), list(resolved.warnings)
    memory = memory_plan(settings, hardware, facts_a, facts_b)
    if memory is None:
        precision = settings.quant if settings.quant != "auto" else "decided after download"
        notes.append("model configs not reachable yet: precision and estimates are settled after the pull")
    else:
        try:
            memory.check()
        except XdiffError as exc:
            if check:
                raise
            warnings.append(str(exc))
        precision = ", ".join(dict.fromkeys(m.label for m in memory.models)) + f" ({memory.dtype})"
        notes += memory.notes
        default = default_dict_size(facts_a.d_model, facts_b.d_model) if facts_a.d_model and facts_b.d_model else None
        if settings.dict_size is None and memory.dict_size != default:
            settings = dataclasses.replace(settings, dict_size=memory.dict_size)
    return Plan(settings, resolved.preset, hardware, facts_a, facts_b, precision, notes, warnings, memory)


def check_inputs(plan: Plan, run_dir: Path | None = None, done_store_bytes: int = 0) -> None:
    """Cheap checks that must fail before anything heavy: corpus, layers, disk."""
    from xdiff_cli.data.corpus import check_corpus

    check_corpus(plan.settings.corpus)
    for side, facts, layer in (("a", plan.model_a, plan.settings.layer_a), ("b", plan.model_b, plan.settings.layer_b)):
        if layer is not None and facts.n_layers is not None and not 0 <= layer < facts.n_layers:
            raise XdiffError(
                f"--layer-{side} {layer} is out of range for {facts.spec}", f"choose 0..{facts.n_layers - 1}"
            )
    needed = plan.disk_bytes
    if needed is not None:
        paths.check_free_space(run_dir or paths.runs_root(), needed - done_store_bytes, "the activation store")
