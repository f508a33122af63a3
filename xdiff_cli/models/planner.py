"""Memory planner: pick a precision so both models, and the crosscoder, fit one GPU.

Works from metadata only — `config.json` and, when present, the safetensors index's
`metadata.total_size` — so it can run before any weights are downloaded.

A run has three phases that hold GPU memory at different times:
- harvest: both models resident + forward-pass working memory;
- train:   the crosscoder with its gradients and Adam state (models are freed by then);
- steer:   both models + the trained crosscoder's weights (browse/steer).
The plan fits when the largest phase fits the budget (free memory minus headroom). With
`--quant auto` both models get the *same* precision — the first of none → 8-bit → 4-bit that
fits — because different quantisation noise in A and B can masquerade as exclusive features.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError
from xdiff_cli.models import modelconfig
from xdiff_cli.run import settings

GiB = 1024**3
QUANT_ORDER = ("none", "8bit", "4bit")
# Bytes per weight stored by bitsandbytes: int8 + one fp32 scale per row (~negligible);
# nf4 with double quantisation: 4 bits + ~0.127 bits of absmax per weight.
_QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 0.127 / 8}
# bitsandbytes replaces nn.Linear only. Embeddings, lm_head and fused MoE expert tensors
# (3-D parameters in transformers 5) stay in the compute dtype.
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = int(0.8 * GiB)  # CUDA context + allocator slack, once per process
HEADROOM = 0.92  # plan against 92% of free memory: fragmentation, kernels' workspaces


# --- model footprint from metadata ---------------------------------------------------------


_text_config = modelconfig.text_config  # one home for reading config.json


def _first_int(cfg: dict[str, Any], *names: str, default: int | None = None) -> int:
    for name in names:
        value = cfg.get(name)
        if isinstance(value, int):
            return value
    if default is None:
        raise XdiffError(f"config has none of {', '.join(names)}", "is this a transformers causal LM config?")
    return default


@dataclass(frozen=True)
class ModelFootprint:
    """What the planner knows about one model, from its config (and safetensors index)."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    n_params: int  # total parameters
    n_linear: int  # parameters in nn.Linear layers bitsandbytes can quantise
    disk_bytes: int | None = None  # safetensors index metadata.total_size
    prequantized: str | None = None  # e.g. "mxfp4" when the repo ships quantised weights

    def weight_bytes(self, quant: str, dtype: str = "bfloat16", native_prequantized: bool = True) -> int:
        """Bytes of weights once loaded with `quant` in compute `dtype`."""
        per_param = _DTYPE_BYTES[dtype]
        if self.prequantized:
            # Shipped-quantised weights keep their own format when its kernels are there; otherwise
            # transformers dequantises them to the compute dtype. bitsandbytes does not apply.
            if native_prequantized and self.disk_bytes:
                return self.disk_bytes
            return self.n_params * per_param
        if quant == "none":
            return self.n_params * per_param
        rest = self.n_params - self.n_linear
        return int(self.n_linear * _QUANT_BYTES[quant] + rest * per_param)


def estimate_parameters(config: dict[str, Any]) -> tuple[int, int]:
    """(total parameters, parameters in quantisable nn.Linear layers) from a config dict."""
    cfg = _text_config(config)
    model_type = cfg.get("model_type", "")
    d = _first_int(cfg, "hidden_size", "n_embd", "d_model")
    n_layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _first_int(cfg, "vocab_size")
    n_heads = _first_int(cfg, "num_attention_heads", "n_head")
    n_kv = _first_int(cfg, "num_key_value_heads", default=n_heads)
    head_dim = cfg.get("head_dim") or d // n_heads
    ffn = _first_int(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * d)

    attention = d * n_heads * head_dim + 2 * d * n_kv * head_dim + n_heads * head_dim * d
    gated = model_type not in ("gpt2", "gpt_neox", "gptj", "opt", "phi")
    mlp_width = 3 if gated else 2
    n_experts = _first_int(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    if n_experts:
        expert_ffn = _first_int(cfg, "moe_intermediate_size", default=ffn)
        experts = n_experts * mlp_width * d * expert_ffn + d * n_experts  # + router
        shared_ffn = _first_int(cfg, "shared_expert_intermediate_size", default=0)
        shared = mlp_width * d * shared_ffn
        per_layer_linear = attention + shared + d * n_experts
        per_layer = attention + experts + shared
    else:
        per_layer_linear = per_layer = attention + mlp_width * d * ffn
    embed = vocab * d
    tied = cfg.get("tie_word_embeddings", model_type == "gpt2")
    lm_head = 0 if tied else vocab * d
    norms = (2 * n_layers + 1) * d
    total = n_layers * per_layer + embed + lm_head + norms
    return total, n_layers * per_layer_linear


def _embedding_params(cfg: dict[str, Any]) -> int:
    d = _first_int(cfg, "hidden_size", "n_embd", "d_model")
    vocab = _first_int(cfg, "vocab_size")
    tied = cfg.get("tie_word_embeddings", cfg.get("model_type") == "gpt2")
    return vocab * d * (1 if tied else 2)


def footprint_from_config(
    config: dict[str, Any], name: str = "model", disk_bytes: int | None = None
) -> ModelFootprint:
    cfg = _text_config(config)
    total, linear = estimate_parameters(config)
    quant_cfg = config.get("quantization_config") or {}
    method = quant_cfg.get("quant_method")
    if disk_bytes is None and method == "mxfp4":
        # MXFP4 stores MoE experts in 4.25 bits/weight (4-bit values + one 8-bit scale per 32);
        # everything else (attention, router, embeddings) ships in bf16.
        experts = total - linear - _embedding_params(cfg)
        disk_bytes = int(experts * 4.25 / 8 + (total - experts) * 2)
    return ModelFootprint(
        name=name,
        model_type=cfg.get("model_type", "?"),
        hidden_size=_first_int(cfg, "hidden_size", "n_embd", "d_model"),
        num_layers=_first_int(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        vocab_size=_first_int(cfg, "vocab_size"),
        n_params=total,
        n_linear=linear,
        disk_bytes=disk_bytes,
        prequantized=method,
    )


def footprint_from_dir(path: Path | str, name: str | None = None) -> ModelFootprint:
    """Footprint of a model directory: config.json + safetensors index (if any)."""
    path = Path(path)
    config = modelconfig.read_config(path)
    disk_bytes = None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            disk_bytes = int(json.loads(index.read_text())["metadata"]["total_size"])
        except (KeyError, ValueError, TypeError, json.JSONDecodeError):
            disk_bytes = None
    elif (path / "model.safetensors").is_file():
        disk_bytes = (path / "model.safetensors").stat().st_size
    return footprint_from_config(config, name or path.name, disk_bytes)


# --- working memory --------------------------------------------------------------------------


def harvest_working_bytes(fp: ModelFootprint, batch_size: int = 8, context_length: int = 512) -> int:
    """Forward-pass memory under no_grad: a few residual-sized buffers per token (attention,
    MLP intermediate), plus last-position fp32 logits (harvest needs no full logits)."""
    tokens = batch_size * context_length
    return tokens * fp.hidden_size * 2 * 24 + batch_size * fp.vocab_size * 4


default_dict_size = settings.default_dict_size  # one home: xdiff_cli/run/settings.py


def crosscoder_parameters(d_a: int, d_b: int, dict_size: int) -> int:
    return 2 * dict_size * (d_a + d_b) + dict_size + d_a + d_b


def crosscoder_training_bytes(d_a: int, d_b: int, dict_size: int, batch_size: int = 2048) -> int:
    """Peak GPU memory of training: fp32 params + grads + Adam (m, v) + one masked-grad
    temporary, and per-batch activations (pre-activations, ReLU, scores, top-k mask, sparse
    codes and their grads: ~6 [batch, dict] fp32 tensors; inputs, reconstructions, errors)."""
    params = crosscoder_parameters(d_a, d_b, dict_size)
    state = params * 4 * (1 + 1 + 2 + 1)
    activations = batch_size * dict_size * 4 * 6 + batch_size * (d_a + d_b) * 4 * 6
    return state + activations


# Peak rows of the training shuffle buffers: 8 data lanes (batches.DATA_LANES) each holding
# at least one shard of up to 65,536 tokens (harvest.DEFAULT_SHARD_TOKENS), or the 262,144-row
# buffer (TrainConfig.buffer_tokens), whichever is more; kept in the store's 16-bit dtype.
SHUFFLE_BUFFER_TOKENS = max(262_144, 8 * 65_536)


def shuffle_buffer_bytes(d_a: int, d_b: int) -> int:
    """Training's shuffle buffers, in host memory (at most; small stores hold less)."""
    return SHUFFLE_BUFFER_TOKENS * (d_a + d_b) * 2


def training_overhead_bytes(d_a: int, d_b: int, on_gpu: bool) -> int:
    """What training needs beside the crosscoder in the planned memory: the CUDA context on a
    GPU; on CPU, where the plan budgets host RAM, the shuffle buffers."""
    return CUDA_CONTEXT_BYTES if on_gpu else shuffle_buffer_bytes(d_a, d_b)


def crosscoder_inference_bytes(d_a: int, d_b: int, dict_size: int) -> int:
    """Steering needs the decoder (bf16) beside the models; the encoder can stay on CPU."""
    return dict_size * (d_a + d_b) * 2


def max_dict_size_for(budget: int, d_a: int, d_b: int, batch_size: int = 2048) -> int:
    """The largest dictionary (a multiple of 1024) whose training fits `budget` bytes."""
    per_feature = crosscoder_training_bytes(d_a, d_b, 1024, batch_size) / 1024
    return max(0, int(budget // per_feature) // 1024 * 1024)


# --- the plan --------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    footprint: ModelFootprint
    quant: str  # none | 8bit | 4bit (for a pre-quantised model: its own format, see `label`)
    weight_bytes: int
    working_bytes: int

    @property
    def label(self) -> str:
        if self.footprint.prequantized:
            return f"{self.footprint.prequantized} (as shipped)"
        return {"none": "none", "8bit": "8-bit", "4bit": "4-bit nf4"}[self.quant]


@dataclass
class MemoryPlan:
    device: str  # "cuda" | "cpu"
    dtype: str
    budget_bytes: int
    models: list[ModelPlan]
    dict_size: int
    phases: dict[str, int] = field(default_factory=dict)  # phase -> peak bytes
    notes: list[str] = field(default_factory=list)

    @property
    def quants(self) -> list[str]:
        return [m.quant for m in self.models]

    @property
    def fits(self) -> bool:
        return all(v <= self.budget_bytes for v in self.phases.values())

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    def problems(self) -> list[str]:
        out = []
        for phase, need in self.phases.items():
            if need > self.budget_bytes:
                out.append(f"{phase} needs {need / GiB:.1f} GiB of {self.budget_bytes / GiB:.1f} GiB")
        return out

    def check(self) -> MemoryPlan:
        """Raise a one-line XdiffError saying what to change when the plan does not fit."""
        if self.fits:
            return self
        d_a, d_b = (m.footprint.hidden_size for m in self.models)
        if self.phases.get("train", 0) > self.budget_bytes and all(
            v <= self.budget_bytes for k, v in self.phases.items() if k != "train"
        ):
            overhead = training_overhead_bytes(d_a, d_b, self.device.startswith("cuda"))
            biggest = max_dict_size_for(self.budget_bytes - overhead, d_a, d_b)
            raise XdiffError(
                f"crosscoder training does not fit: {'; '.join(self.problems())}",
                f"use --dict-size {biggest} or smaller",
            )
        hint = "use a bigger GPU or smaller models"
        if any(m.quant != "4bit" and not m.footprint.prequantized for m in self.models):
            hint = "use --quant 4bit, a bigger GPU, or smaller models"
        if self.device.startswith("cuda"):  # torchrun ranks each hold both models: more GPUs add speed, not memory
            hint += " (more GPUs do not help here: every torchrun rank holds both models)"
        raise XdiffError(f"the models do not fit this {self.device}: {'; '.join(self.problems())}", hint)

    def describe(self) -> str:
        lines = [f"memory plan on {self.device} ({self.dtype}): budget {self.budget_bytes / GiB:.1f} GiB"]
        for m in self.models:
            fp = m.footprint
            lines.append(
                f"  {fp.name}: {fp.model_type}, {fp.n_params / 1e9:.2f}B params, d={fp.hidden_size}, "
                f"{fp.num_layers} layers → {m.label}: {m.weight_bytes / GiB:.1f} GiB"
            )
        for phase, need in self.phases.items():
            lines.append(
                f"  {phase}: {need / GiB:.1f} GiB {'ok' if need <= self.budget_bytes else 'DOES NOT FIT'}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def table(self) -> Any:
        """A rich Table of the plan."""
        from rich.table import Table

        table = Table(
            title=f"Memory plan — {self.device}, budget {self.budget_bytes / GiB:.1f} GiB",
            title_justify="left",
        )
        for col in ("model", "type", "params", "width", "layers", "precision", "weights"):
            table.add_column(
                col, justify="right" if col in ("params", "width", "layers", "weights") else "left"
            )
        for m in self.models:
            fp = m.footprint
            table.add_row(
                fp.name,
                fp.model_type,
                f"{fp.n_params / 1e9:.2f}B",
                str(fp.hidden_size),
                str(fp.num_layers),
                m.label,
                f"{m.weight_bytes / GiB:.1f} GiB",
            )
        table.add_section()
        for phase, need in self.phases.items():
            verdict = "[green]fits[/]" if need <= self.budget_bytes else "[red]does not fit[/]"
            table.add_row(f"phase: {phase}", "", "", "", "", verdict, f"{need / GiB:.1f} GiB")
        return table


def available_memory(device: str) -> int:
    """Free bytes on the CUDA device, or available RAM for cpu."""
    if device.startswith("cuda"):
        import torch

        from xdiff_cli.models.loading import resolve_device

        device = resolve_device(device)  # a clear error when no CUDA GPU is visible
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        free, _total = torch.cuda.mem_get_info(index)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


def _phases(models: list[ModelPlan], dict_size: int, batch_size: int, on_gpu: bool) -> dict[str, int]:
    d_a, d_b = (m.footprint.hidden_size for m in models)
    weights = sum(m.weight_bytes for m in models)
    return {
        "harvest": CUDA_CONTEXT_BYTES + weights + max(m.working_bytes for m in models),
        # (a CPU plan takes the CUDA context off every phase below, leaving the shuffle buffers)
        "train": CUDA_CONTEXT_BYTES + crosscoder_training_bytes(d_a, d_b, dict_size, batch_size)
        + (0 if on_gpu else shuffle_buffer_bytes(d_a, d_b)),
        "steer": CUDA_CONTEXT_BYTES
        + weights
        + max(m.working_bytes for m in models) // 8
        + crosscoder_inference_bytes(d_a, d_b, dict_size),
    }


def plan_memory(
    footprints: list[ModelFootprint],
    *,
    quant: str = "auto",
    quant_per_model: list[str | None] | None = None,
    device: str = "cuda",
    free_bytes: int | None = None,
    dict_size: int | None = None,
    batch_size: int = 2048,
    harvest_batch_size: int = 8,
    context_length: int = 512,
    native_prequantized: bool | None = None,
) -> MemoryPlan:
    """Choose a precision for the two models and report every phase's peak memory.

    `quant`: auto | none | 8bit | 4bit for both models; `quant_per_model` overrides it per
    model (the user said so explicitly). `free_bytes` defaults to the device's free memory.
    `native_prequantized`: whether shipped-quantised weights (e.g. GPT-OSS's MXFP4) can stay in
    their format (GPU kernels installed); None = detect.
    """
    if len(footprints) != 2:
        raise XdiffError("the planner needs exactly two models")
    if quant not in ("auto", *QUANT_ORDER):
        raise XdiffError(f"--quant must be auto, none, 8bit or 4bit, got {quant!r}")
    on_gpu = device.startswith("cuda")
    budget = int((available_memory(device) if free_bytes is None else free_bytes) * HEADROOM)
    d_a, d_b = footprints[0].hidden_size, footprints[1].hidden_size
    notes: list[str] = []
    if dict_size is None:
        dict_size = default_dict_size(d_a, d_b)
        train_budget = budget - training_overhead_bytes(d_a, d_b, on_gpu)
        if crosscoder_training_bytes(d_a, d_b, dict_size, batch_size) > train_budget:
            smaller = max_dict_size_for(train_budget, d_a, d_b, batch_size)
            if smaller >= 1024:
                notes.append(
                    f"dictionary reduced from {dict_size:,} to {smaller:,} features so training fits"
                )
                dict_size = smaller
    if native_prequantized is None:
        native_prequantized = on_gpu and _mxfp4_kernels_available()
    gpus = _visible_gpus() if on_gpu else 0
    if gpus > 1:
        notes.append(
            f"{gpus} GPUs visible: this plan is per GPU (each rank holds both models and the crosscoder); "
            f"`torchrun --nproc-per-node {gpus} -m xdiff_cli -- harvest|train ...` splits the tokens and "
            "the batch across them (README: Beyond one GPU)"
        )
    overrides = list(quant_per_model or [None, None])
    if len(overrides) != 2:
        raise XdiffError("quant_per_model needs one entry per model")

    def build(choice: str, dtype: str) -> MemoryPlan:
        models = []
        for fp, override in zip(footprints, overrides, strict=True):
            q = override or choice
            if fp.prequantized:
                q = "none"
            models.append(
                ModelPlan(
                    fp,
                    q,
                    fp.weight_bytes(q, dtype, native_prequantized),
                    harvest_working_bytes(fp, harvest_batch_size, context_length),
                )
            )
        plan = MemoryPlan("cuda" if on_gpu else "cpu", dtype, budget, models, dict_size, notes=notes)
        plan.phases = _phases(models, dict_size, batch_size, on_gpu)
        if not on_gpu:  # no CUDA context on CPU
            plan.phases = {k: v - CUDA_CONTEXT_BYTES for k, v in plan.phases.items()}
        return plan

    for fp in footprints:
        if fp.prequantized:
            how = (
                "kept as shipped"
                if native_prequantized
                else "dequantised to the compute dtype (no GPU kernels)"
            )
            notes.append(f"{fp.name} ships {fp.prequantized} weights: {how}; --quant does not apply to it")
    if not on_gpu:
        notes.append(
            "no GPU: planning against CPU RAM; float32 unless it does not fit (bf16 matmuls are slow on CPU)"
        )
        choice = "none" if quant == "auto" else quant
        plan = build(choice, "float32")
        if not plan.fits and quant == "auto":
            notes.append("float32 does not fit in RAM: using bfloat16")
            plan = build(choice, "bfloat16")
        return plan
    if quant != "auto":
        return build(quant, "bfloat16")
    for choice in QUANT_ORDER:
        plan = build(choice, "bfloat16")
        # Training does not depend on the models' precision: choose by the model phases.
        if all(need <= budget for phase, need in plan.phases.items() if phase != "train"):
            return plan
    return plan  # 4-bit and still too big: `check()` says so


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mxfp4_kernels_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("kernels") is not None


def plan_for_dirs(paths: list[Path], names: list[str] | None = None, **kwargs: Any) -> MemoryPlan:
    names = names or [Path(p).name for p in paths]
    return plan_memory([footprint_from_dir(p, n) for p, n in zip(paths, names, strict=True)], **kwargs)
